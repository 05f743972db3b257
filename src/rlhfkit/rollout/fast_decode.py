"""A lean decode step for Llama-layout decoders (Llama, Mistral, Qwen2), used by the HF rollout backend.

Why: a rollout step of a small policy is bound by per-token overhead, not arithmetic. transformers'
forward rebuilds the attention mask and the rotary cos/sin at every decoded token and grows the KV cache
with ``torch.cat`` (a copy of the whole cache per token and layer); on the 5M-parameter bench model that is
~6 ms per token where the matrix products need < 1 ms. Here the prompt is still prefilled by the model's
own forward; the decoded tokens then go through the model's own parameters (embedding, norms, projections,
MLP, LM head, called as functional kernels) with three things done once per rollout instead of once per
token: a preallocated KV buffer written in place, the rotary table for every buffer slot, and the
attention mask (key padding; each decoded slot is switched on in place as it is written). Every tensor of a
step keeps its shape for the whole rollout and the slot counter is a tensor, so the same step body also
runs ahead-of-time compiled (:mod:`rlhfkit.rollout.compiled_decode`, ``--compile-decode``), and the draw
from the logits, recorded in place, happens inside the step. The step itself lives in
:mod:`rlhfkit.rollout.decode_step` (:func:`~rlhfkit.rollout.decode_step.decode_and_record`), which both the
eager and the compiled path run; this module prepares its inputs and picks the path.

Anything else (LoRA-wrapped layers, other architectures, dynamic RoPE, an active sliding window, weights
partitioned by ZeRO-3) returns ``None`` from :func:`fast_decoder` and the backend keeps the plain
transformers loop. Tests check that both paths give the same tokens and log-probs.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from .decode_step import decode_and_record

# transformers model types whose decoder layer is: x + attn(input_layernorm(x)), then
# x + mlp(post_attention_layernorm(x)), attention = q/k/v/o projections with RoPE on q and k.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
# RoPE variants whose cos/sin depend on the position only (not on the sequence length seen so far).
STATIC_ROPE = ("default", "linear", "llama3")

# model -> its fused weight buffers, refilled in place at every rollout: a fresh 10+ MB allocation per
# rollout costs more in page faults (~4 ms on the bench model) than the copy itself
_FUSED_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COPY_ROWS = 512  # rows of an [out, in] weight transposed per copy in _fill (512 x 512 fp32: 1 MiB)


@functools.cache
def _mkl_omatcopy() -> dict[torch.dtype, Any]:
    """MKL's out-of-place transposition (C interface ``MKL_Somatcopy`` / ``MKL_Domatcopy``: B = alpha · Aᵀ,
    cache-blocked and threaded) from the MKL that PyTorch's x86 CPU builds link in and export, by dtype; {}
    where there is none. (The lower-case ``mkl_somatcopy`` is the Fortran interface: arguments by pointer.)"""
    import ctypes

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        found = {torch.float32: (lib.MKL_Somatcopy, ctypes.c_float), torch.float64: (lib.MKL_Domatcopy,
                                                                                     ctypes.c_double)}
    except (OSError, AttributeError):  # not Linux, or a build without MKL (aarch64)
        return {}
    size, pointer, char = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char
    for fn, scalar in found.values():
        fn.argtypes = [char, char, size, size, scalar, pointer, size, pointer, size]
        fn.restype = None
    return {dtype: fn for dtype, (fn, _) in found.items()}


def _mkl_transpose(part: torch.Tensor, out: torch.Tensor, col: int) -> bool:
    """``out[:, col:col + rows].copy_(part.t())`` through MKL's transposition, for contiguous float32 / float64
    CPU tensors; False (nothing written) where it does not apply."""
    fn = _mkl_omatcopy().get(part.dtype) if part.device.type == "cpu" and out.dtype == part.dtype else None
    if fn is None or not (part.is_contiguous() and out.is_contiguous()) or part.numel() == 0:
        return False
    rows, cols = part.shape
    fn(b"R", b"T", rows, cols, 1.0, part.data_ptr(), cols, out.data_ptr() + col * out.element_size(), out.shape[1])
    return True


def _fill(buffers: dict[str, torch.Tensor], name: str, parts: list[torch.Tensor],
          scale: torch.Tensor | None) -> torch.Tensor:
    """``[in, out]`` copy of the ``[out, in]`` weights ``parts`` stacked along the output, each input row
    times ``scale`` if given (the product in float32 for bf16 / fp16 weights), into a reused buffer.

    Why transposed: with a handful of rows (one token per sample) the product is bound by reading the
    weight, and MKL often reads an ``[in, out]`` matrix faster than the transposed view that ``F.linear``
    hands it (up to 2x on the bench model's 8-row shapes; on the scaling bench's 30M one, 8 rows: the LM
    head 0.82 against 1.85 ms, the MLP's down projection 0.09 against 0.14 ms); whole compiled rollouts of
    the bench model took ~8% less time, the transposing copy (~5 ms per rollout) included.

    How: MKL's transposition where PyTorch links it (:func:`_mkl_transpose`): ``bench/bench_decode_fill.py``
    has the decoder's start on the scaling bench's 30M policy at 20-27 ms against 34-35 ms for the fallback,
    blocks of ``_COPY_ROWS`` rows through ``copy_`` (5M: 4-6 against 7-9 ms). Why the fallback goes in blocks: one
    ``copy_`` of a whole transposed view writes one column of the source per output row, and a 16384 x 512
    LM head took 18-20 ms that way against 6-7 ms in blocks (each block's source stays in cache while it is
    written out).
    """
    cols = sum(p.shape[0] for p in parts)
    first = parts[0]
    out = buffers.get(name)
    if out is None or out.shape != (first.shape[1], cols) or out.dtype != first.dtype or out.device != first.device:
        out = buffers[name] = first.new_empty((first.shape[1], cols))
    col = 0
    for part in parts:
        if not _mkl_transpose(part, out, col):
            for row in range(0, part.shape[0], _COPY_ROWS):
                block = part[row:row + _COPY_ROWS]
                out[:, col + row:col + row + block.shape[0]].copy_(block.t())
        col += part.shape[0]
    if scale is None:
        return out
    if first.dtype in (torch.float32, torch.float64):
        return out.mul_(scale[:, None])
    return out.copy_(out.float() * scale.float()[:, None])


def _projection(modules: list[torch.nn.Linear], norm_weight: torch.Tensor | None,
                buffers: dict[str, torch.Tensor] | None, name: str) -> tuple:
    """Linear maps that read the same input (q/k/v, gate/up, or the LM head, o or down projection alone)
    as ((weight [in, out], bias), ...) for :func:`_project`.

    Fused (``buffers`` given): one contiguous ``[in, out]`` weight made by concatenating them, with the
    preceding RMSNorm's weight, if any, folded in (``W·(w ⊙ x̂) = (W·diag(w))·x̂``): one matrix product
    instead of three and no weight multiply in the norm. Otherwise transposed views of the modules' own
    parameters, one product each.
    """
    if buffers is None:
        return tuple((m.weight.t(), m.bias) for m in modules)
    weight = _fill(buffers, name, [m.weight for m in modules], norm_weight)
    if all(m.bias is None for m in modules):
        return ((weight, None),)
    return ((weight, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                for m in modules])),)


class FastDecoder:
    """Decode steps with an in-place KV buffer over a model that :func:`fast_decoder` accepted.

    A step calls functional kernels on the model's parameters rather than its modules: at one token per
    row a step is a few dozen small ops, and each op's dispatch costs about as much as its arithmetic.
    Where the copies are small (:attr:`FUSE_MAX_BYTES`; they are kept between rollouts and refilled), the
    q/k/v and gate/up weights are concatenated once per rollout with the RMSNorm weights folded in, the LM
    head takes the final norm's weight, and the o and down projections are copied transposed too (``_fill``
    says why): 17 matrix products per step instead of 29 on a 4-layer model.
    The residual adds ride in ``addmm`` and RoPE is applied to q and k together. On the bench model
    (bench/bench_rl_vs_trl.py) these, with the leaner sampling loop, took generation from 0.35 to 0.23 s
    per rollout of 8 x 64 tokens.
    """

    # the copies stay allocated with the model; bigger models decode unfused. 128 MiB takes in the scaling
    # bench's 30M policy (96 MiB with its o and down projections; compiled, its rollouts took 0.28-0.37 s
    # against 0.45 eager) and leaves out its 120M one (408 MiB), where every path is bound by reading the
    # weights and compiling gained nothing
    FUSE_MAX_BYTES = 128 * 2**20
    compiled = False  # run the step ahead-of-time compiled (rlhfkit.rollout.compiled_decode)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.q_heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.intermediate = self.layers[0].mlp.gate_proj.out_features
        self.sliding_window = getattr(model.config, "sliding_window", None) \
            if getattr(model.config, "use_sliding_window", True) else None
        act = getattr(model.config, "hidden_act", None)
        self.act = F.silu if act == "silu" else self.layers[0].mlp.act_fn

    def fits(self, total_length: int) -> bool:
        """An active sliding window shorter than the rollout changes attention: leave it to transformers."""
        return not self.sliding_window or total_length <= self.sliding_window

    def _fused_bytes(self) -> int:
        head = self.model.lm_head.weight
        per_layer = sum(m.weight.nbytes for layer in self.layers for m in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
        return per_layer + head.nbytes

    @torch.inference_mode()  # the reused weight buffers are inference tensors: always filled in this mode
    def start(self, cache: Any, key_mask: torch.Tensor, total_length: int, positions: torch.Tensor) -> None:
        """Copy the prefilled cache (batch already expanded to every sample) into buffers of
        ``total_length`` positions; ``key_mask`` [n, total_length] marks the real (non-padding) keys;
        ``positions`` [n] are the RoPE positions of the first decoded token of each row."""
        self.keys, self.values = [], []
        for layer in cache.layers:
            n, heads, filled, dim = layer.keys.shape
            # zeros, not empty: the slots not yet written are masked out of attention, but a masked
            # weight of 0 times a NaN left in uninitialised memory would still be NaN
            keys = layer.keys.new_zeros((n, heads, total_length, dim))
            values = layer.values.new_zeros((n, heads, total_length, dim))
            keys[:, :, :filled] = layer.keys
            values[:, :, :filled] = layer.values
            self.keys.append(keys)
            self.values.append(values)
        device = key_mask.device
        # the buffer slot the next token is written to; advanced inside the step (no Python int that a
        # compiled step would have to be specialised on)
        self.slot = torch.tensor([filled], device=device)
        # SDPA boolean mask, True = attend: the prompt's real tokens now, each decoded slot as it is written
        slots = torch.arange(total_length, device=device)
        self.attend = (key_mask.bool() & (slots < filled))[:, None, None, :]
        dtype = self.keys[0].dtype
        dummy = torch.empty(0, dtype=dtype, device=device)
        cos, sin = self.base.rotary_emb(dummy, slots[None])  # the model's own RoPE, once for every position
        # rotate_half(x) = cat(-x2, x1) = (x2, x1) * sign: the sign goes into the sine table once
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        # per row and buffer slot [n, total_length, 1, D]: the RoPE position of the token written there
        # (clamped: the prompt's slots are never looked up, and rows never run past the last slot)
        at = (positions[:, None] + slots - filled).clamp(0, total_length - 1)
        self.cos, self.sin_signed = cos[0][at][:, :, None, :], (sin[0] * sign)[at][:, :, None, :]

        self.fused = self._fused_bytes() <= self.FUSE_MAX_BYTES
        buffers = _FUSED_BUFFERS.setdefault(self.model, {}) if self.fused else None
        plan = []
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
            plan.append((
                None if self.fused else norm_in.weight, norm_in.variance_epsilon,
                _projection([attn.q_proj, attn.k_proj, attn.v_proj], norm_in.weight, buffers, f"qkv{index}"),
                _projection([attn.o_proj], None, buffers, f"o{index}")[0], attn.scaling,
                None if self.fused else norm_post.weight, norm_post.variance_epsilon,
                _projection([mlp.gate_proj, mlp.up_proj], norm_post.weight, buffers, f"gate_up{index}"),
                _projection([mlp.down_proj], None, buffers, f"down{index}")[0]))
        norm, head = self.base.norm, self.model.lm_head
        self.head = (None if self.fused else norm.weight, norm.variance_epsilon,
                     *_projection([head], norm.weight, buffers, "head")[0])
        self.plan = tuple(plan)
        self.runner = None

    def step(self, record: tuple[torch.Tensor, ...], temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> torch.Tensor:
        """Feed each row's token of the previous column of the rollout's buffers (at the next position of each;
        appended to the KV buffer), draw the next and record it:
        :func:`~rlhfkit.rollout.decode_step.decode_and_record` with ``record`` = (column, uniforms, tokens, logps,
        lengths, done, eos) as
        :func:`rlhfkit.rollout.sampling.draw_and_record` takes it. Returns whether every row has ended."""
        if self.compiled:
            if self.runner is None:  # once per rollout: the package, and the inputs that stay the same
                from .compiled_decode import compiled_step, step_state

                self.runner = compiled_step(self, record, temperature, top_k, top_p)
                self.compiled = self.runner is not None
                self.state = step_state(self)
            if self.compiled:
                return self.runner.run([*record, *self.state])[0]
        return decode_and_record(temperature, top_k, top_p, record, *self.step_inputs(), self.shape, self.act)

    def step_inputs(self) -> tuple:
        """The step's inputs after the fed tokens, in :func:`~rlhfkit.rollout.decode_step.decode_step`'s order
        (the compiled package takes the same): slot, embedding, per-layer plan, head, KV buffers, mask, RoPE
        tables."""
        return (self.slot, self.base.embed_tokens.weight, self.plan, self.head, self.keys, self.values,
                self.attend, self.cos, self.sin_signed)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(head_dim, query heads, key/value heads, MLP width)."""
        return self.head_dim, self.q_heads, self.kv_heads, self.intermediate


def _plain_rms_norm(module: torch.nn.Module) -> bool:
    """weight * x / sqrt(mean(x²) + eps): the RMSNorm of the layouts above (not Gemma's 1 + weight)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter) and not hasattr(module, "bias")


def _zero3_partitioned(model: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 re-partitions a module's weights after its forward (the prompt's prefill included)
    and gathers them again in the next module call; the lean step reads weights outside module calls.
    (FSDP2 keeps them unsharded inside ``Engine.full_parameters``: tests/test_distributed.py runs PPO on it.)"""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fast_decoder(model: torch.nn.Module) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model`` when its layout is one this module reproduces exactly, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LLAMA_LAYOUT:
        return None
    if hasattr(model, "peft_config") or not hasattr(model, "lm_head") or not hasattr(model, "model"):
        return None
    if _zero3_partitioned(model):
        return None
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return None
    base = model.model
    if not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        # exact nn.Linear only: LoRA / quantised layers have their own forward semantics
        if attn is None or any(type(getattr(attn, p, None)) is not torch.nn.Linear for p in projections):
            return None
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return None
        if not all(hasattr(layer, m) for m in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return None
        # the step calls F.linear / F.rms_norm on these modules' parameters: only plain ones qualify
        mlp = layer.mlp
        if any(type(getattr(mlp, p, None)) is not torch.nn.Linear for p in ("gate_proj", "up_proj", "down_proj")):
            return None
        if not hasattr(mlp, "act_fn") or not all(_plain_rms_norm(n) for n in (
                layer.input_layernorm, layer.post_attention_layernorm)):
            return None
    if not _plain_rms_norm(base.norm) or type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
        return None
    return FastDecoder(model)
