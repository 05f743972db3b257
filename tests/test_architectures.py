"""Models as people bring them: SFT, RM, DPO, PPO and GRPO on tiny GPT-2, GPT-NeoX, Phi-3, Gemma-2 and Qwen3
models built from their transformers configs; and dropout, off by default in RL and preference training.

Before any update the policy that sampled a rollout is the policy being trained: the first minibatch's
ratio pi/pi_old is 1 and the trainer's log-probs equal the sampler's, whatever the architecture; a model
with dropout (GPT-2's 0.1) breaks both unless dropout is off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from toy import write_toy_task

from rlhfkit.trainers import DPOConfig, RewardConfig, SFTConfig, run_dpo, run_reward, run_sft
from rlhfkit.trainers.rl import GRPOConfig, PPOConfig, run_rl

ARCHITECTURES = ("gpt2", "gpt_neox", "phi3", "gemma2", "qwen3")
# fp32 everywhere: on a GPU, precision auto is bf16, whose rounding alone moves the ratio by ~1e-2
COMMON = {"progress_bar": False, "precision": "fp32", "max_length": 48, "num_threads": 2, "seed": 0,
          "max_steps": 1, "eval_on_start": False, "per_device_batch_size": 4}
RL = {"max_new_tokens": 8, "prompts_per_step": 2, "num_generations": 2, "learning_rate": 1e-3,
      "num_minibatches": 1, "ppo_epochs": 1, "logprob_check_tolerance": 1e-5}


def _config(arch: str, vocab: int, tok):
    """A 1-2 layer config of ``arch`` sized for speed; GPT-2 keeps its default dropouts (0.1)."""
    from transformers import AutoConfig

    ids = {"vocab_size": vocab, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 128}
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=128, **ids)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **small, **ids)
    if arch == "phi3":  # a sliding window (Phi-3-mini's is 2047) shorter than the test's sequences
        return AutoConfig.for_model("phi3", **small, num_key_value_heads=1, sliding_window=16, **ids)
    if arch == "gemma2":  # a sliding and a global layer; soft-capped attention and logits
        return AutoConfig.for_model("gemma2", **{**small, "num_hidden_layers": 2}, num_key_value_heads=1,
                                    head_dim=16, sliding_window=16, **ids)
    return AutoConfig.for_model("qwen3", **small, num_key_value_heads=1, head_dim=16, **ids)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_data")
    toy = write_toy_task(root, n_train=16, n_eval=4, seed=0)
    (root / "reward.py").write_text("def count_e(prompts, responses):\n"
                                    "    return [r.count('e') / 4.0 for r in responses]\n")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n"
                                                for i in range(8)))
    return {**toy, "root": root}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory, tiny_tokenizer):
    """(name, causal LM folder, reward model folder) of one architecture."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = request.param
    config = _config(name, len(tiny_tokenizer), tiny_tokenizer)
    config.num_labels = 1
    root = tmp_path_factory.mktemp(name)
    folders = []
    for kind, cls in (("lm", AutoModelForCausalLM), ("rm", AutoModelForSequenceClassification)):
        torch.manual_seed(0)
        cls.from_config(config).save_pretrained(root / kind)
        tiny_tokenizer.save_pretrained(root / kind)
        folders.append(root / kind)
    return name, *folders


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _first_train_loss(out: Path) -> float:
    """The loss of the first optimizer step: computed on the starting weights, before the update."""
    losses = [r["loss"] for r in _rows(out) if r["step"] >= 1 and "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return losses[0]


def test_sft_rm_dpo_run_and_only_sft_keeps_dropout(arch, files, tmp_path):
    """One step of each offline trainer. The step's batch is the whole training set and the evaluation set
    is that same set, so the first train loss equals the evaluation at step 0 (eval mode) exactly when
    dropout is off: in RM and DPO for every architecture (DPO's loss is then log 2, the policy being the
    reference); SFT keeps GPT-2's dropout (0.1), as TRL does."""
    name, lm, rm = arch
    runs = {"sft": (SFTConfig, run_sft, lm, "sft_train"), "rm": (RewardConfig, run_reward, rm, "pref_train"),
            "dpo": (DPOConfig, run_dpo, lm, "pref_train")}
    first, initial = {}, {}
    for trainer, (cls, run, model, data) in runs.items():
        out = tmp_path / trainer
        summary = run(cls(model=str(model), dataset=str(files[data]), eval_dataset=str(files[data]),
                          output_dir=str(out), **{**COMMON, "eval_on_start": True, "per_device_batch_size": 16,
                                                  "per_device_eval_batch_size": 16}))
        first[trainer], initial[trainer] = _first_train_loss(out), summary["initial_eval_loss"]
    assert first["rm"] == pytest.approx(initial["rm"], abs=1e-5), name
    assert first["dpo"] == pytest.approx(initial["dpo"], abs=1e-5), name
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-5), name
    if name == "gpt2":
        assert abs(first["sft"] - initial["sft"]) > 1e-3  # dropout on in SFT's training forward
    else:  # no dropout in these configs: the same number in train and eval mode
        assert first["sft"] == pytest.approx(initial["sft"], abs=1e-5), name


def _rl_config(algorithm: str, lm: Path, rm: Path, files: dict, out: Path, **overrides):
    if algorithm == "ppo":  # a reward model scores, and a copy of it is the critic (value model)
        return PPOConfig(model=str(lm), dataset=str(files["root"] / "prompts.jsonl"), output_dir=str(out),
                         reward_model=str(rm), critic="reward_model", **{**COMMON, **RL, **overrides})
    return GRPOConfig(model=str(lm), dataset=str(files["root"] / "prompts.jsonl"), output_dir=str(out),
                      reward_fn=f"{files['root'] / 'reward.py'}:count_e", **{**COMMON, **RL, **overrides})


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_first_minibatch_has_ratio_one(algorithm, arch, files, tmp_path):
    """One rollout, one minibatch, one epoch: the ratio and the trainer-vs-sampler gap of the update's
    forward (train mode, packed) and of the rollout's check (eval mode) before any update."""
    name, lm, rm = arch
    out = tmp_path / algorithm
    summary = run_rl(_rl_config(algorithm, lm, rm, files, out))
    assert summary["packing"], name  # the packed forward (and its attention) is what is checked
    # a group's samples share one copy of their prompt in rlhfkit's attention (Gemma-2 keeps its eager one)
    assert summary["shared_prompts"] == (name != "gemma2"), name
    row = [r for r in _rows(out) if "ratio" in r][0]
    assert abs(row["ratio"] - 1) < 1e-5, (name, row)
    assert row["rollout_logprob_mismatch"] < 1e-5, (name, row)  # first minibatch, train mode
    assert row["rollout_logprob_diff_mean"] < 1e-5, (name, row)  # the rollout's check, eval mode
    if name == "gpt2":  # the saved model keeps the dropout it was configured with
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(out)
        assert (saved.resid_pdrop, saved.attn_pdrop, saved.embd_pdrop) == (0.1, 0.1, 0.1)


def test_keep_dropout_keeps_it(files, tmp_path, tiny_tokenizer):
    """``--keep-dropout`` (CLI) leaves GPT-2's dropout on: the first minibatch then sees the noise that
    the default removes; and a loaded model in train mode gives two different forwards with it, equal
    ones without it."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.cli import main
    from rlhfkit.models.dropout import apply_dropout_setting

    lm = tmp_path / "gpt2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("gpt2", len(tiny_tokenizer), tiny_tokenizer)).save_pretrained(lm)
    tiny_tokenizer.save_pretrained(lm)
    ids = torch.arange(3, 19)[None]
    for keep in (True, False):
        model = apply_dropout_setting(AutoModelForCausalLM.from_pretrained(lm), keep=keep).train()
        differ = not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        assert differ == keep
    out = tmp_path / "grpo"
    code = main(["grpo", "--model", str(lm), "--dataset", str(files["root"] / "prompts.jsonl"),
                 "--output-dir", str(out), "--reward-fn", f"{files['root'] / 'reward.py'}:count_e",
                 "--keep-dropout", "--max-steps", "1", "--max-new-tokens", "8", "--num-generations", "2",
                 "--prompts-per-step", "2", "--no-progress-bar", "--num-threads", "2", "--max-length", "48",
                 "--precision", "fp32"])
    assert code == 0
    row = [r for r in _rows(out) if "ratio" in r][0]
    assert row["rollout_logprob_mismatch"] > 1e-3, row  # dropout noise in the update's forward
    assert row["rollout_logprob_diff_mean"] < 1e-5, row  # the check runs in eval mode: no dropout there
