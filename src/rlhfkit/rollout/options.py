"""The rollout engine's options, shared by every online trainer: which engine samples (rlhfkit's KV-cache
decode loop or vLLM) and how rlhfkit's own loop decodes. ``build_rollout_backend`` reads them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..engine import arg
from ..errors import ConfigError

__all__ = ["ROLLOUT_BACKENDS", "RolloutOptions", "check_rollout_options", "compile_decode_by_default"]

ROLLOUT_BACKENDS = ("hf", "vllm")
REWARD_ENSEMBLES = ("mean", "min", "mean_minus_std")  # how several reward sources combine


def compile_decode_by_default() -> bool:
    """Whether ``--compile-decode`` is on unless a flag says otherwise: yes, but ``RLHFKIT_COMPILE_DECODE=0``
    turns it off for a whole process tree (the test suite does: every tiny model shape and sampling setting
    would build its own package)."""
    return os.environ.get("RLHFKIT_COMPILE_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class RolloutOptions:
    """How rollouts are sampled (a mixin of the online trainers' configs)."""

    fast_decode: bool = arg(True, "Decode Llama/Mistral/Qwen2 policies with rlhfkit's lean step (in-place KV "
                            "buffer; same tokens and log-probs); --no-fast-decode keeps the transformers loop.")
    compile_decode: bool = arg(compile_decode_by_default(), "CPU: run that decode step ahead-of-time compiled "
                               "(torch.export + AOTInductor; needs a C++ compiler), for policies whose fused "
                               "decode weights fit 128 MiB. Built once per model shape and sampling setting in a "
                               "child process before the first rollout, and cached in $RLHFKIT_CACHE (default "
                               "~/.cache/rlhfkit): every rollout of a run decodes the same way, so runs repeat "
                               "and resume exactly. Samples drawn the same way, log-probs within 1e-5 of the "
                               "eager step's. Without a compiler: the eager step and one log line. "
                               "--no-compile-decode (or RLHFKIT_COMPILE_DECODE=0) keeps the eager step.")
    rollout_backend: str = arg("hf", "Rollout engine: hf (rlhfkit's KV-cache decode loop) or vllm (needs vLLM and a "
                               "CUDA GPU; its weights are synced after each update and the trainer re-scores its "
                               "samples for PPO's old log-probs).")
    vllm_gpu_memory_utilization: float = arg(0.3, "Share of the GPU vLLM may take (weights + KV cache); the "
                                             "trainer uses the rest.")
    vllm_dtype: str = arg("auto", "vLLM weight dtype: auto (the checkpoint's), bfloat16, float16 or float32.")
    vllm_enforce_eager: bool = arg(False, "Run vLLM without CUDA graphs (faster start, less memory, slower decode).")
    vllm_sleep: bool = arg(False, "Put vLLM to sleep between rollouts (KV cache freed, weights offloaded to CPU).")


def check_rollout_options(config: Any) -> None:
    if config.rollout_backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"--rollout-backend must be one of {', '.join(ROLLOUT_BACKENDS)}, "
                          f"not '{config.rollout_backend}'")
