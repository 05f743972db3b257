#!/usr/bin/env python
"""Rollout throughput of the two backends on the same model: rlhfkit's HF decode loop vs vLLM.

    .venv/bin/python bench/bench_rollout_backends.py                      # tiny model built here, HF (+ vLLM on a GPU)
    .venv/bin/python bench/bench_rollout_backends.py --model PATH --prompts 256 --max-new-tokens 256
    .venv/bin/python bench/bench_rollout_backends.py --backends hf --device cpu --prompts 8
    .venv/bin/python bench/bench_rollout_backends.py --backends hf,hf-compiled --prompts 1 --num-generations 8 \
        --max-new-tokens 64 --vocab 2048 --repeats 10    # the RL bench's rollout: eager vs --compile-decode

One rollout = ``--prompts`` prompts x ``--num-generations`` samples of up to ``--max-new-tokens`` tokens
(the RL step's sampling half). hf is the HF backend with its eager lean step, hf-fused the same with fused decode
weights whatever their size, hf-loop transformers' own loop (``--no-fast-decode``), and hf-compiled the backend
with ``--compile-decode`` and fused weights at any size (CPU; its package is
built, or loaded from the cache, during the warm-up rollout). Each backend gets one warm-up rollout (vLLM: CUDA graphs, the KV cache; HF:
allocator) and then ``--repeats`` timed ones; tokens/s = generated tokens / wall time, median over repeats.
The log-prob columns compare each backend's reported log-probs of its sampled tokens with the trainer's
full forward (same model, fp32 unless --trainer-dtype), the mismatch rlhfkit's check watches.

vLLM runs only when it is importable and a CUDA GPU is visible; otherwise the table says why it was
skipped. Without --model, a random-init Llama-style model (``--layers``/``--hidden``/``--heads``, a
locally trained tokenizer) is built in a temporary folder: random weights rarely emit EOS, so every
response runs to --max-new-tokens, which makes the rows comparable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rlhfkit.rollout.fast_decode import FastDecoder  # noqa: E402
from rlhfkit.rollout.generate import HFGenerationBackend, SamplingConfig  # noqa: E402
from rlhfkit.rollout.logprob_check import compare_logprobs, response_mask, trainer_logprobs  # noqa: E402

HF_BACKENDS = ("hf", "hf-compiled", "hf-fused", "hf-loop")
FUSE_MAX_BYTES = FastDecoder.FUSE_MAX_BYTES

WORDS = ("river", "mountain", "printing press", "the moon", "a small town", "bread", "winter", "a violin")


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Plain-text prompts of a few varied lengths, as token ids."""
    texts = [f"Tell me {'a long story' if i % 3 == 0 else 'something'} about {WORDS[i % len(WORDS)]}"
             + " and why it matters" * (i % 4) + "." for i in range(count)]
    return [tokenizer(t).input_ids for t in texts]


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vllm not installed ({exc.msg})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


def time_backend(name, backend, model, prompts, args, sampling) -> tuple[dict, object]:
    """Warm-up + timed rollouts; returns the row and the last rollout."""
    backend.generate(model, prompts, args.num_generations, sampling, torch.Generator().manual_seed(0))
    times, tokens, steps, rollout = [], [], [], None
    for r in range(args.repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rollout = backend.generate(model, prompts, args.num_generations, sampling,
                                   torch.Generator().manual_seed(r + 1))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(rollout.lengths))
        steps.append(rollout.decode_steps)
    rates = [n / t for n, t in zip(tokens, times)]
    return {"backend": name, "rollout_s": statistics.median(times), "new_tokens": int(statistics.median(tokens)),
            "tokens_per_s": statistics.median(rates),
            "ms_per_token_step": statistics.median(1e3 * t / n for t, n in zip(times, steps)), "ended": sum(rollout.ended) / len(rollout.ended)}, rollout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a causal LM folder or hub id (default: build a tiny one here)")
    p.add_argument("--backends", default="hf,hf-compiled,vllm",
                   help="hf (the eager lean step), hf-compiled (--compile-decode), hf-fused (the eager step with fused "
                   "weights at any size), hf-loop (--no-fast-decode: transformers' loop), vllm")
    p.add_argument("--device", default="auto", help="HF backend device: auto, cpu, cuda")
    p.add_argument("--hf-dtype", default="auto", help="HF backend weights: auto (bf16 on CUDA, fp32 on CPU), "
                                                     "float32, bfloat16")
    p.add_argument("--trainer-dtype", default="float32", help="dtype of the trainer forward for the log-prob columns")
    p.add_argument("--vllm-dtype", default="auto")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--vllm-enforce-eager", action="store_true")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = None
    model_path = args.model
    if model_path is None:
        from rlhfkit.models.tiny import build_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="rlhfkit_bench_")
        model_path = str(build_tiny_model(tmp.name, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                          vocab=args.vocab, max_positions=1024))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    hf_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                "bfloat16": torch.bfloat16, "float16": torch.float16}[args.hf_dtype]
    trainer_dtype = getattr(torch, args.trainer_dtype)
    trainer = AutoModelForCausalLM.from_pretrained(model_path, dtype=trainer_dtype).to(device).eval()
    prompts = make_prompts(tokenizer, args.prompts)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rows = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name in HF_BACKENDS:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=hf_dtype).to(device).eval()
            # hf-fused, hf-compiled: fused decode weights whatever their size (the default fuses up to 128 MiB of
            # them, and compiles only a fused step)
            FastDecoder.FUSE_MAX_BYTES = 1 << 40 if name in ("hf-fused", "hf-compiled") else FUSE_MAX_BYTES
            backend = HFGenerationBackend(tokenizer, fast_decode=name != "hf-loop",
                                          compile_decode=name == "hf-compiled")
            label = f"{name} ({device.type}, {str(hf_dtype).removeprefix('torch.')})"
        elif name == "vllm":
            why = vllm_unavailable()
            if why:
                rows.append({"backend": "vllm", "skipped": why})
                continue
            from rlhfkit.rollout.vllm_backend import VLLMGenerationBackend

            model = None
            backend = VLLMGenerationBackend(model_path, tokenizer, dtype=args.vllm_dtype, seed=0,
                                            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                            enforce_eager=args.vllm_enforce_eager,
                                            max_model_len=max(map(len, prompts)) + args.max_new_tokens)
            label = f"vllm (cuda, {args.vllm_dtype})"
        else:
            raise SystemExit(f"unknown backend '{name}' ({', '.join(HF_BACKENDS)}, vllm)")
        row, rollout = time_backend(label, backend, model, prompts, args, sampling)
        reference = trainer_logprobs(trainer, rollout.prompt_ids, rollout.response_ids, args.temperature,
                                     tokenizer.pad_token_id)
        width = reference.shape[1]
        match = compare_logprobs(rollout.logprobs[:, :width], reference, response_mask(rollout.lengths, width))
        row.update(logprob_diff_mean=match.diff_mean, logprob_diff_max=match.diff_max,
                   importance_ratio_mean=match.ratio_mean)
        rows.append(row)
        del backend, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"\nmodel {args.model or f'tiny random Llama ({args.layers} layers, hidden {args.hidden})'}; "
          f"{args.prompts} prompts x {args.num_generations} samples, <= {args.max_new_tokens} new tokens, "
          f"T={args.temperature}; median of {args.repeats}; torch {torch.__version__}, GPU {gpu}, "
          f"{platform.processor() or platform.machine()}\n")
    print("| backend | rollout s | new tokens | tokens/s | ms per token step | ended | mean abs Δlogp | max abs Δlogp "
          "| ratio mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['backend']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        print(f"| {row['backend']} | {row['rollout_s']:.2f} | {row['new_tokens']} | {row['tokens_per_s']:.0f} | "
              f"{row['ms_per_token_step']:.2f} | {row['ended']:.2f} | {row['logprob_diff_mean']:.2e} | {row['logprob_diff_max']:.2e} | "
              f"{row['importance_ratio_mean']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
