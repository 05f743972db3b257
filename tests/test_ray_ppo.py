"""PPO on Ray (extra ``distributed``): separate policy, critic, reference, reward and rollout groups on a local
Ray cluster (CPU only), the tiny programmatic task of test_rl.py (reward = share of the letter 'e').

One Ray session for the module (``ray.init`` costs seconds; each run still starts its own actors).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import ray  # the distributed extra (make test installs it)
import torch

from rlhfkit.cli import main
from rlhfkit.distributed import run_ray_rl, with_ray_options
from rlhfkit.engine import TrainingError
from rlhfkit.errors import ConfigError
from rlhfkit.trainers.rl import PPOConfig, run_rl

RayPPOConfig = with_ray_options(PPOConfig)  # PPOConfig with the Ray launcher's options (--ray ...)

# PPO settings shared by the single-process and the Ray run (16 prompts a step: 8 per policy worker on Ray)
TASK = dict(max_new_tokens=16, num_generations=1, ppo_epochs=2, kl_coef=0.05, learning_rate=1e-2, num_threads=1,
            progress_bar=False, eval_on_start=False)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _settings(model_dir: Path, count_e_files: Path, out: Path, **overrides) -> dict:
    return {"model": str(model_dir), "dataset": str(count_e_files / "prompts.jsonl"), "output_dir": str(out),
            "reward_fn": f"{count_e_files / 'reward.py'}:count_e", **TASK, **overrides}


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]


def _mean(rows: list[dict], key: str = "reward_mean") -> float:
    return statistics.fmean(r[key] for r in rows)


@pytest.mark.slow
def test_per_role_groups_raise_reward_and_rollout_weights_equal_policy(ray_session, tiny_model_dir, count_e_files,
                                                                       tmp_path):
    """Two policy and two rollout workers, a critic, reference and reward worker each: the rollout workers
    hold the policy's exact weights before every rollout, and the reward rises (as it does in the
    single-process runs of this task in test_rl.py)."""
    steps = 24
    synced: list[int] = []

    def check_weights(step: int, cluster) -> None:
        """Fetched here only (the run itself broadcasts): every rollout worker's tensors equal policy rank 0's."""
        policy = cluster.call("policy", "policy_state", ranks=[0])[0]
        for rank, got in enumerate(cluster.call("rollout", "policy_state")):
            assert got.keys() == policy.keys()
            for name, tensor in policy.items():
                assert torch.equal(got[name], tensor), (step, rank, name)
        synced.append(step)

    out = tmp_path / "ray"
    config = RayPPOConfig(**_settings(tiny_model_dir, count_e_files, out, prompts_per_step=8, max_steps=steps,
                                      ray=True, ray_placement="per_role", ray_policy_workers=2, ray_rollout_workers=2,
                                      ray_cpus_per_worker=0.5, ray_timeout_s=120, ray_check_sync=True))
    summary = run_ray_rl(config, on_sync=check_weights)

    assert synced == list(range(steps))  # a broadcast before every rollout, each one exact
    assert summary["ray"]["workers"] == {"policy": 2, "critic": 1, "reference": 1, "reward": 1, "rollout": 2}
    ray_rows = _rows(out)
    assert [r["step"] for r in ray_rows] == list(range(1, steps + 1))
    assert max(r["rollout_logprob_mismatch"] for r in ray_rows) < 1e-4
    first, last = _mean(ray_rows[:6]), _mean(ray_rows[-6:])
    print(f"reward first/last 6 steps: ray {first:.3f} -> {last:.3f}")
    # +1.0 is > 10x the noise of a 6-step mean at the start (per-response std ~0.45 over 96 responses)
    assert last > first + 1.0
    assert ray_rows[0]["rollout_logprob_mismatch"] < 1e-4  # rollout workers and trainer agree on log-probs
    assert ray_rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the starting policy
    assert all(r["value_loss"] > 0 for r in ray_rows)
    assert (out / "model.safetensors").exists() and (out / "critic" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo"])  # "grpo" passes too (~15 s more)
def test_one_worker_per_role_reproduces_the_single_process_run(algorithm, ray_session, tiny_model_dir, count_e_files,
                                                               tmp_path):
    """With one worker per role the Ray run is the single-process run spread over roles: same prompts, same
    sampling generator, same losses, GAE and optimizer, weights copied exactly. PPO uses a separate value model
    in both (--critic reward_model) and no gradient clipping, which would couple policy and critic through
    their joint norm in the single-process run."""
    from rlhfkit.models.tiny import build_tiny_model
    from rlhfkit.trainers.rl import GRPOConfig

    if algorithm == "grpo":
        cls, settings = GRPOConfig, dict(num_generations=4, prompts_per_step=2, kl_coef=0.04)
    else:
        rm = str(build_tiny_model(tmp_path / "rm", reward=True))
        cls, settings = PPOConfig, dict(prompts_per_step=8, num_minibatches=2, critic="reward_model",
                                        reward_fn=None, reward_model=rm, max_grad_norm=0.0, kl_target=1.0)
    single, spread = tmp_path / "single", tmp_path / "ray"
    run_rl(cls(**_settings(tiny_model_dir, count_e_files, single, max_steps=3, **settings)))
    run_ray_rl(with_ray_options(cls)(**_settings(tiny_model_dir, count_e_files, spread, max_steps=3, **settings,
                                                 ray=True, ray_placement="colocated", ray_cpus_per_worker=1.0)))
    keys = ["reward_mean", "kl", "beta", "loss", "policy_loss", "entropy", "clip_frac", "response_length"]
    if algorithm == "ppo":
        keys += ["value_loss", "explained_variance", "value_mean"]
    # the single-process keys, so `rlhfkit report` reads it (the step-1 rollout/trainer log-prob check is the
    # single-process trainer's; on Ray `rollout_logprob_mismatch` of the first minibatch measures the same)
    checked = {"rollout_logprob_diff_mean", "rollout_logprob_diff_max", "rollout_importance_ratio_mean"}
    assert set(_rows(single)[0]) - checked <= set(_rows(spread)[0])
    for a, b in zip(_rows(single), _rows(spread), strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)  # fp32 round-off


def _kill_when(path: Path, workers_file: Path, role: str, rank: int, killed: dict) -> threading.Thread:
    """Kill (SIGKILL) worker ``role`` ``rank`` of the run once ``path`` exists (a run's checkpoint)."""

    def kill() -> None:
        deadline = time.monotonic() + 300
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = next(w for w in json.loads(workers_file.read_text()) if w["role"] == role and w["rank"] == rank)
        os.kill(worker["pid"], signal.SIGKILL)
        killed["at"] = time.monotonic()

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_killed_workers_end_the_run_with_a_named_error_and_a_resumable_checkpoint(
        ray_session, tiny_model_dir, count_e_files, tmp_path, capsys):
    out = tmp_path / "colocated"
    # colocated: process 0 runs rank 0 of every role, process 1 policy[1], critic[1], reward[1], rollout[1]
    # (its rollout worker copies policy rank 1's weights in place), process 2 reward[2] alone
    argv = ["ppo", "--ray", "--ray-placement", "colocated", "--ray-policy-workers", "2", "--ray-critic-workers", "2",
            "--ray-reward-workers", "3", "--ray-rollout-workers", "2", "--ray-check-sync", "--ray-cpus-per-worker",
            "0.5", "--ray-timeout-s", "60", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
            "--output-dir", str(out), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e", "--max-steps", "8",
            "--save-steps", "2", "--prompts-per-step", "4", "--max-new-tokens", "8", "--ppo-epochs", "2",
            "--num-generations", "1", "--learning-rate", "1e-2", "--kl-coef", "0.5", "--kl-target", "4",
            "--kl-horizon", "64", "--no-progress-bar", "--num-threads", "1"]

    # 1. process 1 dies mid-run (its peers wait in DDP all-reduces): a quick error, not a hang
    killed: dict = {}
    thread = _kill_when(out / "checkpoint-2", out / "ray_workers.json", "policy", 1, killed)
    assert main(argv) == 2
    thread.join()
    waited = time.monotonic() - killed["at"]
    err = capsys.readouterr().err
    assert re.search(r"Ray (policy|critic|reward|rollout) worker 1 \(its process also ran .*\) died", err), err
    assert "rerun with --resume" in err
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert f"checkpoint-{last} (fix the cause" in next(line for line in err.splitlines() if "error:" in line)
    assert waited < 30, waited  # far below the 60 s collective timeout: the driver stopped the group itself

    # 2. resumed; now the reward worker dies: the training groups are intact, so the last finished step is saved
    killed.clear()
    thread = _kill_when(out / f"checkpoint-{last + 2}", out / "ray_workers.json", "reward", 2, killed)
    assert main([*argv, "--resume"]) == 2
    thread.join()
    err = capsys.readouterr().err
    assert "Ray reward worker 2 died during scoring" in err and "saved now, at the last finished step" in err, err
    rows = _rows(out)
    saved = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved >= last + 2 and [r["step"] for r in rows] == list(range(1, saved + 1))

    # 3. resumed again: it runs to the end, logs every step once, and saves the final policy
    assert main([*argv, "--resume"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert (out / "model.safetensors").exists()
    # the adaptive β of every step follows from the previous step's KL, across both resumes: the controller
    # was restored from the checkpoints (8 responses a step, horizon 64, target 4)
    for prev, row in zip(rows, rows[1:]):
        error = min(max(prev["kl"] / 4.0 - 1.0, -0.2), 0.2)
        assert row["beta"] == pytest.approx(prev["beta"] * (1 + error * 8 / 64), rel=1e-9), row["step"]
    assert rows[-1]["beta"] < 0.5
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()


def test_bad_ray_settings_are_one_line_errors(tiny_model_dir, count_e_files, tmp_path):
    base = _settings(tiny_model_dir, count_e_files, tmp_path / "x", ray=True)

    with pytest.raises(ConfigError, match="--ray-placement must be one of colocated, per_role"):
        run_ray_rl(RayPPOConfig(**base, ray_placement="spread"))
    with pytest.raises(ConfigError, match="--ray-rollout-workers .* more than the 4 prompts"):
        run_ray_rl(RayPPOConfig(**{**base, "prompts_per_step": 4}, ray_rollout_workers=5))
    with pytest.raises(ConfigError, match="LoRA is not supported with --ray"):
        run_ray_rl(RayPPOConfig(**base, lora_r=4))
    with pytest.raises(ConfigError, match="--dynamic-sampling is not supported with --ray"):
        run_ray_rl(RayPPOConfig(**base, dynamic_sampling=True))
    with pytest.raises(ConfigError, match="--ray-critic-workers must equal --ray-policy-workers"):
        run_ray_rl(RayPPOConfig(**base, ray_placement="colocated", ray_policy_workers=2))
    with pytest.raises(ConfigError, match="needs at least --num-minibatches"):
        run_ray_rl(RayPPOConfig(**{**base, "prompts_per_step": 2, "num_minibatches": 2}, ray_critic_workers=2))


def test_help_documents_the_ray_options(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ray", "--ray_placement", "--ray_policy_workers", "--ray_rollout_workers", "--ray_timeout_s"):
        assert flag in text, flag


def test_training_error_names_the_role():
    from rlhfkit.distributed.cluster import WorkerFailure
    from rlhfkit.distributed.driver import _failure_message

    failure = WorkerFailure("timeout", "reference", 0, "reference and values")
    failure.waited = 30
    message = _failure_message(failure, 4, Path("out/checkpoint-4"), False)
    assert message == ("Ray reference worker 0 did not answer within 30s during reference and values at step 5; "
                       "the last good checkpoint: out/checkpoint-4 (fix the cause, then rerun with --resume)")
    assert isinstance(TrainingError(message), TrainingError)


def test_placement_plans():
    from rlhfkit.distributed.cluster import placement_plan

    counts = {"policy": 2, "critic": 2, "reference": 1, "reward": 3, "rollout": 1}
    groups, hosts = placement_plan(counts, "colocated", 2.0, use_gpu=True)
    assert groups == [[{"CPU": 2.0, "GPU": 1.0}] * 3]  # one placement group, a bundle per process
    assert [roles for _, _, roles in hosts] == [
        [("policy", 0), ("critic", 0), ("reference", 0), ("reward", 0), ("rollout", 0)],
        [("policy", 1), ("critic", 1), ("reward", 1)], [("reward", 2)]]
    groups, hosts = placement_plan(counts, "per_role", 0.5, use_gpu=False)
    assert [len(g) for g in groups] == [2, 2, 1, 3, 1] and len(hosts) == 9  # a group per role, a process per rank
    assert all(len(roles) == 1 for _, _, roles in hosts)
