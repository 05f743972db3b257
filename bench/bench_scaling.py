#!/usr/bin/env python
"""How cost grows: rlhfkit against TRL on a grid of model sizes x sequence lengths, one table and one plot.

    .venv/bin/python bench/bench_scaling.py                             # the whole grid (hours on 2 cores)
    .venv/bin/python bench/bench_scaling.py --sizes 5M,30M --bands short,mid
    .venv/bin/python bench/bench_scaling.py --sizes 120M --bands mid --stages sft,dpo --steps 4 --warmup-steps 1
    .venv/bin/python bench/bench_scaling.py --table bench/results/scaling/*.json   # re-tabulate, re-plot

Every grid point runs the side-by-side benches as they are, with the model and lengths of that point:
``bench_vs_trl.py`` for SFT, RM and DPO (same model, data, hyper-parameters, fp32, each run in its own
process, peak RSS = VmHWM) and ``bench_rl_vs_trl.py`` for GRPO and RLOO (one step = one rollout + update).
So every figure here is measured the way those scripts measure it (see their docstrings).

* Models: Llama configs built locally (the bench tokenizer, random weights), 5M (4 x 256, vocabulary
  2,048), 30M (4 x 512, vocabulary 16,384) and 120M (10 x 768, vocabulary 16,384); the vocabulary is
  widened past the tokenizer's 2,048 so the LM head costs what it costs in real models.
* Length bands: prompt + response of 16-256, 256-1024 and 1024-2048 tokens, uniform; the batch holds about
  ``--tokens-per-step`` tokens (one sequence at least), so a step costs about the same in every band.
* The ceiling: the best fp32 matmul rate of this machine with the same threads, measured in the same run
  (square and transformer-shaped products, best of several). Useful FLOPs per trained token follow the
  usual convention (PaLM's MFU): 6 x (parameters in matmuls: the layers and the LM head) for a forward +
  backward, plus attention 6 x layers x hidden x T_eff with T_eff the token-weighted mean length (causal:
  half of the full T x T product). DPO adds the frozen reference's forward (2 x). The RM has no LM head.

Results: ``--out`` (default bench/results/scaling/, gitignored) gets one JSON per point and the table
(scaling.md); the plot goes to ``--plot`` (default bench/measured/scaling.png, shown in the README).
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_vs_trl as base  # noqa: E402

SIZES = {  # name -> Llama shape (intermediate = 4 x hidden); vocab None = the tokenizer's own 2,048
    "5M": {"layers": 4, "hidden": 256, "heads": 4, "vocab": None},
    "30M": {"layers": 4, "hidden": 512, "heads": 8, "vocab": 16384},
    "120M": {"layers": 10, "hidden": 768, "heads": 12, "vocab": 16384},
}
BANDS = {"short": (16, 256), "mid": (256, 1024), "long": (1024, 2048)}
OFFLINE = ("sft", "rm", "dpo")
ONLINE = ("grpo", "rloo")


# ------------------------------------------------------------------------------------------- model, ceiling
def build_model(work: Path, size: str) -> Path:
    """The Llama of ``size`` in ``work/model-SIZE`` (made once, reused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.tiny import build_tiny_model

    out = work / f"model-{size}"
    if (out / "config.json").exists():
        return out
    shape = SIZES[size]
    build_tiny_model(
        out,
        layers=shape["layers"],
        hidden=shape["hidden"],
        heads=shape["heads"],
        vocab=2048,
        max_positions=2048,
    )
    if shape["vocab"]:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model.resize_token_embeddings(shape["vocab"], mean_resizing=False)
        model.save_pretrained(out)
    return out


def flop_shape(model_dir: Path) -> dict:
    """Parameters that do matmuls per token: the decoder layers, the LM head; and the attention shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "layer_matmul_params": layers,
        "head_params": config.hidden_size * config.vocab_size,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }


def matmul_rate(m: int, k: int, n: int) -> float:
    """Best fp32 GFLOP/s of one [m, k] x [k, n] torch.matmul repeated with its operands in cache (the best of
    5 timings of ~2e10 FLOPs each)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(a, b)
    reps = max(1, int(2e10 / (2 * m * k * n)))
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_ceiling(threads: int) -> float:
    """Best fp32 GFLOP/s of torch.matmul on this machine with ``threads`` threads (square and
    transformer-shaped products, :func:`matmul_rate` each)."""
    import torch

    torch.set_num_threads(threads)
    shapes = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 768, 3072), (4096, 3072, 768), (4096, 512, 2048),
              (2048, 768, 16384))
    return max(matmul_rate(m, k, n) for m, k, n in shapes)


def flops_per_token(stage: str, shape: dict, t_eff: float) -> float:
    """Useful training FLOPs per trained token (see the module docstring)."""
    attention = shape["layers"] * shape["hidden"] * t_eff  # forward: 2 x (QK^T + AV) x causal half
    if stage == "rm":
        return 6 * shape["layer_matmul_params"] + 6 * attention
    forward = 2 * (shape["layer_matmul_params"] + shape["head_params"]) + 2 * attention
    return 3 * forward + (forward if stage == "dpo" else 0)


# ---------------------------------------------------------------------------------------------- one point
def run_point(args, work: Path, size: str, band: str) -> dict:
    lo, hi = BANDS[band]
    model_dir = build_model(work, size)
    batch = max(1, round(args.tokens_per_step / ((lo + hi) / 2)))
    point = {
        "size": size,
        "band": band,
        "min_tokens": max(lo, 16),
        "max_tokens": hi,
        "batch": batch,
        "shape": flop_shape(model_dir),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    common = [
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--threads",
        str(args.threads),
        "--model-dir",
        str(model_dir),
        "--timeout",
        str(args.timeout),
    ]
    offline = [s for s in args.stages if s in OFFLINE]
    if offline:
        print(f"== {size} x {band}: {' '.join(offline)}, batch {batch}", flush=True)
        lengths = ["--min-tokens", str(point["min_tokens"]), "--max-tokens", str(hi), "--max-length", str(hi)]
        point["offline"] = _bench(
            "bench_vs_trl.py",
            offline,
            args.out / f"{size}-{band}{'-gc' if args.gradient_checkpointing else ''}-offline.json",
            work / f"{size}-{band}",
            ["--batch-size", str(batch), *lengths, *common]
            + (["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        )
    online = [s for s in args.stages if s in ONLINE]
    if online and band == "short":  # a rollout's length is its own (64 new tokens): one band is enough
        print(f"== {size}: {' '.join(online)}", flush=True)
        point["online"] = _bench(
            "bench_rl_vs_trl.py",
            online,
            args.out / f"{size}-online.json",
            work / f"{size}-rl",
            ["--libraries", "rlhfkit,rlhfkit-eager,trl", *common],
        )
    return point


def _bench(script: str, stages: list[str], out: Path, workdir: Path, options: list[str]) -> dict:
    """Run one of the side-by-side benches on ``stages``; its results payload ({} if it wrote none)."""
    cmd = [
        sys.executable,
        str(HERE / script),
        "--only",
        ",".join(stages),
        "--workdir",
        str(workdir),
        "--results-json",
        str(out),
        *options,
    ]
    subprocess.run(cmd, check=False)
    return json.loads(out.read_text()) if out.exists() else {}


# ------------------------------------------------------------------------------------------- table, plot
def merge_point(earlier: dict, rerun: dict) -> dict:
    """A point rerun for some stages (``--stages sft``): its results replace those stages' and the earlier
    run's other results stay, each row keeping the matmul ceiling of the run that measured it."""
    merged = dict(rerun)
    for part, key in (("offline", "stage"), ("online", "algo")):
        old = [{**r, "ceiling_gflops": r.get("ceiling_gflops") or earlier.get("ceiling_gflops")}
               for r in (earlier.get(part) or {}).get("results", [])]
        if part not in rerun:
            if part in earlier:
                merged[part] = {**earlier[part], "results": old}
            continue
        new = rerun[part].get("results", [])
        redone = {r.get(key) for r in new}
        merged[part] = {**rerun[part], "results": [r for r in old if r.get(key) not in redone] + new}
    return merged


def offline_rows(point: dict, ceiling: float) -> list[dict]:
    """One row per offline stage: both libraries' figures at this point (FLOP shares of the ceiling measured in
    the run that measured the row, else in the point's run, else of ``ceiling``)."""
    ceiling = point.get("ceiling_gflops") or ceiling
    results = point.get("offline", {}).get("results", [])
    data = point.get("offline", {}).get("data", {})
    rows = []
    for stage in OFFLINE:
        by_lib = {r["library"]: r for r in results if r.get("stage") == stage and "error" not in r}
        if not by_lib:
            continue
        lengths = data.get("t_eff", {}).get("sft" if stage == "sft" else "pref")
        t_eff = lengths or (point["min_tokens"] + point["max_tokens"]) / 2
        per_token = flops_per_token(stage, point["shape"], t_eff)
        row = {"size": point["size"], "band": point["band"], "stage": stage, "batch": point["batch"]}
        for lib, r in by_lib.items():
            own = r.get("ceiling_gflops") or ceiling
            row[lib] = {
                "s_per_step": r["s_per_step"],
                "tokens_per_s": r["tokens_per_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "flop_share": r["tokens_per_s"] * per_token / (own * 1e9) if own else None,
                "ceiling_gflops": own,
            }
        rows.append(row)
    return rows


def online_rows(point: dict) -> list[dict]:
    results = point.get("online", {}).get("results", [])
    rows = []
    for algo in ONLINE:
        by_lib = {r["library"]: r for r in results if r.get("algo") == algo and "error" not in r}
        if by_lib:
            rows.append(
                {
                    "size": point["size"],
                    "stage": algo,
                    **{
                        lib: {
                            "s_per_step": r["s_per_step"],
                            "gen_s_per_step": r.get("gen_s_per_step"),
                            "peak_rss_mib": r["peak_rss_mib"],
                        }
                        for lib, r in by_lib.items()
                    },
                }
            )
    return rows


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def build_table(points: list[dict], ceiling: float) -> str:
    ceilings = [r[lib]["ceiling_gflops"] for p in points for r in offline_rows(p, ceiling)
                for lib in ("rlhfkit", "trl") if lib in r and r[lib]["ceiling_gflops"]] or [ceiling]
    lines = [
        "fp32 matmul ceiling of this machine, measured in each run: "
        + "–".join(f"{c:.1f}" for c in sorted({min(ceilings), max(ceilings)}))
        + " GFLOP/s (FLOP shares are of the run's own)",
        "",
        "| model | tokens | stage | batch | rlhfkit tok/s | TRL tok/s | speed-up | rlhfkit RSS MiB | TRL RSS MiB "
        "| rlhfkit FLOP share | TRL FLOP share |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        for row in offline_rows(point, ceiling):
            ours, trl = row.get("rlhfkit", {}), row.get("trl", {})
            lo, hi = BANDS[row["band"]]
            ckpt = " (checkpointed)" if point.get("gradient_checkpointing") else ""
            lines.append(
                f"| {row['size']} | {lo}–{hi} | {row['stage'].upper()}{ckpt} | {row['batch']} "
                f"| {ours.get('tokens_per_s', 0):,.0f} | {trl.get('tokens_per_s', 0):,.0f} "
                f"| {_ratio(ours.get('tokens_per_s'), trl.get('tokens_per_s'))} "
                f"| {ours.get('peak_rss_mib', 0):,.0f} | {trl.get('peak_rss_mib', 0):,.0f} "
                f"| {ours.get('flop_share') or 0:.0%} | {trl.get('flop_share') or 0:.0%} |"
            )
    online = [row for point in points for row in online_rows(point)]
    if online:
        lines += [
            "",
            "| model | algorithm | rlhfkit defaults s/step (generation) | rlhfkit eager decode s/step (generation) "
            "| TRL s/step (generation) | speed-up, defaults | speed-up, eager | rlhfkit RSS MiB | TRL RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def cell(r: dict) -> str:
            return f"{r['s_per_step']:.2f} ({r.get('gen_s_per_step') or 0:.2f})" if r else "—"

        for row in online:
            ours, eager, trl = (row.get(lib, {}) for lib in ("rlhfkit", "rlhfkit-eager", "trl"))
            lines.append(
                f"| {row['size']} | {row['stage'].upper()} | {cell(ours)} | {cell(eager)} | {cell(trl)} "
                f"| {_ratio(trl.get('s_per_step'), ours.get('s_per_step'))} "
                f"| {_ratio(trl.get('s_per_step'), eager.get('s_per_step'))} "
                f"| {ours.get('peak_rss_mib', 0):,.0f} | {trl.get('peak_rss_mib', 0):,.0f} |"
            )
    return "\n".join(lines)


def plot(points: list[dict], ceiling: float, path: Path) -> None:
    """Useful tokens/s (log-log), one column per stage: against sequence length (top row, colour = model
    size) and against model size (bottom row, colour = length band); circles and solid lines = rlhfkit,
    hollow squares and dashed lines = TRL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plain = [p for p in points if not p.get("gradient_checkpointing")] or points  # one line per size or band
    rows = [row for point in plain for row in offline_rows(point, ceiling)]
    stages = [s for s in OFFLINE if any(r["stage"] == s for r in rows)]
    if not stages:
        return
    params = {p["size"]: p["shape"]["params"] for p in points if "params" in p.get("shape", {})}
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 7.0), squeeze=False)
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c")
    styles = {
        "rlhfkit": {"linestyle": "-", "marker": "o"},
        "trl": {"linestyle": "--", "marker": "s", "markerfacecolor": "none"},
    }
    # (row of panels, what a line holds, its x, the x axis label)
    views = (
        (0, SIZES, lambda r: sum(BANDS[r["band"]]) / 2, "size", "mean tokens per sequence"),
        (1, BANDS, lambda r: params.get(r["size"]), "band", "parameters"),
    )
    for row, groups, x_of, key, label in views:
        for ax, stage in zip(axes[row], stages):
            for color, group in zip(palette, groups):
                mine = sorted(
                    (r for r in rows if r["stage"] == stage and r[key] == group and x_of(r)), key=x_of
                )
                for lib, style in styles.items():
                    xy = [(x_of(r), r[lib]["tokens_per_s"]) for r in mine if lib in r]
                    if xy:
                        name = group if key == "size" else "{}–{} tokens".format(*BANDS[group])
                        ax.plot(*zip(*xy), color=color, label=f"{name} {lib}", **style)
            ax.set(xscale="log", yscale="log", title=stage.upper(), xlabel=label)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        axes[row][0].set_ylabel("useful tokens / s (fp32, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument(
        "--bands",
        default=",".join(BANDS),
        help="comma-separated: short (16-256), mid (256-1024), long (1024-2048)",
    )
    p.add_argument(
        "--stages", default="sft,rm,dpo,grpo,rloo", help="comma-separated (grpo, rloo: short band)"
    )
    p.add_argument("--tokens-per-step", type=int, default=4096, help="batch ~ this many tokens / mean length")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument(
        "--warmup-steps", type=int, default=2, help="first steps left out of the timing (default 2)"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="SFT/RM/DPO with activation checkpointing in both libraries (point files get a -gc suffix)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--workdir", default=str(base.RESULTS / "scaling-work"), help="models, data, logs")
    p.add_argument("--out", default=str(base.RESULTS / "scaling"), help="one JSON per grid point + the table")
    p.add_argument("--plot", default=str(HERE / "measured" / "scaling.png"))
    p.add_argument(
        "--table",
        nargs="+",
        metavar="POINT_JSON",
        default=None,
        help="only re-tabulate and re-plot these point files (globs allowed)",
    )
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.bands = [s for s in args.bands.split(",") if s]
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.sizes if s not in SIZES] + [b for b in args.bands if b not in BANDS]
    bad += [s for s in args.stages if s not in OFFLINE + ONLINE]
    if bad:
        p.error(f"unknown size, band or stage: {', '.join(bad)}")
    args.out = Path(args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base.use_child_env(args.threads)
    if args.table:
        files = sorted({f for pattern in args.table for f in glob.glob(pattern)})
        by_point = {}  # (size, band, checkpointing) -> its point file (a rerun merges into it when measured)
        for f in files:
            if Path(f).name.startswith("point-"):
                point = json.loads(Path(f).read_text())
                by_point[point["size"], point["band"], bool(point.get("gradient_checkpointing"))] = point
        points = [
            by_point[k]
            for k in sorted(by_point, key=lambda k: (list(SIZES).index(k[0]), list(BANDS).index(k[1]), k[2]))
        ]
        ceiling = max((p.get("ceiling_gflops", 0) for p in points), default=0)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        ceiling = matmul_ceiling(args.threads)
        print(f"fp32 matmul ceiling: {ceiling:.1f} GFLOP/s ({args.threads} threads)", flush=True)
        points = []
        for size in args.sizes:
            for band in args.bands:
                point = run_point(args, work, size, band) | {
                    "ceiling_gflops": ceiling,
                    "git": base.git_state(),
                }
                suffix = "-gc" if args.gradient_checkpointing else ""
                path = args.out / f"point-{size}-{band}{suffix}.json"
                if path.is_file():  # other stages of this point measured before stay in its file
                    point = merge_point(json.loads(path.read_text()), point)
                path.write_text(json.dumps(point, indent=1))
                points.append(point)
    table = build_table(points, ceiling)
    print("\n" + table)
    if not args.table:
        (args.out / "scaling.md").write_text(table + "\n")
    plot(points, ceiling, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
