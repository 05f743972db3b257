#!/usr/bin/env python
"""Reward-model and DPO training with each prompt packed once for its responses (``--share-prompts``, the
default) against every response packed whole (``--no-share-prompts``): seconds per optimizer step and the
tokens put through the model, from real trainer runs on the same data, model and settings.

    make demo    # (or any finished demo folder) then:
    .venv/bin/python bench/bench_pair_sharing.py --demo-dir runs/demo
    .venv/bin/python bench/bench_pair_sharing.py --model M --rm-data ranked.jsonl --dpo-data pairs.jsonl

With ``--demo-dir`` the model is the demo's SFT model, the reward model trains on the annotators' rankings
(``preferences/ranked.jsonl``, ~7 responses a prompt) and DPO on its pairs (``preferences/ranked_policy.jsonl``),
with the demo's batch size and learning rates. The runs alternate (shared, whole, shared, ...), each
``--steps`` steps; s/step is the median of every run's steps after the first ``--warmup-steps``. The last
column checks that the two layouts trained alike: the largest relative difference of the logged losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rows(folder: Path) -> list[dict]:
    return [row for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", help="a finished demo folder: its sft model and preference files")
    p.add_argument("--model", help="the model both trainers start from (default: DEMO_DIR/sft)")
    p.add_argument("--rm-data", help="reward-model data (default: DEMO_DIR/preferences/ranked.jsonl)")
    p.add_argument("--dpo-data", help="DPO data (default: DEMO_DIR/preferences/ranked_policy.jsonl)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps of a run left out (default 5)")
    p.add_argument("--repeats", type=int, default=2, help="runs per layout and trainer (default 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    demo = Path(args.demo_dir) if args.demo_dir else None
    model = args.model or (demo and str(demo / "sft"))
    data = {"rm": args.rm_data or (demo and str(demo / "preferences" / "ranked.jsonl")),
            "dpo": args.dpo_data or (demo and str(demo / "preferences" / "ranked_policy.jsonl"))}
    if not model or not all(data.values()):
        p.error("give --demo-dir, or --model with --rm-data and --dpo-data")

    from rlhfkit.trainers import DPOConfig, RewardConfig, run_dpo, run_reward

    trainers = {"rm": (run_reward, RewardConfig, {"learning_rate": 5e-4}),
                "dpo": (run_dpo, DPOConfig, {"learning_rate": 2e-5, "beta": 0.1})}
    common = {"max_steps": args.steps, "per_device_batch_size": args.batch_size, "max_length": args.max_length,
              "num_threads": args.threads, "seed": 0, "progress_bar": False, "eval_on_start": False,
              "warmup_ratio": 0.05}
    table = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-pair-sharing-") as work:
        for name, (run, config_class, settings) in trainers.items():
            times: dict[bool, list[float]] = {True: [], False: []}
            tokens: dict[bool, float] = {}
            losses: dict[bool, list[float]] = {}
            for repeat in range(args.repeats):
                for share in (True, False):
                    out = Path(work) / f"{name}-{share}-{repeat}"
                    summary = run(config_class(model=model, dataset=data[name], output_dir=str(out),
                                               share_prompts=share, **common, **settings))
                    if summary.get("shared_prompts") is not share:
                        raise SystemExit(f"{name}: share_prompts={share} was not used ({summary.get('shared_prompts')})")
                    rows = _rows(out)
                    timed = rows[args.warmup_steps:]
                    times[share] += [r["step_time_s"] for r in timed]
                    tokens[share] = statistics.mean(r["tokens_per_s"] * r["step_time_s"] for r in timed)
                    losses[share] = [r["loss"] for r in rows]
            shared, whole = (statistics.median(times[s]) for s in (True, False))
            drift = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses[True], losses[False], strict=True))
            table.append((name, tokens[False], tokens[True], whole, shared, whole / shared, drift))
    import torch

    print(f"\nmodel {model}; batch {args.batch_size}, {args.steps} steps x {args.repeats} runs per layout "
          f"(median of the steps after {args.warmup_steps}); {args.threads} threads, torch {torch.__version__}\n")
    print("| trainer | tokens per step, whole / shared | s/step whole | s/step shared | speed-up | max loss diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tw, ts, w, s, ratio, drift in table:
        print(f"| {name} | {tw:.0f} / {ts:.0f} | {w:.3f} | {s:.3f} | {ratio:.2f}× | {drift:.1e} |")


if __name__ == "__main__":
    main()
