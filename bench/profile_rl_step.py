#!/usr/bin/env python
"""Where one rlhfkit GRPO/RLOO step goes, on the setup of bench/bench_rl_vs_trl.py: the phases of a step, and
the matrix products' time and rate against this machine's fp32 matmul ceiling.

    .venv/bin/python bench/profile_rl_step.py --model-dir bench/results/scaling-work/model-5M
    .venv/bin/python bench/profile_rl_step.py --model-dir bench/results/scaling-work/model-30M --algo rloo
    .venv/bin/python bench/profile_rl_step.py --model-dir ... --compare-compiled-blocks

Runs ``rlhfkit grpo`` (or rloo) in this process with the RL bench's settings (1 prompt x 8 samples x 64 new
tokens, its β, lr 1e-6, fp32, its prompts and reward) and times the calls that make a step: generation (the
backend's ``generate``: prefill, decode steps, draws), the reference forward, the policy's forward and loss,
the backward, the gradient clipping and the optimizer step; "other" is the rest of the step (reward, collation,
advantages, logging). Step boundaries are the optimizer's step hook, as in the bench. Then a second run of the
same steps under ``torch.profiler`` (its own overhead included, so only its shares and rates are read):
the matrix products' self time per step and their FLOP rate (the profiler's FLOP count of mm / addmm / bmm)
against the best rate of ``bench_scaling.matmul_ceiling`` measured in this run.

``--compare-compiled-blocks`` answers one question: would fusing the elementwise work around the products pay?
It alternates ``--blocks`` blocks of ``--block`` steps between the eager model and ``torch.compile`` of
transformers' Llama MLP, RMSNorm and RoPE (dynamic shapes; compiled in the warm-up steps) in one process, and
prints both medians.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_rl_vs_trl as rl  # noqa: E402
import bench_scaling  # noqa: E402
import bench_vs_trl as base  # noqa: E402

PHASES = ("generation", "reference forward", "policy forward + loss", "backward", "gradient clipping",
          "optimizer step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a Llama-layout model folder (bench_scaling.py builds them)")
    p.add_argument("--algo", choices=("grpo", "rloo"), default="grpo")
    p.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps not counted (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-compiled-blocks", action="store_true",
                   help="also A/B the eager model against torch.compile of its MLP, RMSNorm and RoPE")
    p.add_argument("--block", type=int, default=4, help="steps per block of --compare-compiled-blocks")
    p.add_argument("--blocks", type=int, default=8, help="blocks of --compare-compiled-blocks (default 8: 4 each)")
    args = p.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps - 1:
        p.error("need 1 <= --warmup-steps < --steps - 1")
    return args


def workdir(work: Path | None = None, seed: int = 42) -> tuple[Path, Path]:
    """The RL bench's prompts and reward files, written to ``work`` (default: a new temporary folder)."""
    prompts, reward, _ = rl.write_inputs(work or Path(tempfile.mkdtemp(prefix="rlhfkit-profile-")), seed)
    return prompts, reward


def cli_args(args, prompts: Path, reward: Path, out: Path) -> list[str]:
    """The RL bench's rlhfkit command for ``--algo`` (its defaults), ``--steps`` steps long."""
    spec = {**rl.ALGOS[args.algo], "library": "rlhfkit", "model_dir": args.model_dir, "prompts_file": str(prompts),
            "reward_file": str(reward), "output_dir": str(out), "steps": args.steps, "max_new_tokens": 64,
            "batch": 8, "lr": 1e-6, "seed": 42, "threads": args.threads}
    return rl.rlhfkit_argv(spec)


class StepClock:
    """Per-step times of the timed calls, a step being the interval between two optimizer step hooks."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.last = None
        self.on_step = []  # callbacks(step index) run between steps

    def timed(self, phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.current[phase] += time.perf_counter() - start
        return wrapper

    def step_ended(self, *_):
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append({**self.current, "step": now - self.last})
        self.current = defaultdict(float)
        self.last = now
        for callback in self.on_step:
            callback(len(self.steps))


def instrument(clock: StepClock) -> list:
    """Wrap the calls of a step; returns what to undo."""
    import accelerate
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from rlhfkit.rollout.generate import HFGenerationBackend
    from rlhfkit.trainers.rl.task import RLTask

    undo = []
    for owner, name, phase in ((HFGenerationBackend, "generate", "generation"),
                               (RLTask, "_reference_logps", "reference forward"),
                               (RLTask, "compute_loss", "policy forward + loss"),
                               (accelerate.Accelerator, "backward", "backward"),
                               (accelerate.Accelerator, "clip_grad_norm_", "gradient clipping")):
        original = getattr(owner, name)
        setattr(owner, name, clock.timed(phase, original))
        undo.append((owner, name, original))
    starts = {}
    handles = [
        register_optimizer_step_pre_hook(
            lambda *_: starts.__setitem__("t", time.perf_counter())),
        register_optimizer_step_post_hook(
            lambda *_: clock.current.__setitem__("optimizer step", time.perf_counter() - starts["t"])),
        register_optimizer_step_post_hook(clock.step_ended),
    ]
    return undo + handles


def restore(undo: list) -> None:
    for item in undo:
        if isinstance(item, tuple):
            setattr(*item)
        else:
            item.remove()


def run(args, cli_argv: list[str], clock: StepClock) -> None:
    from rlhfkit.cli import main as cli

    undo = instrument(clock)
    try:
        if cli(cli_argv) != 0:
            raise SystemExit(f"rlhfkit {' '.join(cli_argv)} failed")
    finally:
        restore(undo)


def phase_table(steps: list[dict[str, float]]) -> str:
    """Means (they add up to the step; a median of each would not), with the median step for reference."""
    step = statistics.mean(s["step"] for s in steps)
    rows = ["| phase | ms/step (mean) | share of the step |", "|---|---:|---:|"]
    named = 0.0
    for phase in PHASES:
        ms = statistics.mean(s.get(phase, 0.0) for s in steps)
        named += ms
        rows.append(f"| {phase} | {ms * 1e3:.1f} | {ms / step:.0%} |")
    rows.append(f"| other (reward, collation, advantages, logging) | {(step - named) * 1e3:.1f} | "
                f"{(step - named) / step:.0%} |")
    rows.append(f"| **step** (median {statistics.median(s['step'] for s in steps) * 1e3:.1f}) | "
                f"**{step * 1e3:.1f}** | |")
    return "\n".join(rows)


def matmul_profile(args, cli_argv: list[str]) -> dict:
    """Matrix products' self time and FLOPs per timed step, from torch.profiler over the timed steps; the
    product shapes that took the most time; the other ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    clock = StepClock()
    prof = profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True)
    clock.on_step.append(lambda n: prof.start() if n == args.warmup_steps else None)
    run(args, cli_argv, clock)
    prof.stop()
    profiled = len(clock.steps) - args.warmup_steps
    events = prof.key_averages()
    products = [e for e in events if e.key in PRODUCTS]
    seconds = sum(e.self_cpu_time_total for e in products) / 1e6 / profiled
    flops = sum(e.flops for e in products) / profiled
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / profiled
    others = sorted((e for e in events if e not in products), key=lambda e: -e.self_cpu_time_total)[:10]
    top = [(e.key, e.self_cpu_time_total / 1e6 / profiled, e.count / profiled) for e in others]
    shapes = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
    shapes = sorted(shapes, key=lambda e: -e.self_cpu_time_total)[:8]
    by_shape = [(_mkn(e.key, e.input_shapes), e.count / profiled, e.self_cpu_time_total / 1e6 / profiled,
                 e.flops / profiled) for e in shapes]
    return {"matmul_s": seconds, "gflop": flops / 1e9, "profiled_cpu_s": total, "top_others": top,
            "by_shape": [row for row in by_shape if row[0] is not None]}


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def _mkn(op: str, shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of an mm ([[M, K], [K, N]]) or addmm ([bias, [M, K], [K, N], ...]) from the profiler's shapes."""
    a, b = (shapes[0], shapes[1]) if op == "aten::mm" else (shapes[1], shapes[2])
    return (a[0], a[1], b[1]) if len(a) == 2 and len(b) == 2 else None


def compare_compiled_blocks(args, cli_argv: list[str]) -> dict[str, list[float]]:
    """Step times of alternating blocks: eager, then torch.compile of the Llama MLP / RMSNorm / RoPE."""
    import torch
    from transformers.models.llama import modeling_llama as llama

    names = (("LlamaMLP", "forward"), ("LlamaRMSNorm", "forward"), (None, "apply_rotary_pos_emb"))

    def get(owner, name):
        return getattr(getattr(llama, owner), name) if owner else getattr(llama, name)

    def put(owner, name, fn):
        setattr(getattr(llama, owner), name, fn) if owner else setattr(llama, name, fn)

    eager = [get(o, n) for o, n in names]
    compiled = [torch.compile(f, dynamic=True) for f in eager]
    chosen = {"mode": "compiled"}

    def switch(n: int) -> None:
        # warm-up: compiled first (it compiles), then eager; afterwards alternate blocks of --block steps
        if n < args.warmup_steps - 1:
            mode = "compiled"
        elif n < args.warmup_steps:
            mode = "eager"
        else:
            mode = ("eager", "compiled")[((n - args.warmup_steps) // args.block) % 2]
        chosen["mode"] = mode
        for (owner, name), fn in zip(names, compiled if mode == "compiled" else eager):
            put(owner, name, fn)
        modes.append(mode)

    modes: list[str] = []
    switch(-1)
    clock = StepClock()
    clock.on_step.append(switch)
    cli_argv = list(cli_argv)
    cli_argv[cli_argv.index("--max-steps") + 1] = str(args.warmup_steps + args.blocks * args.block)
    try:
        run(args, cli_argv, clock)
    finally:
        for (owner, name), fn in zip(names, eager):
            put(owner, name, fn)
    # modes[0] is the first step's (untimed: the clock starts at its end); timed step i ran under modes[i + 1]
    out: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i, s in enumerate(clock.steps):
        if i >= args.warmup_steps:
            out[modes[i + 1]].append(s["step"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    base.use_child_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    prompts, reward = workdir()
    out = prompts.parent / "out"
    cli_argv = cli_args(args, prompts, reward, out)
    print(f"model: {args.model_dir}; {args.algo}, {args.steps} steps ({args.warmup_steps} warm-up); "
          f"{rl.machine()}; torch threads {args.threads}; rlhfkit {base.git_state()}", flush=True)

    clock = StepClock()
    run(args, cli_argv, clock)
    timed = clock.steps[args.warmup_steps:]
    print(f"\nPhases of a step ({len(timed)} timed steps):\n")
    print(phase_table(timed))

    ceiling = bench_scaling.matmul_ceiling(args.threads)
    products = matmul_profile(args, cli_argv)
    rate = products["gflop"] / products["matmul_s"]
    print(f"\nMatrix products (torch.profiler over the timed steps of a second run, its overhead included): "
          f"{products['matmul_s'] * 1e3:.1f} ms per step of {products['profiled_cpu_s'] * 1e3:.1f} ms of "
          f"profiled ops ({products['matmul_s'] / products['profiled_cpu_s']:.0%}; the compiled decode "
          f"step's own products run inside its package and are not seen), {products['gflop']:.2f} GFLOP per "
          f"step at {rate:.0f} GFLOP/s = {rate / ceiling:.0%} of this machine's fp32 matmul ceiling "
          f"({ceiling:.0f} GFLOP/s, measured now). The other ops with the most self time:\n")
    print("| op | ms/step | calls/step |\n|---|---:|---:|")
    for key, seconds, calls in products["top_others"]:
        print(f"| {key} | {seconds * 1e3:.1f} | {calls:.0f} |")
    print("\nThe products that took the most time, in the step and alone (the same shape as a contiguous "
          "[M, K] x [K, N] product, repeated with its operands in cache):\n")
    print("| M x K x N | calls/step | ms/step | GFLOP/s in the step | GFLOP/s alone |\n|---|---:|---:|---:|---:|")
    for (m, k, n), calls, seconds, flops in products["by_shape"]:
        print(f"| {m} x {k} x {n} | {calls:.0f} | {seconds * 1e3:.1f} | {flops / seconds / 1e9:.0f} | "
              f"{bench_scaling.matmul_rate(m, k, n):.0f} |")

    if args.compare_compiled_blocks:
        blocks = compare_compiled_blocks(args, cli_argv)
        print("\nEager against torch.compile of the Llama MLP, RMSNorm and RoPE, alternating blocks of "
              f"{args.block} steps in one process:\n")
        print("| model code | steps | s/step (median) | s/step (mean) |\n|---|---:|---:|---:|")
        for mode, times in blocks.items():
            if times:
                print(f"| {mode} | {len(times)} | {statistics.median(times):.3f} | {statistics.mean(times):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
