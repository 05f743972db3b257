#!/usr/bin/env python
"""Shared-prompt packing (RLConfig.share_prompts) against packing every sample whole: one update forward +
backward and one reference forward (no grad) of a GRPO group, per prompt length.

    .venv/bin/python bench/bench_shared_prompts.py                       # prompt lengths 9, 64, 256
    .venv/bin/python bench/bench_shared_prompts.py --prompt-lengths 9,64 --repeats 20

Model: the RL bench's tiny Llama (bench/bench_rl_vs_trl.py: hidden 256, 4 layers, vocab 2048, fp32, random
init), rlhfkit's packed attention; a group of --group samples of --response-length tokens. The two layouts are
timed alternately in one process; the table gives the median (and minimum) ms per call and the tokens fed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-lengths", default="9,64,256")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.data import pack_batch, pack_shared_prompts
    from rlhfkit.losses import selected_token_logprobs
    from rlhfkit.models.attention import use_packed_attention
    from rlhfkit.models.forward import loss_logits, loss_targets

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=1024, attn_implementation="sdpa"))
    assert use_packed_attention(model)

    def update(batch, weights):
        logits, _ = loss_logits(model, batch)
        (selected_token_logprobs(logits, loss_targets(batch)) * weights).sum().backward()

    def reference(batch, weights):
        with torch.no_grad():
            loss_logits(model, batch)

    rows = []
    for prompt_length in (int(x) for x in args.prompt_lengths.split(",")):
        prompt = torch.randint(3, 2048, (prompt_length,)).tolist()
        responses = [torch.randint(3, 2048, (args.response_length,)).tolist() for _ in range(args.group)]
        layouts = {
            "whole": pack_batch([prompt + r for r in responses],
                                [[0] * prompt_length + [1] * len(r) for r in responses]),
            "shared": pack_shared_prompts([prompt] * args.group, responses),
        }
        weights = torch.randn(args.group * args.response_length)
        for phase, fn in (("update fwd+bwd", update), ("reference fwd", reference)):
            times: dict[str, list[float]] = {name: [] for name in layouts}
            for batch in layouts.values():  # warm-up
                fn(batch, weights)
            for _ in range(args.repeats):
                for name, batch in layouts.items():
                    start = time.perf_counter()
                    fn(batch, weights)
                    times[name].append(time.perf_counter() - start)
                    model.zero_grad(set_to_none=True)
            whole, shared = (statistics.median(times[n]) * 1e3 for n in ("whole", "shared"))
            rows.append((prompt_length, phase, layouts["whole"]["num_tokens"], layouts["shared"]["num_tokens"],
                         whole, min(times["whole"]) * 1e3, shared, min(times["shared"]) * 1e3, whole / shared))
    print(f"group {args.group} x {args.response_length} response tokens, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| prompt tokens | phase | tokens whole / shared | whole ms (min) | shared ms (min) | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    for p, phase, tw, ts, w, wmin, s, smin, ratio in rows:
        print(f"| {p} | {phase} | {tw} / {ts} | {w:.1f} ({wmin:.1f}) | {s:.1f} ({smin:.1f}) | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
