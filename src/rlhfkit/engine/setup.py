"""Process-level set-up of a training run, before and after the loop: the precision picked from the
device, the heap's handling of large blocks, the gloo process group of a multi-process run on CPU, the
metrics trackers, and the shutdown of a multi-process run."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..errors import ConfigError

_TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.lower().startswith(("flags", "features"))
            for flag in line.split(":", 1)[-1].split()}


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
LARGE_BLOCKS_KEPT = 1 << 30  # bytes: blocks up to this size come from the heap, and this much free heap is kept


def keep_large_blocks(limit: int = LARGE_BLOCKS_KEPT) -> bool:
    """Have glibc's malloc serve blocks up to ``limit`` bytes from its heap and keep up to ``limit`` bytes of
    freed heap, instead of mapping every block of 32 MiB or more fresh from the OS and unmapping it on free.
    Returns whether it was set (False off Linux/glibc).

    Why: a training step allocates the same large tensors every time (a policy's [rows, vocabulary] float32
    logits and their gradient, the LM head's and the embedding's weight gradients: 32 MiB each for 512 rows
    of a 16,384-token vocabulary). Mapped fresh, each is page-faulted in 4 KiB at a time when first written:
    on bench/'s 2-core VM a new 32 MiB tensor took ~11 ms to zero against 0.7 ms for a reused one, and a GRPO
    step of the 30M-parameter policy took ~24,000 page faults (~50 ms of kernel time) against a handful with
    this setting. The cost: up to ``limit`` of freed memory stays with the process, and the heap's
    fragmentation adds to the peak (+50 MiB on that GRPO run, +80-90 MiB at the scaling bench's long-sequence
    points, measured by bench/bench_scaling.py).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX, Arm BF16); None when it cannot be told."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    flags = _cpu_flags()
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(requested: str, force: bool = False) -> tuple[str, str]:
    """Map ``--precision`` to accelerate's mixed_precision value, with the reason for the log line.

    bf16 on a CPU without bf16 units is emulated, 25-80x slower than fp32: refused unless ``force``.
    """
    requested = requested.lower()
    aliases = {"fp32": "no", "float32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}
    if requested == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "auto: GPU with bf16 support"
        return "no", "auto: no GPU with bf16; bf16 on a CPU without bf16 units is many times slower"
    if requested not in aliases:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not '{requested}'")
    if aliases[requested] == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if aliases[requested] == "bf16" and not torch.cuda.is_available() and cpu_has_bf16_units() is False:
        if not force:
            raise ConfigError("--precision bf16: this CPU has no bf16 units (no avx512_bf16 or amx_bf16), so bf16 "
                              "would run many times slower than fp32 here; use --precision fp32 (or auto), or "
                              "pass --precision bf16 --force-precision to insist")
        return "bf16", "as requested with --force-precision, on a CPU without bf16 units (slow)"
    return aliases[requested], "as requested"


def distributed_on_cpu() -> bool:
    """Launched with several processes (torchrun, accelerate launch) on a machine with no GPU: accelerate
    only sets up the gloo process group when told ``cpu=True``; otherwise every process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def cpu_process_group() -> None:
    """Set up accelerate's process state for a multi-process run on CPU (gloo).

    accelerate only builds the gloo group when told ``cpu=True``, and then files the run as MULTI_CPU,
    which turns FSDP off. Under an FSDP launch the state is re-filed as a multi-device run, so that
    accelerate's own FSDP2 path (``fully_shard`` on a CPU mesh) runs: the same code as on GPUs.
    DeepSpeed (``DS_ACCELERATOR=cpu``) builds the group itself once it is told the backend (gloo).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        PartialState(backend="gloo")
        return
    state = PartialState(cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        state.distributed_type = DistributedType.MULTI_GPU


def shutdown_distributed() -> None:
    """End a multi-process run together: wait for every rank, then tear the process group down.

    A rank that leaves while another is still writing the checkpoint, with the gloo group alive, can
    abort at interpreter exit ("terminate called without an active exception"): the launcher then
    reports the whole run as failed although its work was done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_trackers(report_to: str) -> list[str]:
    """The tracker names of ``--report-to`` (none: []), each checked to be known and installed."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in _TRACKER_MODULES:
            raise ConfigError(f"--report-to: unknown tracker '{name}' (choose from tensorboard, wandb, mlflow)")
        if not any(importlib.util.find_spec(m) for m in _TRACKER_MODULES[name]):
            raise ConfigError(f"--report-to {name}: the '{name}' package is not installed (pip install {name})")
    return names
