"""Trainers learn on held-out data, checkpoints load without rlhfkit, accumulation and packing are exact."""

from __future__ import annotations

import json

import pytest
import torch
from toy import write_toy_task

from rlhfkit.trainers import DPOConfig, RewardConfig, SFTConfig, run_dpo, run_reward, run_sft

FAST = {"progress_bar": False, "max_length": 64, "num_threads": 2, "seed": 0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"), n_train=256, n_eval=128, seed=0)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = run_sft(SFTConfig(model=str(tiny_model_dir), dataset=str(toy["sft_train"]),
                                eval_dataset=str(toy["sft_eval"]), output_dir=str(out), max_steps=40,
                                per_device_batch_size=16, learning_rate=3e-3, **FAST))
    return out, summary


@pytest.mark.slow
def test_sft_lowers_heldout_completion_loss(sft_run):
    out, summary = sft_run
    assert summary["eval_loss"] < 0.6 * summary["initial_eval_loss"], summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    assert json.loads((out / "summary.json").read_text())["eval_loss"] == pytest.approx(summary["eval_loss"])


@pytest.mark.slow
def test_sft_checkpoint_loads_with_plain_transformers(sft_run, toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = sft_run
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    row = json.loads(toy["sft_eval"].read_text().splitlines()[0])
    prompt = tok(row["prompt"]).input_ids
    completion = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(ids).logits.log_softmax(-1)[0, len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None])
    # the saved weights fit the held-out completion about as well as the run's own evaluation says
    assert float(-logps.mean()) < 2.0 * summary["eval_loss"] + 0.5


@pytest.mark.slow
def test_reward_model_beats_chance_on_heldout_pairs(sft_run, toy, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sft_dir, _ = sft_run
    out = tmp_path / "rm"
    summary = run_reward(RewardConfig(model=str(sft_dir), dataset=str(toy["pref_train"]),
                                      eval_dataset=str(toy["pref_eval"]), output_dir=str(out), max_steps=80,
                                      per_device_batch_size=16, learning_rate=1e-3, **FAST))
    # chance is 0.5; a third of the held-out rejected replies differ only by a wrong answer to an unseen
    # question, so the ceiling is about 0.83. 0.7 on 128 pairs is far outside chance (p < 1e-5).
    assert summary["eval_accuracy"] >= 0.7, summary
    assert summary["eval_pairs"] == 128
    # the same accuracy measured by plain transformers on the saved model, no rlhfkit code involved
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    wins = 0
    rows = [json.loads(line) for line in toy["pref_eval"].read_text().splitlines()]
    for row in rows:
        scores = []
        for response in (row["chosen"], row["rejected"]):
            ids = tok(row["prompt"]).input_ids + tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
            with torch.no_grad():
                scores.append(float(model(torch.tensor([ids])).logits[0, 0]))
        wins += scores[0] > scores[1]
    assert wins / len(rows) == pytest.approx(summary["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_raises_heldout_margin(sft_run, toy, tmp_path, precompute):
    sft_dir, _ = sft_run
    summary = run_dpo(DPOConfig(model=str(sft_dir), dataset=str(toy["pref_train"]),
                                eval_dataset=str(toy["pref_eval"]), output_dir=str(tmp_path / "dpo"), max_steps=25,
                                per_device_batch_size=16, learning_rate=5e-4, beta=0.1, precompute_ref=precompute,
                                **FAST))
    assert summary["initial_eval_reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert summary["eval_reward_margin"] > 0.5, summary
    assert summary["eval_reward_accuracy"] > 0.7, summary
    if precompute:
        assert (tmp_path / "dpo" / "ref_logps.pt").exists()


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_gradient_accumulation_equals_large_batch(tiny_model_dir, toy, tmp_path):
    """4 micro-batches of 2 with token-level normalisation over the step == one batch of 8."""
    runs = {}
    for name, (batch, accum) in {"large": (8, 1), "accum": (2, 4)}.items():
        run_sft(SFTConfig(model=str(tiny_model_dir), dataset=str(toy["sft_train"]), output_dir=str(tmp_path / name),
                          max_steps=3, per_device_batch_size=batch, gradient_accumulation_steps=accum,
                          learning_rate=1e-3, max_grad_norm=0.0, eval_on_start=False, **FAST))
        runs[name] = _weights(tmp_path / name)
    start = _weights(tiny_model_dir)
    moved = max(float((runs["large"][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for key in runs["large"]:
        torch.testing.assert_close(runs["accum"][key], runs["large"][key], atol=2e-6, rtol=1e-5)


def test_logits_only_at_loss_positions_equal_the_full_forward(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The LM head at response positions only (logits_to_keep mask) gives the full forward's log-probs and
    gradients; a model without mask support falls back to full logits with the same result."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from rlhfkit.data import collate_sequences, prepare_sft
    from rlhfkit.losses import sequence_logprob_sums, token_logprobs
    from rlhfkit.models import forward

    rows = [{"prompt": "what is the sea", "completion": "blue water"}, {"prompt": "hi", "completion": "hello"},
            {"prompt": "a longer question about the sky", "completion": "x"}]
    records, _ = prepare_sft(Dataset.from_list(rows), tiny_tokenizer, 64)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert forward.supports_logits_mask(lm)
    for packed in (False, True):
        batch = collate_sequences(records, tiny_tokenizer.pad_token_id, packed)
        logits = lm(**forward.forward_inputs(batch)).logits
        reference = sequence_logprob_sums(token_logprobs(logits.double() / 0.7, batch["input_ids"]),
                                          batch["loss_mask"], batch.get("sequence_index"), 3)
        (ref_grad,) = torch.autograd.grad(reference.sum(), lm.lm_head.weight)
        fast = forward.sequence_logps(lm, batch, temperature=0.7)
        (fast_grad,) = torch.autograd.grad(fast.sum(), lm.lm_head.weight)
        torch.testing.assert_close(fast.double(), reference, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5, rtol=1e-5)
        kept, _ = forward.loss_logits(lm, batch)
        assert kept.shape == (int(batch["num_loss_tokens"]), lm.config.vocab_size)
        monkeypatch.setitem(forward._LOGITS_MASK_SUPPORT, type(lm), False)  # the fallback: same numbers
        torch.testing.assert_close(forward.sequence_logps(lm, batch, temperature=0.7), fast, atol=1e-6, rtol=0)
        monkeypatch.setitem(forward._LOGITS_MASK_SUPPORT, type(lm), True)


def test_packed_and_padded_batches_give_same_logprobs_and_rewards(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.data import collate_groups
    from rlhfkit.models.attention import PACKED_ATTENTION, use_packed_attention
    from rlhfkit.models.forward import reward_scores, sequence_logps, supports_packing

    tok = tiny_tokenizer
    groups = []
    for i, (p, a, b) in enumerate([("What is one plus two?", "Three.", "I will not say it at all."),
                                   ("Hi", "Hello there, friend of mine!", "Go"),
                                   ("What color is the sky today and tomorrow?", "Blue", "Red")]):
        groups.append({"prompt_ids": tok(p).input_ids,
                       "responses": [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id],
                                     tok(b, add_special_tokens=False).input_ids[: 1 + i] + [tok.eos_token_id]],
                       "ranks": [0, 1], "margin": 0.0})
    # two sequences of one length side by side: the packed attention batches such runs into one call
    same = tok("Same length twice", add_special_tokens=False).input_ids
    groups.append({"prompt_ids": tok("Echo").input_ids, "responses": [same + [tok.eos_token_id],
                   same[::-1] + [tok.eos_token_id]], "ranks": [0, 1], "margin": 0.0})
    # a ranking of three (lengths 2, 1, 2: two runs of one length split by another) after a pair with the
    # same prompt: adjacent groups with one prompt share one copy of it too
    again = tok("Echo").input_ids
    groups.append({"prompt_ids": again, "responses": [same[:2], [tok.eos_token_id], same[1:3]],
                   "ranks": [0, 1, 2], "margin": 0.0})
    packed = collate_groups(groups, tok.pad_token_id, packed=True)
    padded = collate_groups(groups, tok.pad_token_id, packed=False)
    shared = collate_groups(groups, tok.pad_token_id, packed=True, share_prompts=True)
    prompt_tokens = [len(g["prompt_ids"]) for g in groups]
    # each pair's prompt once, the last two groups' one prompt once for all five of their responses
    assert shared["num_tokens"] == packed["num_tokens"] - sum(prompt_tokens[:3]) - 4 * len(again)
    for key in ("group_index", "ranks", "margins"):
        torch.testing.assert_close(shared[key], packed[key])
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert supports_packing(lm)
    with torch.no_grad():
        padded_logps = sequence_logps(lm, padded)
        # transformers' block-diagonal mask over the packed row, then rlhfkit's per-sequence attention
        torch.testing.assert_close(sequence_logps(lm, packed), padded_logps, atol=1e-5, rtol=1e-5)
        assert use_packed_attention(lm) and lm.config._attn_implementation == PACKED_ATTENTION
        torch.testing.assert_close(sequence_logps(lm, packed), padded_logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sequence_logps(lm, padded), padded_logps, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sequence_logps(lm, shared), padded_logps, atol=1e-5, rtol=1e-5)
    # and the gradients: per-sequence attention backpropagates into each sequence's own slice only
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5, 1.5, -0.75, 0.3])
    grads = []
    for batch in (packed, padded, shared):
        lm.zero_grad()
        (sequence_logps(lm, batch) * weights).sum().backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for g_packed, g_padded, g_shared in zip(*grads, strict=True):
        torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g_shared, g_padded, atol=1e-5, rtol=1e-4)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    assert use_packed_attention(rm)
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, packed), reward_scores(rm, padded), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reward_scores(rm, shared), reward_scores(rm, padded), atol=1e-5, rtol=1e-5)
    rm_grads = []
    for batch in (shared, padded):  # the reward model's gradients through the shared prompt's copy
        rm.zero_grad()
        (reward_scores(rm, batch) * weights).sum().backward()
        rm_grads.append([p.grad.clone() for p in rm.parameters()])
    for g_shared, g_padded in zip(*rm_grads, strict=True):
        torch.testing.assert_close(g_shared, g_padded, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        # and both equal transformers' own pooling on one unpadded sequence at a time
        for m, ids in enumerate(padded["input_ids"]):
            n = int(padded["attention_mask"][m].sum())
            ref = rm(ids[None, :n]).logits[0, 0]
            assert float(reward_scores(rm, packed)[m]) == pytest.approx(float(ref), abs=1e-5)


def test_shared_prompt_layout_by_hand():
    from rlhfkit.data import pack_shared_prompts

    batch = pack_shared_prompts([[5, 6, 7], [5, 6, 7], [9], [5, 6, 7]], [[1, 2], [3], [4, 4, 4], [8]])
    # prompt [5 6 7] once for the first two pairs; the last pair's equal prompt is not adjacent: own copy
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3, 9, 4, 4, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["loss_index"].tolist() == [2, 3, 2, 6, 7, 8, 12]  # first response tokens: the prompt's last
    assert batch["loss_targets"].tolist() == [1, 2, 3, 4, 4, 4, 8]
    assert batch["loss_sequence"].tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert batch["last_index"].tolist() == [4, 5, 9, 13]
    assert batch["prompt_groups"] == ((0, 3, (2, 1)), (6, 1, (3,)), (10, 3, (1,)))
    assert (batch["num_sequences"], batch["num_tokens"], batch["num_loss_tokens"]) == (4, 14, 7)


@pytest.mark.parametrize("arch", ["llama", "qwen2_gqa", "mistral_window"])
def test_shared_prompt_batches_equal_whole_sequences(arch, tiny_model_dir, monkeypatch):
    """A group's samples packed with one copy of their prompt give the log-probs and the gradients of the
    same samples packed whole (the prompt repeated per sample), on a model with grouped-query attention too,
    and with a sliding window shorter than the sequences. Responses shorter and longer than their prompt take
    the two attention paths (masked; causal over prompt + response)."""
    from transformers import (
        AutoModelForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from rlhfkit.data import pack_batch, pack_shared_prompts
    from rlhfkit.losses import selected_token_logprobs
    from rlhfkit.models import forward
    from rlhfkit.models.attention import use_packed_attention

    torch.manual_seed(0)
    if arch == "llama":
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    elif arch == "mistral_window":
        lm = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
    else:
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    assert use_packed_attention(lm)
    lm.eval()
    vocab = lm.get_input_embeddings().num_embeddings
    ids = lambda n: torch.randint(3, vocab, (n,)).tolist()  # noqa: E731
    first, second = ids(6), ids(3)
    prompts = [first] * 4 + [second, first, first]
    # equal-length runs (one batched call each), a 1-token response, and a repeat of a prompt after another
    responses = [ids(5), ids(5), ids(2), ids(1), ids(7), ids(4), ids(4)]
    shared = pack_shared_prompts(prompts, responses)
    whole = pack_batch([p + r for p, r in zip(prompts, responses)],
                       [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)])
    assert shared["num_tokens"] == whole["num_tokens"] - 4 * len(first)  # 3 + 1 repeats of it saved
    torch.testing.assert_close(forward.loss_targets(shared), forward.loss_targets(whole))
    torch.testing.assert_close(forward.loss_sequence_ids(shared), forward.loss_sequence_ids(whole))
    weights = torch.randn(shared["num_loss_tokens"])
    assert forward.supports_logits_index(lm)  # the probe's answer; then both paths are forced below
    results = []
    for batch, index_support in ((whole, True), (shared, True), (shared, False)):
        monkeypatch.setitem(forward._LOGITS_INDEX_SUPPORT, type(lm), index_support)
        lm.zero_grad()
        logits, _ = forward.loss_logits(lm, batch)
        logps = selected_token_logprobs(logits, forward.loss_targets(batch))
        (logps * weights).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in lm.parameters()]))
    for logps, grads in results[1:]:
        torch.testing.assert_close(logps, results[0][0], atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_models_load_without_hub_kernels(tiny_model_dir):
    """transformers >= 5 kernelizes by default (fetching Hub kernels at train() on CUDA); rlhfkit's loaders
    keep the checkpoint's own code, so a run is offline and its numerics are the model's."""
    from rlhfkit.models import load_causal_lm, load_reward_model

    for model in (load_causal_lm(tiny_model_dir), load_reward_model(tiny_model_dir)):
        assert getattr(model, "use_kernels", False) is False


def test_shared_prompts_train_as_whole_sequences(tiny_model_dir, toy, tmp_path):
    """The reward model on rankings and DPO on pairs with each prompt packed once for its responses (the
    default) log the losses and gradient norms of the same runs with every response packed whole, step by step,
    and the shared runs put fewer tokens through the model."""
    from toy import ranked_rows, write_jsonl

    ranked = write_jsonl(ranked_rows(64, seed=3), tmp_path / "ranked.jsonl")
    runs = {"rm": (run_reward, RewardConfig, ranked, 1e-3, ("loss", "grad_norm", "accuracy", "reward_mean")),
            "dpo": (run_dpo, DPOConfig, toy["pref_train"], 5e-4, ("loss", "grad_norm", "reward_margin"))}
    for name, (run, config_class, data, lr, keys) in runs.items():
        rows, summaries = [], []
        for share in (True, False):
            out = tmp_path / f"{name}-{share}"
            summaries.append(run(config_class(model=str(tiny_model_dir), dataset=str(data), output_dir=str(out),
                                              max_steps=4, per_device_batch_size=8, learning_rate=lr,
                                              share_prompts=share, eval_on_start=False, **FAST)))
            rows.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                         if '"loss"' in line])
        assert [s["shared_prompts"] for s in summaries] == [True, False], name
        assert len(rows[0]) == len(rows[1]) == 4
        assert rows[0][-1]["loss"] != rows[0][0]["loss"]  # training moved, so step-by-step equality means something
        for shared, whole in zip(*rows, strict=True):
            for key in keys:
                assert shared[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), (name, shared["step"], key)
            # the same step put fewer tokens through the model (the rate logged counts processed tokens)
            assert shared["tokens_per_s"] * shared["step_time_s"] < whole["tokens_per_s"] * whole["step_time_s"]


def test_gradient_checkpointing_trains_the_same_weights(tiny_model_dir, toy, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes activations in backward: SFT (packed rows) and DPO end with the
    weights of the same runs without it, so the option trades time for memory and nothing else; and it is on
    (each decoder layer's MLP runs again in backward, so more MLP calls per run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # the MLP inside a layer, not the layer: transformers wraps a layer's own forward to checkpoint it, and
    # replacing that forward would switch the checkpointing off
    mlp_class = type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).model.layers[0].mlp)
    calls = [0]
    original = mlp_class.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mlp_class, "forward", counted)
    for name, (run, config_class, data) in {"sft": (run_sft, SFTConfig, toy["sft_train"]),
                                            "dpo": (run_dpo, DPOConfig, toy["pref_train"])}.items():
        weights, mlp_calls = {}, {}
        for checkpointing in (False, True):  # the first run also holds the packing probe's calls
            out = tmp_path / f"{name}-{checkpointing}"
            calls[0] = 0
            run(config_class(model=str(tiny_model_dir), dataset=str(data), output_dir=str(out), max_steps=3,
                             per_device_batch_size=4, learning_rate=1e-3, max_grad_norm=0.0,
                             gradient_checkpointing=checkpointing, eval_on_start=False, **FAST))
            weights[checkpointing], mlp_calls[checkpointing] = _weights(out), calls[0]
        assert mlp_calls[True] > mlp_calls[False] > 0, (name, mlp_calls)
        start = _weights(tiny_model_dir)
        assert max(float((weights[False][k] - start[k]).abs().max()) for k in start) > 1e-4, name  # it trained
        for key in start:
            torch.testing.assert_close(weights[True][key], weights[False][key], atol=2e-6, rtol=1e-5, msg=name)
