"""KTO: the loss against a plain-Python transcription of the paper's equation, the data, the trainer."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhfkit.losses import balanced_kto_weights, kto_loss, kto_weight_ratio, sequence_logprob_sums

# ------------------------------------------------------------------------------------------------ the loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _paper_kto(rows, kl_rows, labels, beta, lam_d, lam_u):
    """Ethayarajh et al. 2024, eq. 8, row by row: ragged per-token log-probs (policy, reference) per row.

    r = sum_t log pi - sum_t log pi_ref;  z0 = max(0, mean over mismatched pairs of the same);
    loss = lam_D (1 - sigmoid(beta (r - z0))) for desirable rows, lam_U (1 - sigmoid(beta (z0 - r))) otherwise.
    Returns the losses and d loss_i / d r_i (z0 held fixed: the paper does not back-propagate through it).
    """
    z = sum(sum(p) - sum(q) for p, q in kl_rows) / len(kl_rows)
    z0 = max(0.0, z)
    losses, grads = [], []
    for (p, q), good in zip(rows, labels):
        r = sum(p) - sum(q)
        if good:
            s = _sigmoid(beta * (r - z0))
            losses.append(lam_d * (1 - s))
            grads.append(-lam_d * beta * s * (1 - s))
        else:
            s = _sigmoid(beta * (z0 - r))
            losses.append(lam_u * (1 - s))
            grads.append(lam_u * beta * s * (1 - s))
    return losses, grads, z0


def _ragged(rng: random.Random, n: int, shift: float) -> list[tuple[list[float], list[float]]]:
    out = []
    for _ in range(n):
        length = rng.randint(1, 6)
        out.append(([rng.uniform(-3, 0) + shift for _ in range(length)], [rng.uniform(-3, 0) for _ in range(length)]))
    return out


def _padded(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy [B, T], reference [B, T], mask [B, T]) with junk in the padding, which the mask must hide."""
    width = max(len(p) for p, _ in rows) + 2
    pol = torch.full((len(rows), width), 123.0, dtype=torch.float64)
    ref = torch.full((len(rows), width), -77.0, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, (p, q) in enumerate(rows):
        pol[i, :len(p)] = torch.tensor(p, dtype=torch.float64)
        ref[i, :len(q)] = torch.tensor(q, dtype=torch.float64)
        mask[i, :len(p)] = 1
    return pol, ref, mask


def _packed(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pol = torch.tensor([v for p, _ in rows for v in p], dtype=torch.float64)[None]
    ref = torch.tensor([v for _, q in rows for v in q], dtype=torch.float64)[None]
    index = torch.tensor([i for i, (p, _) in enumerate(rows) for _ in p])[None]
    return pol, ref, torch.ones_like(pol), index


@pytest.mark.parametrize("kl_shift", [0.8, -0.8])  # z0 > 0, and a negative estimate clamped to 0
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kto_loss_matches_paper_equation(kl_shift: float, layout: str) -> None:
    rng = random.Random(7)
    rows, kl_rows = _ragged(rng, 7, 0.3), _ragged(rng, 5, kl_shift)
    labels = [True, False, True, True, False, False, True]
    beta, lam_d, lam_u = 0.7, 1.0, 1.33
    want, want_grad, want_z0 = _paper_kto(rows, kl_rows, labels, beta, lam_d, lam_u)
    assert (want_z0 > 0) == (kl_shift > 0)

    def sums(data, grad: bool):
        if layout == "padded":
            pol, ref, mask = _padded(data)
            index = None
        else:
            pol, ref, mask, index = _packed(data)
        pol.requires_grad_(grad)
        n = len(data)
        return (pol, sequence_logprob_sums(pol, mask, index, n), sequence_logprob_sums(ref, mask, index, n),
                mask)

    pol, pol_sums, ref_sums, mask = sums(rows, True)
    kl_pol, kl_pol_sums, kl_ref_sums, _ = sums(kl_rows, True)
    out = kto_loss(pol_sums, ref_sums, torch.tensor(labels), kl_pol_sums, kl_ref_sums, beta=beta,
                   desirable_weight=lam_d, undesirable_weight=lam_u)
    assert out.losses.dtype == torch.float64
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12, rel=1e-12)
    assert float(out.z0) == pytest.approx(want_z0, abs=1e-12)
    assert out.rewards.tolist() == pytest.approx([beta * (sum(p) - sum(q)) for p, q in rows], abs=1e-12)
    assert not out.rewards.requires_grad and not out.z0.requires_grad

    grad_pol, grad_kl = torch.autograd.grad(out.losses.sum(), [pol, kl_pol], allow_unused=True)
    # every scored token of row i gets d loss_i / d r_i; padding gets nothing
    if layout == "padded":
        expected = torch.tensor(want_grad, dtype=torch.float64)[:, None] * mask
    else:
        expected = torch.tensor([g for g, (p, _) in zip(want_grad, rows) for _ in p], dtype=torch.float64)[None]
    torch.testing.assert_close(grad_pol, expected, atol=1e-12, rtol=1e-12)
    # z0 is detached: no gradient reaches the mismatched pairs ...
    assert grad_kl is None or torch.count_nonzero(grad_kl) == 0
    # ... although z0 (when not clamped) does move the loss value
    bumped = kto_loss(pol_sums.detach(), ref_sums, torch.tensor(labels), kl_pol_sums.detach() + 0.5, kl_ref_sums,
                      beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    raw_z = sum(sum(p) - sum(q) for p, q in kl_rows) / len(kl_rows)
    moved = not torch.allclose(bumped.losses, out.losses.detach())
    assert moved == (max(0.0, raw_z + 0.5) != want_z0)


def test_kto_loss_edge_cases() -> None:
    one = torch.zeros(1, dtype=torch.float64)
    out = kto_loss(one, one, torch.tensor([True]), one, one)
    assert out.losses.tolist() == [0.5] and float(out.z0) == 0.0  # r = z0 = 0: sigmoid(0) = 1/2
    with pytest.raises(ValueError, match="beta"):
        kto_loss(one, one, torch.tensor([True]), one, one, beta=0)
    with pytest.raises(ValueError, match="mismatched"):
        kto_loss(one, one, torch.tensor([True]), one[:0], one[:0])
    big = torch.tensor([1e4, -1e4], dtype=torch.float64)
    out = kto_loss(big, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]), one, one, beta=1.0)
    assert out.losses.tolist() == [0.0, 0.0] and torch.isfinite(out.losses).all()


def test_kto_weight_rule() -> None:
    assert kto_weight_ratio(30, 10, 1.0, 1.0) == 3.0
    assert kto_weight_ratio(10, 0, 1.0, 1.0) == math.inf
    # in range: left alone
    assert balanced_kto_weights(12, 10, 1.0, 1.0) == (1.0, 1.0)
    for n_d, n_u, lam_d, lam_u in ((30, 10, 1.0, 1.0), (10, 30, 1.0, 1.0), (5, 9, 2.0, 0.5), (100, 1, 1.0, 1.0)):
        d, u = balanced_kto_weights(n_d, n_u, lam_d, lam_u)
        assert 1.0 - 1e-12 <= kto_weight_ratio(n_d, n_u, d, u) <= 4 / 3
        assert d >= lam_d and u >= lam_u  # only the rarer class is raised


# ------------------------------------------------------------------------------------------------ the data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(path, tokenizer, **kw):
    from rlhfkit.data import load_rows, prepare_kto

    return prepare_kto(load_rows(path), tokenizer, max_length=kw.pop("max_length", 64), source=path, **kw)


def test_unpaired_rows_text_and_chat(tiny_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "What is two plus two?", "completion": "Four.", "label": True},
        {"prompt": "Say nothing.", "completion": "  ", "label": True},
    ])
    records, report = _prepare(path, tiny_tokenizer)
    assert report.kept == 1 and report.skipped == {"empty response": 1}
    chat_path = _jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Blue."}], "label": False}])
    records += _prepare(chat_path, tiny_tokenizer)[0]
    assert [r["desirable"] for r in records] == [True, False]
    eos = tiny_tokenizer.eos_token_id
    first = records[0]
    assert first["completion_ids"] == tiny_tokenizer("Four.", add_special_tokens=False).input_ids + [eos]
    assert first["prompt_ids"] == tiny_tokenizer("What is two plus two?").input_ids
    # the chat row is rendered by the template, like SFT's prompt/completion chat rows
    from rlhfkit.data import load_rows, prepare_sft

    sft, _ = prepare_sft(load_rows(_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Blue."}]}])), tiny_tokenizer, max_length=64)
    chat = records[1]
    assert chat["prompt_ids"] + chat["completion_ids"] == sft[0]["input_ids"]


@pytest.mark.parametrize("label", [1, "true", None])
def test_bad_label_names_file_row_and_field(tiny_tokenizer, tmp_path, label):
    from rlhfkit.errors import DataError

    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                           {"prompt": "a", "completion": "b", "label": label}])
    with pytest.raises(DataError) as err:
        _prepare(path, tiny_tokenizer)
    message = str(err.value)
    assert "bad.jsonl" in message and "row 2" in message and "field 'label'" in message and "\n" not in message


def test_pairs_and_rankings_split_into_rows(tiny_tokenizer, tmp_path):
    from rlhfkit.data import expand_to_pairs, load_rows, mismatched_completions, prepare_preferences

    pairs = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(3)]
    path = _jsonl(tmp_path / "pairs.jsonl", pairs)
    records, _ = _prepare(path, tiny_tokenizer)
    assert [r["desirable"] for r in records] == [True, False] * 3
    # the same tokens DPO trains on
    dpo = expand_to_pairs(prepare_preferences(load_rows(path), tiny_tokenizer, max_length=64)[0])
    assert [r["completion_ids"] for r in records] == [ids for g in dpo for ids in g["responses"]]
    # mismatched pairs never reuse the row's own prompt (the split pair shares one)
    kl = mismatched_completions(records, 64)
    for i, rec in enumerate(kl):
        assert rec["responses"][0] == records[i]["completion_ids"]
        donor = next(r for r in records if r["completion_ids"] == rec["responses"][1])
        assert donor["prompt_ids"] != rec["prompt_ids"]
    ranked = _jsonl(tmp_path / "ranked.jsonl", [{"prompt": "Q?", "responses": ["best", "middle", "worst"]}])
    records, _ = _prepare(ranked, tiny_tokenizer)
    assert [r["desirable"] for r in records] == [True, False]  # the middle one has no binary label
    assert len(records[1]["completion_ids"]) == len(tiny_tokenizer("worst", add_special_tokens=False).input_ids) + 1



def test_weight_rule_warns_sets_or_refuses(caplog):
    import logging

    from rlhfkit.errors import ConfigError
    from rlhfkit.trainers.configs import KTOConfig
    from rlhfkit.trainers.kto import resolve_weights

    rows = [{"desirable": True}] * 30 + [{"desirable": False}] * 10
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        assert resolve_weights(KTOConfig(), rows) == (1.0, 1.0)
    assert "outside the KTO paper's [1, 4/3]" in caplog.text and "--undesirable-weight 3" in caplog.text
    assert resolve_weights(KTOConfig(weight_balance="auto"), rows) == (1.0, 3.0)
    assert resolve_weights(KTOConfig(undesirable_weight=2.5), rows) == (1.0, 2.5)  # ratio 1.2: in range
    with pytest.raises(ConfigError, match="30 desirable and 10 undesirable"):
        resolve_weights(KTOConfig(weight_balance="refuse"), rows)
    with pytest.raises(ConfigError, match="--weight-balance must be one of warn, auto, refuse"):
        resolve_weights(KTOConfig(weight_balance="maybe"), rows)


# ------------------------------------------------------------------------------------------------ the trainer

FAST = {"progress_bar": False, "max_length": 48, "num_threads": 2, "seed": 0}


def learnable_rows(n: int, seed: int, split: str) -> list[dict]:
    """Desirable: a polite, correct reply; undesirable: a rude or refusing one (with a wrong answer or none).
    Train and held-out rows never share a question (toy's split)."""
    from toy import preference_rows

    rng = random.Random(seed + 1)
    rows = []
    for row in preference_rows(n, seed=seed, split=split):
        good = rng.random() < 0.5
        completion = row["chosen"] if good else rng.choice(["No. Figure it out yourself.", "Whatever.",
                                                            "I cannot help with that."])
        rows.append({"prompt": row["prompt"], "completion": completion, "label": good})
    return rows


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto_data")
    return {"train": _jsonl(root / "train.jsonl", learnable_rows(48, 0, "train")),
            "eval": _jsonl(root / "eval.jsonl", learnable_rows(32, 1, "eval"))}


@pytest.mark.slow  # 10-40 s on two busy cores
def test_kto_learns_heldout_desirability(tiny_model_dir, kto_data, tmp_path):
    from rlhfkit.trainers.configs import KTOConfig
    from rlhfkit.trainers.kto import run_kto

    summary = run_kto(KTOConfig(model=str(tiny_model_dir), dataset=kto_data["train"], eval_dataset=kto_data["eval"],
                                output_dir=str(tmp_path / "kto"), max_steps=6, per_device_batch_size=8,
                                learning_rate=3e-3, beta=0.1, weight_balance="auto", packing="off", **FAST))
    assert summary["initial_eval_reward_auc"] == pytest.approx(0.5)  # policy == reference: all rewards 0
    assert summary["eval_reward_auc"] >= 0.8, summary
    assert summary["eval_reward_accuracy"] >= 0.8, summary  # rows on the right side of z0
    assert summary["eval_desirable_reward"] > 0 > summary["eval_undesirable_reward"]
    assert summary["train_desirable"] + summary["train_undesirable"] == 48


def test_packed_and_padded_kto_batches_agree(tiny_model_dir, tiny_tokenizer, kto_data):
    """The rows and their mismatched pairs give the same loss and metrics packed (one stream, per-sequence
    attention) as padded."""
    from rlhfkit.data import mismatched_completions
    from rlhfkit.models import load_causal_lm
    from rlhfkit.trainers.common import resolve_packing
    from rlhfkit.trainers.configs import KTOConfig
    from rlhfkit.trainers.kto import KTOTask

    rows, _ = _prepare(kto_data["eval"], tiny_tokenizer, max_length=48)
    records = mismatched_completions(rows[:6], 48)
    policy, reference = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():  # move the reference off the policy, so that r and z0 are not all zero
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = KTOConfig(beta=0.5, packing="on")
    assert resolve_packing(config, policy) and resolve_packing(config, reference)
    results = {}
    for packed in (False, True):
        task = KTOTask(config, tiny_tokenizer.pad_token_id, packed, reference.eval(), [], (1.0, 1.33), lambda t: t)
        loss, metrics = task.compute_loss(policy.eval(), task.collate(records))
        results[packed] = (float(loss.detach()), metrics)
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    assert results[False][1]["kl"][0] > 0  # z0 is in play
    for name, (value, count) in results[False][1].items():
        assert results[True][1][name][1] == count
        assert results[True][1][name][0] == pytest.approx(value, abs=1e-4), name


@pytest.mark.slow  # 10-30 s on two busy cores
def test_kto_lora_precomputed_resume_equals_uninterrupted(tiny_model_dir, kto_data, tmp_path):
    """LoRA (reference = adapters off) with precomputed reference log-probs: stopping after checkpoint 2 and
    resuming ends with the uninterrupted run's weights."""
    import shutil

    from safetensors.torch import load_file

    from rlhfkit.trainers.configs import KTOConfig
    from rlhfkit.trainers.kto import run_kto

    def config(out, **kw):
        return KTOConfig(model=str(tiny_model_dir), dataset=kto_data["train"], output_dir=str(out), max_steps=4,
                         per_device_batch_size=4, learning_rate=3e-3, lora_r=4, precompute_ref=True, save_steps=2,
                         eval_on_start=False, packing="off", **FAST, **kw)

    full = tmp_path / "full"
    summary = run_kto(config(full))
    assert summary["train_reward_accuracy"] > 0.5  # the adapters learned something, so equality means something
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_kto(config(resumed, resume=True))
    want, got = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(want[k], start[k]) for k in start if k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)  # fp32 round-off only


# ------------------------------------------------------------------------------- labelling app -> rlhfkit kto


def test_binary_labels_export_kto_rows_and_train(tiny_model_dir, tmp_path, capsys):
    """Import items, three labellers accept/reject each response through the API (one of them contrary),
    `rlhfkit label export --kind kto` writes majority rows, the admin export agrees, `rlhfkit kto` trains."""
    from fastapi.testclient import TestClient
    from toy import preference_rows

    from rlhfkit.cli import main
    from rlhfkit.label import service
    from rlhfkit.label.db import Database
    from rlhfkit.label.web import create_app

    good = {}
    items = []
    for row in preference_rows(12, seed=3):
        good[row["chosen"]], good[row["rejected"]] = True, False
        items.append({"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]]})
    items_path = tmp_path / "items.jsonl"
    _jsonl(items_path, items)
    db_path = str(tmp_path / "labels.db")
    assert main(["label", "import", "--db", db_path, "--project", "thumbs", str(items_path),
                 "--tasks", "binary", "--overlap", "3"]) == 0
    db = Database(db_path)
    _, admin = service.create_user(db, "admin", "admin")
    client = TestClient(create_app(db))
    for name in ("ann", "bob", "contrarian"):
        token = service.create_user(db, name)[1]
        h = {"Authorization": f"Bearer {token}"}
        while (view := client.post("/api/projects/1/next", headers=h).json()["assignment"]) is not None:
            accept = [good[r] != (name == "contrarian") for r in view["responses"]]  # display order
            r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=h,
                            json={"idempotency_key": f"kto-{name}-{view['assignment_id']:04d}",
                                  "answers": {"binary": {"accept": accept}}})
            assert r.status_code == 201, r.text
    out = tmp_path / "kto.jsonl"
    assert main(["label", "export", "--db", db_path, "--project", "thumbs", "--out", str(out), "--kind", "kto"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24  # every response of every item, labelled by the 2-to-1 majority
    for r in rows:
        assert r["label"] is good[r["completion"]]
        assert r["votes"] == ({"accept": 2, "reject": 1} if r["label"] else {"accept": 1, "reject": 2})
        assert sorted(r["labellers"]) == ["ann", "bob", "contrarian"]
        assert r["completion"] == items[r["item_id"] - 1]["responses"][r["response"]]
    api = client.get("/api/admin/projects/1/export?kind=kto", headers={"Authorization": f"Bearer {admin}"})
    assert api.status_code == 200 and api.json() == rows
    db.dispose()
    capsys.readouterr()
    assert main(["kto", "--model", str(tiny_model_dir), "--dataset", str(out), "--output-dir", str(tmp_path / "kto"),
                 "--max-steps", "2", "--per-device-batch-size", "4", "--no-progress-bar", "--eval-on-start", "false",
                 "--max-length", "48", "--precompute-ref", "true", "--num-threads", "2"]) == 0
    err = capsys.readouterr().err
    assert "24/24 rows kept" in err, err
    summary = json.loads((tmp_path / "kto" / "summary.json").read_text())
    assert summary["train_desirable"] == summary["train_undesirable"] == 12
    assert (tmp_path / "kto" / "ref_logps.pt").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, kto_data, tmp_path):
    """2 processes x 4 rows = 1 process x 8 rows: z0 is gathered over the ranks, so both estimate it on the same
    8 mismatched pairs (under gradient accumulation z0 stays per micro-batch, as in TRL: no equality there)."""
    from test_distributed import _assert_same_run, _launch

    from rlhfkit.cli import main

    args = ["--model", str(tiny_model_dir), "--dataset", kto_data["train"], "--max-steps", "3", "--learning-rate",
            "1e-3", "--no-progress-bar", "--num-threads", "1", "--seed", "3", "--packing", "off", "--max-length", "48"]
    assert main(["kto", *args, "--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    _launch("kto", [*args, "--per-device-batch-size", "4", "--output-dir", str(tmp_path / "two")], "torchrun")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    kl = [json.loads(line).get("kl") for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any(k for k in kl if k)  # z0 was in play


def test_kto_help_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom rlhfkit.cli import main\ntry:\n    main(['kto', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--desirable-weight" in out and "--weight-balance" in out and out.strip().endswith("NO-TORCH")
