#!/usr/bin/env python
"""The per-rollout start of the lean decode step: its refill of the fused weights by MKL's transposition
against the blocked ``copy_``.

    .venv/bin/python bench/bench_decode_fill.py                   # the RL bench's 5M and the scaling bench's 30M shapes
    .venv/bin/python bench/bench_decode_fill.py --model-dir bench/results/scaling-work/model-30M --repeats 30

Before every rollout the lean decode step copies the policy's q/k/v, o, gate/up, down and LM-head weights into
``[in, out]`` buffers with the RMSNorm weights folded in (``rlhfkit.rollout.fast_decode._fill``): a transposing
copy of every decode weight, once per optimizer update. This times ``FastDecoder.start`` (that refill, the KV
buffers and the RoPE tables) for the RL bench's rollout of 8 x (7 + 64) tokens, the refill each way: ``mkl``
(``MKL_Somatcopy``, where PyTorch links MKL) and ``blocked`` (the fallback, ``copy_`` of ``_COPY_ROWS``-row
blocks). ``hot``: the weights and buffers in cache from the previous repeat;
``cold``: a 256 MiB write between repeats evicts them, as a training step's forward, backward and AdamW do.
Without ``--model-dir`` the models are bench_scaling.py's 5M and 30M (its ``build_model``, random init).
Prints a Markdown table; the medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scaling import build_model  # noqa: E402

from rlhfkit.rollout import fast_decode  # noqa: E402

DEFAULT_SIZES = ("5M", "30M")  # the sizes whose fused decode weights fit FastDecoder.FUSE_MAX_BYTES


def time_start(decoder: fast_decode.FastDecoder, repeats: int, cold: bool) -> tuple[float, dict]:
    """Median ms of ``FastDecoder.start`` for the RL bench's rollout (8 rows, a 7-token prompt, 64 new tokens):
    the refill of the fused weights and the per-rollout KV buffers and RoPE tables; and the filled weights."""
    rows, prompt, total = 8, 7, 7 + 64
    config = decoder.model.config
    kv = torch.zeros(rows, config.num_key_value_heads, prompt, decoder.head_dim)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=kv, values=kv) for _ in decoder.layers])
    key_mask, positions = torch.ones(rows, total, dtype=torch.long), torch.full((rows,), prompt)
    evict = torch.empty(64 * 2**20) if cold else None
    times = []
    decoder.start(cache, key_mask, total, positions)  # allocates the buffers, as the first rollout does
    for _ in range(repeats):
        if evict is not None:
            evict.fill_(1.0)
        start = time.perf_counter()
        decoder.start(cache, key_mask, total, positions)
        times.append(time.perf_counter() - start)
    filled = {k: v.clone() for k, v in fast_decode._FUSED_BUFFERS[decoder.model].items()}
    return statistics.median(times) * 1e3, filled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", action="append", default=None, help="a local Llama-layout model (repeatable)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rlhfkit.models import load_causal_lm

    work = Path(tempfile.mkdtemp(prefix="rlhfkit-decode-fill-"))
    dirs = args.model_dir or [build_model(work, size) for size in DEFAULT_SIZES]  # the scaling bench's own models
    models = {Path(d).name: load_causal_lm(str(d)).eval() for d in dirs}
    has_mkl = bool(fast_decode._mkl_omatcopy())
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"MKL transposition {'found' if has_mkl else 'not found'}; medians of {args.repeats}\n")
    print("| model | fused decode weights MiB | start, mkl hot ms | blocked hot ms | mkl cold ms | blocked cold ms | cold: blocked / mkl |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    found = fast_decode._mkl_omatcopy
    for name, model in models.items():
        decoder = fast_decode.fast_decoder(model)
        if decoder is None:
            print(f"| {name} | not a layout the lean decode step takes | | | | | |")
            continue
        row, filled = {}, {}
        for cold in (False, True):
            for way in ("mkl", "blocked"):
                fast_decode._mkl_omatcopy = found if way == "mkl" else (lambda: {})
                row[way, cold], filled[way] = time_start(decoder, args.repeats, cold)
        fast_decode._mkl_omatcopy = found
        if not all(torch.equal(filled["mkl"][k], filled["blocked"][k]) for k in filled["mkl"]):
            raise SystemExit(f"{name}: the two ways filled different values")
        mib = decoder._fused_bytes() / 2**20
        print(f"| {name} | {mib:.0f} | {row['mkl', False]:.2f} | {row['blocked', False]:.2f} | {row['mkl', True]:.2f} "
              f"| {row['blocked', True]:.2f} | {row['blocked', True] / row['mkl', True]:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
