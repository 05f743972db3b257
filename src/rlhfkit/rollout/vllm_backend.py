"""Rollouts with vLLM (``--rollout-backend vllm``): paged attention and continuous batching for the sampling
half of an RL step, with the trainer's weights pushed into the engine after each update.

Conventions are the HF backend's (:class:`~rlhfkit.rollout.generate.Rollout`): rows are prompt-major, a
response is cut after its first EOS (kept) or after the token that completes a stop string, ``ended``
says either happened, and ``logprobs[i, t]`` is the sampled token's log-prob at the sampling temperature.

How vLLM reports that log-prob: ``SamplingParams(logprobs=0)`` returns just the sampled token's entry;
which distribution it comes from is the engine's ``logprobs_mode``. The default ``raw_logprobs`` is the
model's log-softmax *before* temperature, so at T != 1 it is not what the trainer computes. We ask for
``processed_logprobs``: after temperature and after top-k / top-p masking (renormalised). With top-k /
top-p off (the RL default) that is exactly log softmax(logits / T) as the trainer scores it; with them on
it is the filtered distribution, larger than the trainer's by -log(kept mass). Either way the trainer
re-scores the rollout with its own forward (``recompute_logprobs``) and uses those as PPO's old
log-probs; vLLM's serve the rollout/trainer match check.

Weights: ``sync_weights(policy)`` streams ``(name, tensor)`` pairs (LoRA merged first, names as in the
base checkpoint) into each worker's ``model.load_weights`` through ``LLM.collective_rpc``, then resets
the prefix cache. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), so
tensors are handed over, not serialised.

Nothing here imports vLLM at module import: the pure parts (sampling parameters, turning vLLM outputs
into a Rollout, weight names) are tested on CPU with stand-ins for vLLM's objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import ConfigError, RlhfkitError
from .generate import HFGenerationBackend, Rollout, SamplingConfig

logger = logging.getLogger("rlhfkit")

__all__ = ["VLLMGenerationBackend", "build_rollout_backend", "merged_named_weights", "require_vllm", "rollout_from_vllm",
           "sampling_params_kwargs", "token_logprobs", "vllm_param_name"]

LOGPROBS_MODE = "processed_logprobs"  # after temperature (and top-k/top-p): see the module docstring
FINISH_REASONS = ("stop", "length")


def require_vllm() -> Any:
    """``import vllm``, or a one-line ConfigError when it is missing or no CUDA GPU is visible."""
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"--rollout-backend vllm needs vLLM ({exc.msg}): pip install 'rlhfkit[vllm]' on a "
                          "machine with a CUDA GPU, or use --rollout-backend hf") from None
    if not torch.cuda.is_available():
        raise ConfigError("--rollout-backend vllm needs a CUDA GPU and torch.cuda.is_available() is False "
                          "(CUDA_VISIBLE_DEVICES, driver, or a CPU build of torch?); use --rollout-backend hf")
    return vllm


def sampling_params_kwargs(sampling: SamplingConfig, num_samples: int, eos_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``sampling``, matching the HF backend.

    ``logprobs=0``: only the sampled token's log-prob. ``stop_token_ids``: every EOS id of the tokenizer (vLLM
    alone would stop at the model config's EOS). ``top_k=-1`` is "off" in every vLLM version (0 too in newer).
    Stop strings need detokenisation, which stays on; the text vLLM returns is not used.
    """
    sampling.check()
    return {
        "n": int(num_samples),
        "temperature": float(sampling.temperature),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
        "top_p": float(sampling.top_p),
        "max_tokens": int(sampling.max_new_tokens),
        "stop": [s for s in sampling.stop_strings if s] or None,
        "stop_token_ids": list(eos_ids) or None,
        "logprobs": 0,
        "skip_special_tokens": True,
    }


def token_logprobs(entries: Any, token_ids: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token from a vLLM ``CompletionOutput.logprobs``.

    ``entries[t]`` maps token id -> ``Logprob`` (with ``.logprob``) for position t; with ``logprobs=0`` it
    holds the sampled token (and maybe the top-1). Works for the list-of-dicts form and for vLLM's
    ``FlatLogprobs`` (indexable the same way).
    """
    if entries is None:
        raise RlhfkitError("vLLM returned no log-probs: SamplingParams(logprobs=0) was not honoured")
    if len(entries) < len(token_ids):
        raise RlhfkitError(f"vLLM returned {len(entries)} log-prob entries for {len(token_ids)} tokens")
    out = []
    for t, token in enumerate(token_ids):
        entry = entries[t]
        if token not in entry:
            raise RlhfkitError(f"vLLM's log-probs at position {t} lack the sampled token {token} "
                               f"(has {sorted(entry)[:5]})")
        value = entry[token]
        out.append(float(getattr(value, "logprob", value)))
    return out


def rollout_from_vllm(outputs: Sequence[Any], prompt_ids: Sequence[Sequence[int]], num_samples: int,
                      eos_ids: Sequence[int]) -> Rollout:
    """Turn ``LLM.generate`` results (one ``RequestOutput`` per prompt, in prompt order) into a Rollout.

    Each ``RequestOutput.outputs`` holds ``num_samples`` ``CompletionOutput`` (ordered here by ``.index``)
    with ``token_ids`` (vLLM keeps the EOS / stop token and the token completing a stop string; the stop
    string is cut from ``.text`` only), ``logprobs`` and ``finish_reason`` ('stop': EOS, stop token or
    stop string; 'length': max_tokens; anything else, e.g. 'abort', is an error). A response is cut after
    its first EOS in case the engine went on past it.
    """
    if len(outputs) != len(prompt_ids):
        raise RlhfkitError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
    eos = set(int(i) for i in eos_ids)
    prompts, responses, ended, rows = [], [], [], []
    for p, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != num_samples:
            raise RlhfkitError(f"vLLM returned {len(completions)} samples for prompt {p}; asked for {num_samples}")
        for completion in completions:
            if completion.finish_reason not in FINISH_REASONS:
                raise RlhfkitError(f"vLLM sample {completion.index} of prompt {p} finished with "
                                   f"{completion.finish_reason!r} (expected 'stop' or 'length')")
            ids = [int(t) for t in completion.token_ids]
            logps = token_logprobs(completion.logprobs, ids)
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
            if cut is not None:
                ids, logps = ids[:cut], logps[:cut]
            prompts.append(list(prompt_ids[p]))
            responses.append(ids)
            ended.append(cut is not None or completion.finish_reason == "stop")
            rows.append(logps)
    width = max([len(r) for r in responses] + [1])
    logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, logps in enumerate(rows):
        logprobs[i, :len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return Rollout(prompts, responses, ended, logprobs, decode_steps=max(len(r) for r in responses))


def vllm_param_name(name: str, adapter_prefix: str | None = None) -> str | None:
    """The base-checkpoint name vLLM's ``load_weights`` expects for a parameter of the policy, or None to skip.

    A PEFT model names ``base_model.model.<name>`` with ``.base_layer`` inside LoRA-wrapped layers; its
    adapter weights (``adapter_prefix``, e.g. ``lora_``) and the frozen originals of ``modules_to_save`` are
    skipped (the merged / trained copies carry the values).
    """
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if (adapter_prefix and adapter_prefix in name) or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


@contextmanager
def merged_named_weights(policy: torch.nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` of the policy as a plain checkpoint would name them, LoRA adapters merged in.

    The tensors are the live parameters (no copies): use them inside the ``with`` block, after which the
    adapters are unmerged again so training goes on unchanged.
    """
    is_peft = hasattr(policy, "merge_adapter") and hasattr(policy, "peft_config")
    if is_peft:
        with torch.no_grad():
            policy.merge_adapter()
    try:
        prefix = getattr(policy, "prefix", "lora_") if is_peft else None
        weights = []
        for name, param in policy.named_parameters():
            mapped = vllm_param_name(name, prefix)
            if mapped is not None:
                weights.append((mapped, param.detach()))
        yield weights
    finally:
        if is_peft:
            with torch.no_grad():
                policy.unmerge_adapter()


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Run inside a vLLM worker (``collective_rpc``): load ``weights`` into its model; returns how many."""
    model = worker.model_runner.model
    model.load_weights(iter(weights))
    return len(weights)


class VLLMGenerationBackend(HFGenerationBackend):
    """The GenerationBackend protocol on a ``vllm.LLM`` built from the policy's path.

    Shares ``decode`` / ``scored_ids`` / EOS handling with the HF backend; only sampling differs. ``llm`` and
    ``sampling_params`` (the ``SamplingParams`` class) can be given to reuse an engine, or to test without
    vLLM. vLLM keeps its own random state (``seed``), so the ``generator`` argument of ``generate`` is not
    used: vLLM rollouts are reproducible run to run only as far as vLLM's batching is.
    """

    recompute_logprobs = True  # the trainer re-scores vLLM rollouts: its kernels are not the trainer's
    needs_weight_sync = True

    def __init__(self, model_path: str, tokenizer: Any, *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, seed: int = 0,
                 max_model_len: int | None = None, enable_sleep_mode: bool = False,
                 trust_remote_code: bool = False, llm: Any = None, sampling_params: Any = None):
        super().__init__(tokenizer, fast_decode=False)
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"--vllm-gpu-memory-utilization must be in (0, 1], not {gpu_memory_utilization}")
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep = False
        self.syncs = 0
        if llm is None:
            vllm = require_vllm()
            # in-process engine: collective_rpc hands tensors to the worker instead of pickling them
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=int(seed),
                          gpu_memory_utilization=float(gpu_memory_utilization), enforce_eager=enforce_eager,
                          max_model_len=max_model_len, enable_sleep_mode=enable_sleep_mode,
                          trust_remote_code=trust_remote_code, logprobs_mode=LOGPROBS_MODE,
                          # the checkpoint's generation_config.json must not add repetition penalties etc.
                          generation_config="vllm")
            try:
                llm = vllm.LLM(**kwargs)
            except TypeError as exc:  # an engine argument this vLLM does not know (logprobs_mode: >= 0.10.2)
                raise ConfigError(f"vLLM {getattr(vllm, '__version__', '?')} rejected an engine option "
                                  f"({exc}); rlhfkit needs vllm>=0.10.2") from None
            sampling_params = vllm.SamplingParams
        self.llm = llm
        self.sampling_params = sampling_params if sampling_params is not None else dict
        self._warned_filtering = False

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 sampling: SamplingConfig, generator: torch.Generator) -> Rollout:
        """Sample with vLLM; ``model`` and ``generator`` are unused (weights arrive through ``sync_weights``)."""
        if (sampling.top_k > 0 or sampling.top_p < 1) and not self._warned_filtering:
            logger.warning("vLLM reports log-probs of the top-k/top-p filtered distribution; the trainer scores "
                           "the unfiltered one, so the log-prob check sees -log(kept mass) per token as mismatch")
            self._warned_filtering = True
        self._wake()
        params = self.sampling_params(**sampling_params_kwargs(sampling, num_samples, self.eos_ids))
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rollout = rollout_from_vllm(outputs, prompt_ids, num_samples, self.eos_ids)
        if self.enable_sleep_mode:  # give the KV cache back to the trainer until the next rollout
            self.llm.sleep(level=1)
            self.asleep = True
        return rollout

    def sync_weights(self, policy: torch.nn.Module) -> int:
        """Push the policy's current weights (LoRA merged) into the engine; returns how many tensors went."""
        self._wake()
        with merged_named_weights(policy) as weights:
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
            count = len(weights)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.syncs += 1
        return count

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def build_rollout_backend(config: Any, tokenizer: Any) -> HFGenerationBackend:
    """The rollout engine an RL config asks for (``rollout_backend``: hf or vllm), built from its options."""
    if config.rollout_backend == "vllm":
        max_prompt = config.max_prompt_length or config.max_length // 2
        return VLLMGenerationBackend(
            config.model, tokenizer, dtype=config.vllm_dtype, seed=config.seed,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization, enforce_eager=config.vllm_enforce_eager,
            max_model_len=max_prompt + config.max_new_tokens, enable_sleep_mode=config.vllm_sleep,
            trust_remote_code=config.trust_remote_code)
    return HFGenerationBackend(tokenizer, config.fast_decode, config.compile_decode)
