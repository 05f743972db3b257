#!/usr/bin/env python
"""Benchmark rlhfkit's online RL (PPO, GRPO, RLOO) against TRL's GRPOTrainer and RLOOTrainer.

    .venv/bin/python bench/bench_rl_vs_trl.py                  # every row once (~3 min on 2 cores)
    .venv/bin/python bench/bench_rl_vs_trl.py --repeats 3      # medians of 3 runs (~8 min), order alternating
    .venv/bin/python bench/bench_rl_vs_trl.py --only grpo,rloo --steps 10 --warmup-steps 2
    .venv/bin/python bench/bench_rl_vs_trl.py --pool bench/results/rl_A.json bench/results/rl_B.json

Same tiny Llama (fp32, random init), same plain-text prompts, same reward function, group size, β,
max_new_tokens, temperature, learning rate and number of steps for both libraries; one step = one rollout
(8 sequences of up to 64 new tokens) + its update. TRL 1.16 has no PPO trainer, so PPO rows are rlhfkit only.
rlhfkit runs twice per row: with its defaults (on CPU the decode step AOT-compiled in a child process and
cached; its first rollout, which builds or loads it, falls in the untimed warm-up steps) and as rlhfkit-eager
(``--no-compile-decode``). Saved results of older builds name the compiled runs rlhfkit-compiled (the flag
``--compile-decode``, then opt-in); ``--libraries rlhfkit-compiled`` still passes it.

Conventions of bench/bench_vs_trl.py (whose helpers this imports): every (algorithm, library) run trains
in its own subprocess, one at a time; peak RSS = that process's VmHWM; a global optimizer step post-hook
stamps the end of every step (a step's interval holds the rollout and the update); a wrapper around the
generation call (``transformers.GenerationMixin.generate`` for TRL, rlhfkit's ``HFGenerationBackend
.generate``) times generation and counts the prompt and completion tokens; a wrapper around
``nn.Embedding.forward`` counts the tokens the update fed the trained model (no global module hook:
it would slow every module call of the decode loop). The script waits for a quiet CPU before each run,
reruns a disturbed run, and writes a Markdown table + raw JSON to bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_trl as base  # noqa: E402

REPO, RESULTS = base.REPO, base.RESULTS
# Row -> rlhfkit command and batch shape. β: GRPO 0.04 (TRL GRPOConfig beta), RLOO 0.05 (TRL RLOOConfig beta),
# PPO rlhfkit's default 0.05 (KL in the reward, k1).
ALGOS = {
    "ppo": {"cmd": "ppo", "name": "PPO (1 epoch)", "prompts": 8, "group": 1, "epochs": 1, "beta": 0.05},
    "ppo4": {"cmd": "ppo", "name": "PPO (4 epochs)", "prompts": 8, "group": 1, "epochs": 4, "beta": 0.05},
    "grpo": {"cmd": "grpo", "name": "GRPO", "prompts": 1, "group": 8, "epochs": 1, "beta": 0.04},
    "rloo": {"cmd": "rloo", "name": "RLOO", "prompts": 1, "group": 8, "epochs": 1, "beta": 0.05},
}
TRL_ALGOS = ("grpo", "rloo")
# rlhfkit: its defaults (compiled decode on CPU); rlhfkit-eager: --no-compile-decode; rlhfkit-compiled:
# --compile-decode (the same as the default since it became one; the name of older saved runs)
LIBRARIES = ("rlhfkit", "rlhfkit-eager", "rlhfkit-compiled", "trl")
COMPILED = ("rlhfkit", "rlhfkit-compiled")
REWARD_SOURCE = '''def reward(prompts, completions=None, **kwargs):
    """rlhfkit calls reward(prompts, responses); TRL calls reward(prompts=..., completions=..., ...)."""
    return [c.count("e") / 4.0 for c in completions]
'''


# ------------------------------------------------------------------------------------------- the child
def _trl_settings(spec: dict) -> dict:
    s = dict(
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_generations=spec["group"],
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        epsilon=0.2,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        use_vllm=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        log_completions=False,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if spec["algo"] == "grpo":
        s.update(loss_type="grpo", scale_rewards="group")  # rlhfkit grpo: sequence_mean, group std
    elif spec["algo"] == "rloo":
        s.update(normalize_advantages=False)  # rlhfkit rloo: no whitening
    return s


def run_trl(spec: dict) -> dict:
    import importlib.util

    from datasets import Dataset
    from transformers import AutoTokenizer

    module_spec = importlib.util.spec_from_file_location("bench_reward", spec["reward_file"])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    dataset = Dataset.from_list(base._read_jsonl(Path(spec["prompts_file"])))
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec["algo"] == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    args = Config(output_dir=spec["output_dir"], **_trl_settings(spec))
    trainer = Trainer(
        model=spec["model_dir"],
        reward_funcs=module.reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "trl_generation_batch_size": args.generation_batch_size,
        "trl_steps_per_generation": args.steps_per_generation,
        "own_mean_length": statistics.mean(h["completions/mean_length"] for h in logs) if logs else None,
        "reward_mean": statistics.mean(h["reward"] for h in logs if "reward" in h) if logs else None,
    }


def write_inputs(work: Path, seed: int) -> tuple[Path, Path, list[str]]:
    """The bench's prompts file (200 'Write a sentence about <word>.') and reward file, written to ``work``."""
    words = base._word_list()
    prompts = [f"Write a sentence about {w}." for w in random.Random(seed).sample(words, min(200, len(words)))]
    prompts_file, reward_file = work / "prompts.jsonl", work / "reward.py"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    reward_file.write_text(REWARD_SOURCE)
    return prompts_file, reward_file, prompts


def rlhfkit_argv(spec: dict) -> list[str]:
    """The ``rlhfkit <cmd>`` arguments of one run of ``spec`` (a row of ALGOS with the run's settings)."""
    argv = [spec["cmd"], "--model", spec["model_dir"], "--dataset", spec["prompts_file"],
            "--output-dir", spec["output_dir"], "--max-steps", str(spec["steps"]),
            "--prompts-per-step", str(spec["prompts"]), "--num-generations", str(spec["group"]),
            "--max-new-tokens", str(spec["max_new_tokens"]), "--temperature", "1.0",
            "--per-device-batch-size", str(spec["batch"]), "--gradient-accumulation-steps", "1",
            "--ppo-epochs", str(spec["epochs"]), "--num-minibatches", "1",
            "--learning-rate", str(spec["lr"]), "--lr-scheduler-type", "constant",
            "--kl-coef", str(spec["beta"]), "--reward-fn", f"{spec['reward_file']}:reward",
            "--seed", str(spec["seed"]), "--num-threads", str(spec["threads"]), "--precision", "fp32",
            "--logging-steps", "1", "--save-steps", "0", "--sample-steps", "0", "--report-to", "none",
            "--no-progress-bar", "--no-eval-on-start", "--overwrite"]  # fmt: skip
    if spec["library"] == "rlhfkit-compiled":
        argv.append("--compile-decode")
    elif spec["library"] == "rlhfkit-eager":
        argv.append("--no-compile-decode")
    return argv


def run_rlhfkit(spec: dict) -> dict:
    from rlhfkit.cli import main as cli

    argv = rlhfkit_argv(spec)
    rc = cli(argv)
    if rc != 0:
        raise RuntimeError(f"rlhfkit {' '.join(argv)} exited with {rc}")
    rows = [r for r in base._read_jsonl(Path(spec["output_dir"]) / "metrics.jsonl") if "step_time_s" in r]
    timed = [r for r in rows if r["step"] > spec["warmup_steps"]]
    keys = ("step_time_s", "rollout_time_s", "rollout_tokens_per_s", "train_tokens_per_s", "response_length")
    summary = json.loads((Path(spec["output_dir"]) / "summary.json").read_text())
    return {
        "shared_prompts": bool(summary.get("shared_prompts")),  # a group's prompt fed once, not once per sample
        "own_metrics": {k: statistics.mean(r[k] for r in timed) for k in keys if timed and k in timed[0]},
        "own_mean_length": statistics.mean(r["response_length"] for r in rows) if rows else None,
        "reward_mean": statistics.mean(r["reward_mean"] for r in rows) if rows else None,
        "rollout_logprob_mismatch": max((r.get("rollout_logprob_mismatch", 0.0) for r in rows), default=None),
        "first_rollout_s": rows[0]["rollout_time_s"] if rows else None,  # compiled decode: the build or load
    }


def install_generation_timer(library: str, eos_id: int) -> list[dict]:
    """Wrap the library's generation call; each call appends start/end, prompt and completion tokens."""
    calls: list[dict] = []
    if library == "trl":
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.generate

        def generate(self, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            end = time.perf_counter()
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            completion = out[:, ids.shape[1] :]
            is_eos = completion == eos_id
            first = is_eos.int().argmax(dim=1)
            lengths = [int(f) + 1 if e else completion.shape[1] for f, e in zip(first, is_eos.any(dim=1))]
            prompt_tokens = int(mask.sum()) if mask is not None else ids.numel()
            calls.append({"start": start, "end": end, "prompt_tokens": prompt_tokens, "lengths": lengths})
            return out

        GenerationMixin.generate = generate
    else:
        from rlhfkit.rollout.generate import HFGenerationBackend

        original = HFGenerationBackend.generate

        def generate(self, *args, **kwargs):
            start = time.perf_counter()
            rollout = original(self, *args, **kwargs)
            end = time.perf_counter()
            prompt_tokens = sum(len(p) for p in rollout.prompt_ids)
            calls.append(
                {"start": start, "end": end, "prompt_tokens": prompt_tokens, "lengths": rollout.lengths}
            )
            return rollout

        HFGenerationBackend.generate = generate
    return calls


def install_probe(pad_token_id: int) -> base.Probe:
    """base.Probe's optimizer-step hooks, with its token count moved from a global module forward hook to
    ``nn.Embedding.forward``: the global hook runs on every module call and costs ~10% of a decode step of
    this tiny model (more for HF ``generate`` than for rlhfkit's sampler), which would skew the comparison."""
    import torch
    from torch.nn.modules import module as torch_module

    probe = base.Probe(pad_token_id)
    probe.install()
    if len(torch_module._global_forward_pre_hooks) != 1:
        raise RuntimeError("expected exactly the probe's global forward pre-hook")
    torch_module._global_forward_pre_hooks.clear()
    original = torch.nn.Embedding.forward

    def forward(module, ids):
        if module.training and torch.is_grad_enabled() and not ids.is_floating_point():
            probe._tokens += int((ids != probe.pad).sum())
            probe._padded += int(ids.numel())
            probe.autocast_seen |= torch.is_autocast_enabled("cpu")
            probe.embedding_dtypes.add(str(module.weight.dtype))
        return original(module, ids)

    torch.nn.Embedding.forward = forward
    return probe


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    probe = install_probe(spec["pad_token_id"])
    gens = install_generation_timer(spec["library"], spec["eos_token_id"])
    extra = run_trl(spec) if spec["library"] == "trl" else run_rlhfkit(spec)
    k, steps, warm = spec["epochs"], spec["steps"], spec["warmup_steps"]
    if len(probe.step_ends) != k * steps or len(gens) != steps:
        raise RuntimeError(
            f"saw {len(probe.step_ends)} optimizer steps and {len(gens)} generations, "
            f"expected {k * steps} and {steps}"
        )
    ends = probe.step_ends[k - 1 :: k]  # end of each rollout + update step
    if any(not ends[i - 1] < gens[i]["start"] < gens[i]["end"] < ends[i] for i in range(1, steps)):
        raise RuntimeError("a generation call fell outside its step")
    timed = range(warm, steps)
    step_s = [ends[i] - ends[i - 1] for i in timed]
    gen_s = [gens[i]["end"] - gens[i]["start"] for i in timed]
    completion = [sum(gens[i]["lengths"]) for i in timed]
    # what the update should feed the model: prompt + completion per sample, or with shared-prompt packing
    # (rlhfkit's default for groups) each group's prompt once
    share = spec["group"] if extra.get("shared_prompts") else 1
    sequence = [gens[i]["prompt_tokens"] / share + completion[j] for j, i in enumerate(timed)]
    update_tokens = [sum(probe.step_tokens[i * k : (i + 1) * k]) for i in timed]
    (busy0, own0), (busy1, own1) = probe.cpu[k * warm - 1], probe.cpu[-1]
    timed_s = ends[-1] - ends[warm - 1]
    all_lengths = [n for g in gens for n in g["lengths"]]
    result = {
        "algo": spec["algo"],
        "library": spec["library"],
        "s_per_step": statistics.median(step_s),
        "s_per_step_mean": statistics.mean(step_s),
        "gen_s_per_step": statistics.mean(gen_s),
        "rollout_tokens_per_s": sum(completion) / sum(gen_s),
        "update_tokens_per_s": sum(update_tokens) / (sum(step_s) - sum(gen_s)),
        "update_tokens_vs_sequence_tokens": sum(update_tokens) / (k * sum(sequence)),
        "mean_completion_length": sum(all_lengths) / len(all_lengths),
        "mean_prompt_tokens": sum(g["prompt_tokens"] for g in gens) / sum(len(g["lengths"]) for g in gens),
        "sequences_per_step": len(gens[0]["lengths"]),
        "step_times_s": step_s,
        "gen_times_s": gen_s,
        "peak_rss_mib": base.peak_rss_mib(),
        "other_processes_cores": max(busy1 - busy0 - (own1 - own0), 0.0) / timed_s,
        "cores_used": (own1 - own0) / timed_s,
        "torch_threads": torch.get_num_threads(),
        "autocast_seen": probe.autocast_seen,
        "embedding_dtypes": sorted(probe.embedding_dtypes),
        "optimizers": sorted(probe.optimizers),
        **extra,
    }
    Path(spec["result_file"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the parent
def run_name(spec: dict) -> str:
    """A run's name: its algorithm (when the bench has several) and library."""
    return "-".join(str(spec[k]) for k in ("algo", "library") if k in spec)


def run_one(spec: dict, work: Path, args, script: str = __file__) -> dict:
    """One run of ``script --child SPEC`` (this bench's or another's) in its own process; its result, or an
    error with the log's tail."""
    name = run_name(spec)
    spec = {**spec, "output_dir": str(work / "out" / name), "result_file": str(work / f"{name}.result.json")}
    Path(spec["result_file"]).unlink(missing_ok=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, script, "--child", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=base.child_env(spec["threads"]),
                cwd=REPO,
                timeout=args.timeout,
                check=False,
            )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    if rc != 0 or not Path(spec["result_file"]).exists():
        return {**{k: spec[k] for k in ("algo", "library") if k in spec}, "error": f"exit {rc}", "log_tail": tail}
    result = json.loads(Path(spec["result_file"]).read_text())
    if "error" in result:  # a child that caught its library's failure and said why
        result["log_tail"] = tail
    result["process_s"] = time.perf_counter() - start
    return result


def measure(spec: dict, work: Path, args, script: str = __file__) -> dict:
    """One run; rerun (up to --retries) when other processes disturbed it, keeping the least disturbed."""
    attempts = []
    for _ in range(args.retries + 1):
        load, waited = base.wait_for_quiet(args.quiet_wait, args.quiet_threshold)
        r = run_one(spec, work, args, script)
        r.update({"other_load_before": load, "waited_for_quiet_s": waited})
        attempts.append(r)
        if "error" in r or r["other_processes_cores"] <= args.quiet_threshold:
            break
        print(f"  {run_name(spec)}: others used {r['other_processes_cores']:.2f} cores", flush=True)
    return min(attempts, key=lambda a: a.get("other_processes_cores", float("inf")))


MEDIAN_KEYS = (
    "s_per_step",
    "s_per_step_mean",
    "gen_s_per_step",
    "rollout_tokens_per_s",
    "update_tokens_per_s",
)


def combine(runs: list[dict], threshold: float) -> dict:
    """Medians over the (undisturbed, where there are any) repeats; peak RSS = the largest."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    ok = [r for r in ok if r["other_processes_cores"] <= threshold] or ok
    out = dict(sorted(ok, key=lambda r: r["s_per_step"])[len(ok) // 2])
    out.update({k: statistics.median(r[k] for r in ok) for k in MEDIAN_KEYS})
    out.update({f"{k}_runs": [r[k] for r in ok] for k in MEDIAN_KEYS + ("peak_rss_mib",)})
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    out["other_processes_cores"] = max(r["other_processes_cores"] for r in ok)
    out["mean_completion_length"] = statistics.mean(r["mean_completion_length"] for r in ok)
    out["repeats"] = len(ok)
    firsts = [r["first_rollout_s"] for r in ok if r.get("first_rollout_s") is not None]
    out["first_rollout_s"] = max(firsts) if firsts else None  # the compiled rows: the cold build, if any
    return out


def paired_speedups(runs: list[dict], algo: str, library: str) -> list[float]:
    """TRL's s/step over ``library``'s, run against run within each repeat (``repeat`` key: the repeat, or
    (batch, repeat) when pooling): the two ran minutes apart, in one phase of a machine whose speed drifts
    by ±15–30%, so the ratio of a pair is steadier than the ratio of two medians."""
    def ok(r: dict) -> bool:
        return r.get("algo") == algo and "error" not in r

    trl = {r["repeat"]: r["s_per_step"] for r in runs if ok(r) and r["library"] == "trl"}
    return [trl[r["repeat"]] / r["s_per_step"] for r in runs
            if ok(r) and r["library"] == library and r["repeat"] in trl]


def median_ratio_interval(runs: list[dict], algo: str, library: str, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of TRL's median s/step over ``library``'s, resampling whole repeats
    (each repeat ran both libraries minutes apart, so a repeat, not a run, is the unit the machine's drift
    acts on; :func:`rlhfkit.eval.stats.bootstrap_indices` draws them); None with fewer than 3 repeats that ran
    both."""
    import numpy as np

    from rlhfkit.eval.stats import bootstrap_indices, percentile_interval

    def steps(lib: str) -> dict:
        return {r["repeat"]: r["s_per_step"] for r in runs
                if r.get("algo") == algo and r["library"] == lib and "error" not in r}

    trl, mine = steps("trl"), steps(library)
    repeats = sorted(set(trl) & set(mine))
    if len(repeats) < 3:
        return None
    trl_s, mine_s = (np.array([d[k] for k in repeats]) for d in (trl, mine))
    ratios = np.concatenate([np.median(trl_s[idx], axis=1) / np.median(mine_s[idx], axis=1)
                             for idx in bootstrap_indices(len(repeats), resamples, seed)])
    return percentile_interval(ratios)


def _paired(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return ""
    return f"{statistics.geometric_mean(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def pooled_runs(files: list[str]) -> tuple[list[dict], list[str]]:
    """Every run of the saved results ``files``, its repeat keyed (batch, repeat) so that repeats of different
    files stay apart, and each file's name with the build it measured."""
    runs, builds = [], []
    for batch, name in enumerate(files):
        payload = json.loads(Path(name).read_text())
        builds.append(f"{Path(name).stem} ({payload['info']['git']})")
        runs += [{**r, "repeat": (batch, r["repeat"])} for r in payload["runs"]]
    return runs, builds


def pool(files: list[str]) -> str:
    """One table over several saved runs (bench/results/rl_*.json): every run of a row pooled."""
    runs, builds = pooled_runs(files)
    lines = [
        "Pooled: " + ", ".join(builds),
        "",
        "| algorithm | library | runs | s/step (median) | range | speed-up vs TRL (medians) "
        "| 95% interval (bootstrap over repeats) | paired speed-up (geo-mean of the runs' ratios; range) "
        "| peak RSS vs TRL (largest) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for algo in ALGOS:
        rows = {lib: [r for r in runs if r["algo"] == algo and r["library"] == lib and "error" not in r]
                for lib in LIBRARIES}
        trl = rows["trl"]
        for lib in LIBRARIES:
            mine = rows[lib]
            if not mine:
                continue
            steps = [r["s_per_step"] for r in mine]
            speed = interval = rss = paired = ""
            if lib != "trl" and trl:
                speed = f"**{statistics.median(r['s_per_step'] for r in trl) / statistics.median(steps):.2f}×**"
                bounds = median_ratio_interval(runs, algo, lib)
                interval = f"{bounds[0]:.2f}–{bounds[1]:.2f}×" if bounds else ""
                rss = f"{max(r['peak_rss_mib'] for r in mine) / max(r['peak_rss_mib'] for r in trl):.2f}×"
                paired = _paired(paired_speedups(runs, algo, lib))
            lines.append(f"| {ALGOS[algo]['name']} | {lib} | {len(mine)} | {statistics.median(steps):.3f} | "
                         f"{min(steps):.3f}–{max(steps):.3f} | {speed} | {interval} | {paired} | {rss} |")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _first_rollout(results: list[dict]) -> float | None:
    """The slowest first rollout of the compiled-decode runs (the compile; warm or cold inductor cache)."""
    firsts = [r.get("first_rollout_s") for r in results if r.get("library") in COMPILED]
    firsts = [f for f in firsts if f is not None]
    return max(firsts) if firsts else None


def build_table(results: list[dict], args, info: dict, runs: list[dict] | None = None) -> str:
    f = base._fmt
    lines = [
        f"Machine: {info['machine']} (torch threads {args.threads}) · torch {info['torch']} · transformers "
        f"{info['transformers']} · trl {info['trl'] or '—'} · rlhfkit {info['git']}",
        "",
        "| algorithm | library | s/step (median) | s/step (mean) | gen s/step | rollout tok/s | update tok/s "
        "| peak RSS MiB | mean completion len | speed-up vs TRL (per step) | paired speed-up | RSS vs TRL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["algo"], r["library"]): r for r in results}
    problems, noisy = [], []
    for algo in args.only:
        trl = by_key.get((algo, "trl"))
        for lib in LIBRARIES:
            r = by_key.get((algo, lib))
            if r is None:
                continue
            label = ALGOS[algo]["name"]
            if "error" in r:
                lines.append(f"| {label} | {lib} | failed ({r['error']}) |" + " |" * 10)
                problems.append(f"{algo}/{lib}: " + " / ".join(r["log_tail"][-3:]))
                continue
            speed = rss = paired = ""
            if lib != "trl" and trl is not None and "error" not in trl:
                r["speedup_vs_trl"] = trl["s_per_step"] / r["s_per_step"]
                r["rss_ratio_vs_trl"] = r["peak_rss_mib"] / trl["peak_rss_mib"]
                speed, rss = f"**{r['speedup_vs_trl']:.2f}×**", f"{r['rss_ratio_vs_trl']:.2f}×"
                paired = _paired(paired_speedups(runs or [], algo, lib))
            lines.append(
                f"| {label} | {lib} | {f(r['s_per_step'], 3)} | {f(r['s_per_step_mean'], 3)} | "
                f"{f(r['gen_s_per_step'], 3)} | {f(r['rollout_tokens_per_s'], 0)} | "
                f"{f(r['update_tokens_per_s'], 0)} | {f(r['peak_rss_mib'], 0)} | "
                f"{f(r['mean_completion_length'], 1)} | {speed} | {paired} | {rss} |"
            )
            if abs(r["update_tokens_vs_sequence_tokens"] - 1) > 0.01:
                problems.append(
                    f"{algo}/{lib}: the update fed {r['update_tokens_vs_sequence_tokens']:.3f}× the "
                    "rollout's prompt+completion tokens (× epochs; a shared prompt once per group) to the model"
                )
            if (
                r["autocast_seen"]
                or r["embedding_dtypes"] != ["torch.float32"]
                or r["torch_threads"] != args.threads
            ):
                problems.append(
                    f"{algo}/{lib}: not plain fp32 with {args.threads} threads "
                    f"({r['embedding_dtypes']}, autocast={r['autocast_seen']}, {r['torch_threads']})"
                )
            if r["other_processes_cores"] > args.quiet_threshold:
                noisy.append(f"{algo}/{lib} ({r['other_processes_cores']:.2f} cores)")
    t = info["trl_settings"]
    notes = [
        "",
        f"Model: Llama ({info['params'] / 1e6:.2f}M params: {info.get('shape', '?')}), fp32, "
        f"random init, no gradient checkpointing, one process at a time. Prompts: "
        f"{info['n_prompts']} plain strings 'Write a sentence about <word>.' ({info['prompt_tokens']} tokens "
        "with BOS, tokenised the same way by both). Reward: the same Python function for both, "
        "count('e') / 4 of the decoded completion.",
        f"Per step (both): one rollout of 8 sequences (GRPO / RLOO: 1 prompt × group 8; PPO: 8 prompts × 1), "
        f"max_new_tokens {args.max_new_tokens} (no minimum; the random model rarely emits EOS), temperature 1.0, "
        f"no top-k / top-p, then one update of those 8 sequences in one micro-batch (no gradient accumulation): "
        f"lr {args.lr:g} constant, fused AdamW, grad clip 1.0, clip ε 0.2, reference = a frozen copy of the model. "
        f"β: GRPO 0.04 (KL in the loss, k3), RLOO 0.05 (KL in the reward), PPO 0.05 (KL in the reward, "
        f"value head, GAE). {args.steps} steps, the first {args.warmup_steps} warm-up (not timed); seed "
        f"{args.seed}; torch threads {args.threads}.",
        "rlhfkit: `rlhfkit <ppo|grpo|rloo> --prompts-per-step P --num-generations G --max-new-tokens "
        f"{args.max_new_tokens} --per-device-batch-size 8 --gradient-accumulation-steps 1 --ppo-epochs E "
        f"--num-minibatches 1 --learning-rate {args.lr:g} --lr-scheduler-type constant --kl-coef β "
        "--reward-fn reward.py:reward --precision fp32 --num-threads 2 --logging-steps 1 --save-steps 0 "
        "--sample-steps 0 --no-progress-bar --no-eval-on-start` (other options at their defaults; PPO "
        "(4 epochs) = 4 optimizer steps per rollout), run in-process in the child; the final model is saved "
        "after the timed steps; on CPU its default decode step is AOT-compiled (built in a child process, cached "
        "on disk), and its first rollout, which builds or loads it, is a warm-up step"
        + (f" and took {first:.1f} s" if (first := _first_rollout(results)) else "")
        + ". rlhfkit-eager: the same command with `--no-compile-decode`.",
    ]
    if t:
        notes.append(
            f"TRL {info['trl']}: GRPOTrainer / RLOOTrainer(model=<model dir> (loaded by TRL, fp32), "
            "reward_funcs=reward, processing_class=tokenizer) with "
            + ", ".join(f"{k}={v!r}" for k, v in t.items() if k not in ("max_steps", "seed"))
            + "; GRPO: loss_type='grpo', scale_rewards='group'; RLOO: normalize_advantages=False. "
            "(generation_batch_size = 8 = one generation per optimizer step, so TRL skips the old-log-prob "
            "forward; no max_prompt_length in TRL 1.16, prompts are short and never truncated. Not identical: "
            "data order and sampling RNG (each library's own), TRL generates with transformers `generate` "
            "(DynamicCache), TRL RLOO's loss is sequence-level while rlhfkit rloo's is per token (same "
            "forward/backward work); rlhfkit packs each group's prompt once for its 8 samples (shared-prompt "
            "packing, its default), TRL pads every sample whole: 7 fewer prompt copies per step here.)"
        )
    notes.append(
        "s/step: median (and mean) of the intervals between the ends of consecutive rollout+update steps "
        "(optimizer step hook) over the timed steps. gen s/step: mean time inside the generation call "
        "(TRL: transformers `generate`; rlhfkit: its KV-cache sampler). rollout tok/s = generated tokens "
        "(up to and including EOS) / generation time. update tok/s = tokens fed to the trained model with "
        "grad (prompt + completion, × epochs for PPO-4; rlhfkit GRPO/RLOO feed each group's prompt once, "
        "shared by its samples; counted in nn.Embedding.forward) / (step time − generation "
        "time), so the non-generation part includes reward scoring and the reference forward. Peak RSS = "
        "VmHWM of the training process. speed-up = TRL s/step / rlhfkit s/step (median); paired speed-up "
        "(2+ repeats) = geometric mean (range) of TRL s/step / rlhfkit s/step within each repeat; RSS vs TRL = "
        "rlhfkit / TRL (< 1: leaner)."
        + (
            f" Medians of {args.repeats} runs per row (library order alternating); peak RSS: the largest."
            if args.repeats > 1
            else ""
        )
    )
    if noisy:
        notes += ["", "**Noisy timing:** other processes kept the CPU busy during: " + ", ".join(noisy)]
    if problems:
        notes += [""] + [f"**Check failed:** {p}" for p in problems]
    return "\n".join(lines + notes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="rollout+update steps per run (default 20)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps excluded from timing (default 3)")
    p.add_argument("--only", default=",".join(ALGOS), help=f"rows: {', '.join(ALGOS)} (comma-separated)")
    p.add_argument("--libraries", default="rlhfkit,rlhfkit-eager,trl",
                   help="comma-separated: rlhfkit (its defaults), rlhfkit-eager (--no-compile-decode), "
                   "rlhfkit-compiled (--compile-decode), trl (default: rlhfkit,rlhfkit-eager,trl)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the table shows medians (default 1)")
    p.add_argument("--retries", type=int, default=1, help="reruns of a run other processes disturbed")
    p.add_argument(
        "--quiet-wait", type=float, default=60, help="seconds to wait for a quiet CPU before a run"
    )
    p.add_argument("--quiet-threshold", type=float, default=0.25, help="cores others may use (quiet)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    p.add_argument("--workdir", default=None, help="keep model, prompts and logs here (default: a temp dir)")
    p.add_argument("--pool", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="print one table pooling the runs of saved results (bench/results/rl_*.json); runs nothing")
    p.add_argument("--model-dir", default=None, help="train this model (default: build the 5M bench model)")
    p.add_argument("--results-json", default=None, help="also write the results here (bench_scaling.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child or args.pool:
        return args
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if not args.only or any(s not in ALGOS for s in args.only):
        p.error(f"--only takes {', '.join(ALGOS)}")
    if not args.libraries or any(s not in LIBRARIES for s in args.libraries):
        p.error(f"--libraries takes {', '.join(LIBRARIES)}")
    if args.repeats < 1 or args.retries < 0 or not 1 <= args.warmup_steps < args.steps - 1:
        p.error("need --repeats >= 1, --retries >= 0 and 1 <= --warmup-steps < --steps - 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.pool:
        print(pool(args.pool))
        return 0
    base.use_child_env(args.threads)
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rlhfkit-rl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = build_tiny_model(work / "model", layers=4, hidden=256, heads=4, vocab=2048)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts_file, reward_file, prompts = write_inputs(work, args.seed)
    lengths = [len(tok(p).input_ids) for p in prompts]
    trl_version = None
    if "trl" in args.libraries:
        import trl

        trl_version = trl.__version__
    common = {
        "model_dir": str(model_dir),
        "prompts_file": str(prompts_file),
        "reward_file": str(reward_file),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "max_new_tokens": args.max_new_tokens,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "batch": 8,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    info = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "git": base.git_state(),
        "params": params,
        "vocab": config.vocab_size,
        "shape": base.model_shape(config),
        "n_prompts": len(prompts),
        "prompt_tokens": f"{min(lengths)}"
        if min(lengths) == max(lengths)
        else f"{min(lengths)}–{max(lengths)}",
        "trl_settings": _trl_settings({**common, "algo": "", "group": 8, "beta": "β"})
        if trl_version
        else None,
    }
    print(
        f"model: {model_dir} ({params:,} parameters); {len(prompts)} prompts; {info['machine']}", flush=True
    )

    runs, results = [], []
    for algo in args.only:
        libs = [lib for lib in args.libraries if lib != "trl" or algo in TRL_ALGOS]
        per_lib: dict[str, list[dict]] = {lib: [] for lib in libs}
        for rep in range(args.repeats):
            for lib in libs if rep % 2 == 0 else libs[::-1]:
                r = measure({**common, **ALGOS[algo], "algo": algo, "library": lib}, work, args)
                r["repeat"] = rep + 1
                runs.append(r)
                per_lib[lib].append(r)
                if "error" in r:
                    print(
                        f"{algo:>5} {lib:<8} FAILED ({r['error']})\n    " + "\n    ".join(r["log_tail"]),
                        flush=True,
                    )
                else:
                    print(
                        f"{algo:>5} {lib:<8} {r['s_per_step']:.3f} s/step (gen {r['gen_s_per_step']:.3f})  "
                        f"{r['rollout_tokens_per_s']:,.0f} rollout tok/s  {r['update_tokens_per_s']:,.0f} "
                        f"update tok/s  {r['peak_rss_mib']:,.0f} MiB  len {r['mean_completion_length']:.1f}  "
                        f"({r['process_s']:.0f}s in all)",
                        flush=True,
                    )
        results.extend(combine(per_lib[lib], args.quiet_threshold) for lib in libs)

    table = build_table(results, args, info, runs)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "table_markdown": table,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "info": info,
        "results": results,
        "runs": runs,
        "total_wall_s": time.perf_counter() - started,
        "workdir": str(work),
    }
    (RESULTS / f"rl_{stamp}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"rl_{stamp}.md").write_text(table + "\n")
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(payload, indent=1))
    print(f"\nresults: {RESULTS / f'rl_{stamp}.md'} (+ .json; total {payload['total_wall_s']:.0f}s)")
    failed = any("error" in r for r in results)
    if not args.workdir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
