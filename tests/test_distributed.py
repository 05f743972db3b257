"""Every trainer under several processes on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 end with the same
weights as one process on the same global batch, checkpoints resume, and final weights load in plain
transformers.

Each run launches 2 real processes with `torchrun` or `accelerate launch --config_file examples/accelerate/...`
(the configs users are told to run). Tolerance: float32 sums reduced in another order differ by ~1e-6 after
a few Adam steps of size 1e-3; a wrong split of the data or a wrong loss normalisation moves weights by
~1e-3 and the per-step loss and gradient norm by far more than the 1e-5 / 1e-4 relative bounds below.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "accelerate"
WEIGHT_TOLERANCE = 2e-5
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-4
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_data")
    gen = torch.Generator().manual_seed(0)
    sft, pref = [], []
    for _ in range(48):
        a, b = (int(x) for x in torch.randint(0, 10, (2,), generator=gen))
        sft.append({"prompt": f"What is {a} plus {b}?", "completion": f" It is {a + b}."})
        pref.append({"prompt": f"What is {a} plus {b}?", "chosen": f" It is {a + b}.",
                     "rejected": f" It is {a + b + 1}, I think."})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n"
                                                for i in range(32)))
    (root / "reward.py").write_text("def count_e(prompts, responses):\n"
                                    "    return [r.count('e') / 4.0 for r in responses]\n")
    return root


def _args(trainer: str, model: Path, data: Path, steps: int = 3) -> list[str]:
    common = ["--model", str(model), "--max-steps", str(steps), "--learning-rate", "1e-3", "--no-progress-bar",
              "--num-threads", "1", "--seed", "3"]
    if trainer == "sft":
        return common + ["--dataset", str(data / "sft.jsonl")]
    if trainer in ("dpo", "rm", "kto", "simpo"):
        return common + ["--dataset", str(data / "pref.jsonl")]
    # PPO, REINFORCE++: top-k 1 makes sampling deterministic, so one process and two sample the same responses; one
    # PPO epoch over one minibatch makes the step a single optimizer update on the whole rollout.
    return common + ["--dataset", str(data / "prompts.jsonl"), "--reward-fn", f"{data / 'reward.py'}:count_e",
                     "--max-new-tokens", "10", "--num-generations", "2", "--top-k", "1", "--ppo-epochs", "1",
                     "--num-minibatches", "1", "--reward-normalize", "--eval-on-start", "false",
                     *(["--advantage", "reinforce_pp"] if trainer == "gspo" else [])]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(trainer: str, args: list[str], launcher: str) -> None:
    """Run `rlhfkit TRAINER ARGS` in 2 processes: launcher 'torchrun' or an examples/accelerate config name."""
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / f"{launcher}.yaml"), "--num_processes", "2", "--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd + ["-m", "rlhfkit", trainer, *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{launcher} {trainer} failed:\n{proc.stderr[-4000:]}"


def _per_step(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _assert_same_run(reference: Path, other: Path) -> float:
    """Same per-step loss and gradient norm, same final weights; returns the largest weight difference."""
    ref_rows, rows = _per_step(reference), _per_step(other)
    assert sorted(rows) == sorted(ref_rows)
    for step, row in ref_rows.items():
        assert rows[step]["loss"] == pytest.approx(row["loss"], rel=LOSS_RTOL, abs=1e-7), step
        assert rows[step]["grad_norm"] == pytest.approx(row["grad_norm"], rel=GRAD_NORM_RTOL), step
    a, b = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff < WEIGHT_TOLERANCE, diff
    return diff


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The single-process runs every launch is compared with (global batch 8), made once per trainer."""
    runs: dict[str, Path] = {}

    def get(trainer: str) -> Path:
        if trainer not in runs:
            out = tmp_path_factory.mktemp(f"single_{trainer}")
            online = trainer in ("ppo", "reinforce_pp", "gspo")
            batch = ["--prompts-per-step", "8", "--per-device-batch-size", "16"] if online else \
                ["--per-device-batch-size", str(GLOBAL_BATCH)]
            steps = 1 if online else 3
            assert main([trainer, *_args(trainer, tiny_model_dir, data, steps), *batch, "--output-dir", str(out)]) == 0
            runs[trainer] = out
        return runs[trainer]

    return get


@pytest.mark.parametrize("launcher,trainer", [("torchrun", "sft"), ("ddp", "rm"), ("torchrun", "dpo")])
def test_ddp_with_accumulation_equals_one_process(launcher, trainer, tiny_model_dir, data, one_process, tmp_path):
    """2 processes x 2 micro-batches of 2 = one process with a batch of 8: exact token/pair normalisation."""
    out = tmp_path / "ddp"
    _launch(trainer, [*_args(trainer, tiny_model_dir, data), "--per-device-batch-size", "2",
                      "--gradient-accumulation-steps", "2", "--output-dir", str(out)], launcher)
    _assert_same_run(one_process(trainer), out)
    # the training moved the weights far more than the tolerance: the comparison has teeth
    start, end = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert max(float((start[k] - end[k]).abs().max()) for k in start.keys() & end.keys()) > 50 * WEIGHT_TOLERANCE


@pytest.mark.parametrize("launcher,trainer", [("fsdp2", "sft"), ("fsdp2", "dpo"), ("zero2", "sft"),
                                              ("zero3", "sft"), ("zero3", "dpo"), ("fsdp2", "kto"),
                                              ("zero3", "simpo")])
def test_sharded_runs_equal_one_process_save_plain_checkpoints_and_resume(launcher, trainer, tiny_model_dir,
                                                                          data, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / launcher
    args = [*_args(trainer, tiny_model_dir, data), "--per-device-batch-size", str(GLOBAL_BATCH // 2),
            "--save-steps", "2"]
    _launch(trainer, [*args, "--output-dir", str(out)], launcher)
    _assert_same_run(one_process(trainer), out)
    # the gathered final weights are an ordinary checkpoint: no rlhfkit, no DeepSpeed/FSDP needed to load it
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(p.detach(), saved[name]) for name, p in model.named_parameters() if name in saved)
    if trainer == "sft" and launcher != "zero2":
        # stopped after step 2 with its (sharded) checkpoint, resumed to step 3: the uninterrupted weights
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
        _launch(trainer, [*args, "--output-dir", str(resumed), "--resume"], launcher)
        again = load_file(resumed / "model.safetensors")
        assert max(float((saved[k] - again[k]).abs().max()) for k in saved) < WEIGHT_TOLERANCE
        assert sorted(_per_step(resumed)) == [3]


@pytest.mark.parametrize("launcher,trainer", [("torchrun", "ppo"), ("zero3", "ppo"), ("fsdp2", "ppo"),
                                              ("torchrun", "reinforce_pp"), ("torchrun", "gspo")])
def test_rl_two_processes_match_the_first_update(launcher, trainer, tiny_model_dir, data, one_process, tmp_path):
    """Rollouts split over ranks; whitening, reward normalisation and the token-level loss use all of them
    (REINFORCE++ whitens its advantages over the whole batch: both ranks' tokens; GSPO's sequence-level loss
    is a mean over both ranks' responses, here with REINFORCE++ advantages: top-k 1 samples a group's
    responses alike, so a group baseline would leave nothing to learn). Under ZeRO-3 sampling
    runs on gathered weights (transformers' decode loop: ZeRO-3 re-partitions after each module forward)
    and the reference in a DeepSpeed inference engine; under FSDP2 the lean decode step runs on the
    unsharded weights."""
    out = tmp_path / f"{trainer}_{launcher}"
    _launch(trainer, [*_args(trainer, tiny_model_dir, data, steps=1), "--prompts-per-step", "4",
                      "--per-device-batch-size", "8", "--output-dir", str(out)], launcher)
    reference = one_process(trainer)
    _assert_same_run(reference, out)
    row, ref_row = _per_step(out)[1], _per_step(reference)[1]
    assert ref_row["grad_norm"] > 1e-3  # an update that moves the weights, so equal runs say something
    for key in ("reward_mean", "reward_std", "kl", "response_length") + (("value_loss",) if trainer == "ppo" else ()):
        assert row[key] == pytest.approx(ref_row[key], rel=1e-5, abs=1e-6), key
