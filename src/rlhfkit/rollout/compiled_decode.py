"""The lean decode step compiled ahead of time (torch.export + AOTInductor), built once in a child process.

Why: at one token per row, a decode step of a small policy is ~70 small ops whose dispatch costs more than
their arithmetic. Compiled, the norms, RoPE, SwiGLU, the mask update and the softmax / CDF of the draw fuse
into a few C++ kernels and the step is one call into a shared library: on the 5M-parameter bench model a
step took 1.6 ms instead of 3.1 ms (bench/bench_rl_vs_trl.py has the end-to-end figures).

Why a child process and AOTInductor rather than ``torch.compile`` in the trainer: the compiler's modules
and its working memory (~90 MB on the bench model) would otherwise stay in the training process's peak RSS,
and ``torch.compile`` checks its guards over the ~40 input tensors at every token. Here the child exports
:func:`rlhfkit.rollout.decode_step.decode_and_record` with the batch size and lengths dynamic, compiles
it to a ``.pt2`` package in an on-disk cache, and the trainer only loads the package (a C++ runner; no
compiler import). The weights, KV buffers and slot counter are inputs, so in-place weight updates are seen
and the buffers are written in place, exactly as the eager step does. Tests compare its tokens and
log-probs with the transformers loop.

The cache key holds everything baked into the compiled code: the torch version, the source of the traced
functions (:mod:`rlhfkit.rollout.decode_step`) and of the decoder that lays out their inputs, the tensor
shapes other than batch and length, dtypes, the norm epsilons and attention scales, the activation and the
sampling settings. ``RLHFKIT_CACHE`` (default ``~/.cache/rlhfkit``) moves it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import decode_step, sampling

logger = logging.getLogger("rlhfkit")

# examples the child exports with: any sizes >= 2 work (export specialises sizes 0 and 1)
_EXAMPLE_ROWS, _EXAMPLE_LENGTH, _EXAMPLE_STEPS = 4, 16, 8
_FAILED: list[str] = []  # once building failed in this process, later rollouts decode eagerly without retrying
_LOADED: dict[str, Any] = {}  # package path -> loaded runner
_PATHS: dict[tuple, str] = {}  # the inputs' shapes and the settings -> package path (the key costs ~1.4 ms)


def cache_dir() -> Path:
    root = os.environ.get("RLHFKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlhfkit")
    return Path(root) / "compiled_decode"


class _Step(torch.nn.Module):
    """decode_and_record with the non-tensor settings fixed, as torch.export wants a module."""

    def __init__(self, constants: dict[str, Any], act: Any):
        super().__init__()
        self.constants, self.act = constants, act

    def forward(self, column, uniforms, tokens, logps, lengths, done, eos, slot, embed, plan, head, keys, values,
                attend, cos, sin_signed):
        c = self.constants
        return decode_step.decode_and_record(c["temperature"], c["top_k"], c["top_p"],
                                             (column, uniforms, tokens, logps, lengths, done, eos), slot, embed,
                                             plan, head, keys, values, attend, cos, sin_signed, c["shape"],
                                             self.act)


_RECORD = 7  # (column, uniforms, tokens, logps, lengths, done, eos): see sampling.draw_and_record


def _inputs(decoder: Any, record: tuple[torch.Tensor, ...]) -> list:
    """The step's inputs in export order (nested; None and floats are constants, the rest tensors)."""
    return [*record, *decoder.step_inputs()]


def step_state(decoder: Any) -> list[torch.Tensor]:
    """The package's tensor inputs after the rollout's record, in order: slot, weights, buffers, tables."""
    return [leaf for leaf in pytree.tree_leaves(list(decoder.step_inputs())) if isinstance(leaf, torch.Tensor)]


def _varying_dims(inputs: list) -> list:
    """Per input, {dim: "rows" | "length" | "steps"} for the sizes that vary between rollouts (None: static)."""
    record = [None, {0: "steps", 1: "rows"}, {0: "rows", 1: "steps"}, {0: "rows", 1: "steps"}, {0: "rows"},
              {0: "rows"}, None]
    state = inputs[_RECORD:]
    per_layer = [{0: "rows", 2: "length"}] * len(state[4])
    static = [pytree.tree_map(lambda _: None, x) for x in state[1:4]]
    return [*record, None, *static, per_layer, per_layer, {0: "rows", 3: "length"}, {0: "rows", 1: "length"},
            {0: "rows", 1: "length"}]


def _dynamic_shapes(inputs: list) -> tuple:
    """torch.export's dynamic_shapes for :func:`_varying_dims` (the weights stay static)."""
    from torch.export import Dim

    named = {"rows": Dim("rows", min=1), "length": Dim("length", min=2), "steps": Dim("steps", min=2)}
    return tuple(pytree.tree_map(lambda x: named[x] if isinstance(x, str) else x, dims)
                 for dims in _varying_dims(inputs))


def _spec(decoder: Any, record: tuple[torch.Tensor, ...], temperature: float, top_k: int,
          top_p: float) -> dict[str, Any]:
    """What the child needs to rebuild the step: the inputs as meta tensors (varying sizes at the
    example sizes) and the constants baked into the code."""
    examples = {"rows": _EXAMPLE_ROWS, "length": _EXAMPLE_LENGTH, "steps": _EXAMPLE_STEPS}

    def meta(t: Any, dims: dict[int, str] | None) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = [examples[dims[d]] if dims and d in dims else size for d, size in enumerate(t.shape)]
        return torch.empty(shape, dtype=t.dtype, device="meta")

    inputs = _inputs(decoder, record)
    described = []
    for x, dims in zip(inputs, _varying_dims(inputs)):
        if isinstance(x, list):  # the per-layer KV buffers
            described.append([meta(t, d) for t, d in zip(x, dims)])
        elif isinstance(dims, dict) or dims is None:
            described.append(meta(x, dims))
        else:  # plan / head: nested, static
            described.append(pytree.tree_map(lambda t: meta(t, None), x))
    act = decoder.act
    act_name = "silu" if act is torch.nn.functional.silu else getattr(decoder.model.config, "hidden_act", None)
    return {"inputs": described, "act": act_name, "temperature": float(temperature), "top_k": int(top_k),
            "top_p": float(top_p), "shape": tuple(decoder.shape), "decoder": type(decoder).__module__}


def _key(spec: dict[str, Any]) -> str:
    described = pytree.tree_map(lambda x: (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else x,
                                spec["inputs"])
    text = repr((torch.__version__, _sources(spec["decoder"]), described,
                 {k: v for k, v in spec.items() if k != "inputs"}))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.cache
def _sources(decoder_module: str) -> str:
    """The traced code and the decoder's module (``FastDecoder.step_inputs`` orders the inputs): a change to
    either must not reuse an old package. The decoder's module is looked up, not imported: it imports this one."""
    modules = (decode_step, sampling, sys.modules[decoder_module], sys.modules[__name__])
    return "".join(inspect.getsource(module) for module in modules)


def _activation(name: str | None) -> Any:
    if name == "silu":
        return torch.nn.functional.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def build_package(spec: dict[str, Any], path: Path) -> None:
    """Export and AOT-compile the step described by ``spec`` to ``path`` (runs in the child process)."""
    inputs = pytree.tree_map(lambda x: torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x,
                             spec["inputs"])
    inputs[0].fill_(1)  # the column: any valid step after the first
    inputs[_RECORD].fill_(1)  # the slot: any valid position
    constants = {k: spec[k] for k in ("temperature", "top_k", "top_p", "shape")}
    with torch.no_grad():
        program = torch.export.export(_Step(constants, _activation(spec["act"])), tuple(inputs),
                                      dynamic_shapes=_dynamic_shapes(inputs), strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def compiled_step(decoder: Any, record: tuple[torch.Tensor, ...], temperature: float, top_k: int,
                  top_p: float) -> Any | None:
    """A runner for this decoder's step (built in a child process on a cache miss), or None after a
    failure (logged once; the caller decodes eagerly)."""
    if _FAILED:
        return None
    # everything the key depends on (tensors by shape and dtype; the norm epsilons and scales as they are)
    seen = (str(cache_dir()), temperature, top_k, top_p, decoder.shape, decoder.act,
            tuple((x.shape, x.dtype) if isinstance(x, torch.Tensor) else x
                  for x in pytree.tree_leaves(_inputs(decoder, record))))
    spec = None  # described once per input signature: the key, and a build on a cache miss
    if seen not in _PATHS:
        spec = _spec(decoder, record, temperature, top_k, top_p)
        _PATHS[seen] = str(cache_dir() / f"{_key(spec)}.pt2")
    path = Path(_PATHS[seen])
    if str(path) not in _LOADED:
        try:
            if not path.exists():
                _build_in_child(spec or _spec(decoder, record, temperature, top_k, top_p), path)
            _LOADED[str(path)] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        except Exception as error:  # no C++ compiler, an op the exporter cannot take, a full disk, ...
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            _FAILED.append(message)
            logger.warning("the compiled decode step could not be built (%s); decoding with the eager step "
                           "(--no-compile-decode skips the attempt)", message)
            return None
    return _LOADED[str(path)]


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would call ($CXX, else g++ / c++ / clang++ on the PATH), or None. Looked up
    here, not through inductor, whose import the trainer process never pays (a cached package loads without
    a compiler)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build_in_child(spec: dict[str, Any], path: Path) -> None:
    if cxx_compiler() is None:  # fail in a millisecond, not after the child's imports
        raise RuntimeError("no C++ compiler found ($CXX, g++, c++ or clang++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        spec_file, package = Path(work) / "spec.pt", Path(work) / "step.pt2"
        torch.save(spec, spec_file)
        logger.info("compiling the decode step for this model shape and sampling setting (once; cached in %s; "
                    "--no-compile-decode skips it)", path.parent)
        done = subprocess.run([sys.executable, "-m", "rlhfkit.rollout.compiled_decode", str(spec_file),
                               str(package)], capture_output=True, text=True, env=_child_env())
        if done.returncode != 0 or not package.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"compile child exited with {done.returncode}: {tail[-1] if tail else 'no output'}")
        os.replace(package, path)  # atomic: a concurrent run sees the whole package or none


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[2])  # so the child imports this same rlhfkit
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


if __name__ == "__main__":
    build_package(torch.load(sys.argv[1], weights_only=False), Path(sys.argv[2]))
