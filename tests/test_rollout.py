"""The KV-cache sampler: log-probs equal a full forward's, batching and left padding change nothing."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.rollout.generate import HFGenerationBackend, SamplingConfig, filter_logits


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["Tell me about cats.", "Why?", "A much longer prompt about the history of the printing press."]
    return [tiny_tokenizer(t).input_ids for t in texts]


def full_forward_logps(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt) - 1:]


def test_sampling_logprobs_equal_full_forward(policy, prompts, tiny_tokenizer):
    backend = HFGenerationBackend(tiny_tokenizer)
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=12)
    rollout = backend.generate(policy, prompts, 2, sampling, torch.Generator().manual_seed(3))
    assert len(rollout.response_ids) == 6
    assert rollout.prompt_ids[0] == rollout.prompt_ids[1] == prompts[0]
    for i, (prompt, response) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
        reference = full_forward_logps(policy, prompt, response, 0.7)
        got = rollout.logprobs[i, :len(response)]
        assert torch.allclose(got, reference, atol=2e-5), (i, (got - reference).abs().max())
        assert (rollout.logprobs[i, len(response):] == 0).all()


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(policy, prompts, tiny_tokenizer):
    backend = HFGenerationBackend(tiny_tokenizer)
    greedy = SamplingConfig(top_k=1, max_new_tokens=10)
    together = backend.generate(policy, prompts, 1, greedy, torch.Generator().manual_seed(0))
    for i, prompt in enumerate(prompts):
        alone = backend.generate(policy, [prompt], 1, greedy, torch.Generator().manual_seed(0))
        assert alone.response_ids[0] == together.response_ids[i]
        ids = torch.tensor([prompt])
        with torch.no_grad():  # and it is what argmax decoding gives
            expected = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=10, pad_token_id=tiny_tokenizer.pad_token_id,
                                       eos_token_id=tiny_tokenizer.eos_token_id)[0, len(prompt):].tolist()
        assert together.response_ids[i] == expected[:len(together.response_ids[i])]


def test_same_generator_seed_same_samples(policy, prompts, tiny_tokenizer):
    backend = HFGenerationBackend(tiny_tokenizer)
    sampling = SamplingConfig(max_new_tokens=8)
    a = backend.generate(policy, prompts, 3, sampling, torch.Generator().manual_seed(11))
    b = backend.generate(policy, prompts, 3, sampling, torch.Generator().manual_seed(11))
    c = backend.generate(policy, prompts, 3, sampling, torch.Generator().manual_seed(12))
    assert a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids


def test_eos_ends_and_truncates(policy, prompts, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        policy.lm_head.weight[eos] += 1000.0  # EOS becomes the only likely token
    try:
        backend = HFGenerationBackend(tiny_tokenizer)
        rollout = backend.generate(policy, prompts, 1, SamplingConfig(max_new_tokens=8),
                                   torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            policy.lm_head.weight[eos] -= 1000.0
    assert rollout.response_ids == [[eos]] * 3
    assert rollout.ended == [True] * 3
    assert rollout.decode_steps == 1  # all done after one token: no wasted decode steps


def test_stop_string_ends_response(policy, prompts, tiny_tokenizer):
    backend = HFGenerationBackend(tiny_tokenizer)
    free = backend.generate(policy, prompts[:1], 1, SamplingConfig(top_k=1, max_new_tokens=10),
                            torch.Generator().manual_seed(0))
    text = tiny_tokenizer.decode(free.response_ids[0], skip_special_tokens=True)
    stop = text.strip()[:2]  # a string the greedy response is known to produce early
    assert stop
    stopped = backend.generate(policy, prompts[:1], 1,
                               SamplingConfig(top_k=1, max_new_tokens=10, stop_strings=(stop,)),
                               torch.Generator().manual_seed(0))
    assert stopped.ended == [True]
    assert len(stopped.response_ids[0]) < len(free.response_ids[0])
    assert stop in tiny_tokenizer.decode(stopped.response_ids[0], skip_special_tokens=True)
    assert free.response_ids[0][:len(stopped.response_ids[0])] == stopped.response_ids[0]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = torch.isfinite(filter_logits(logits, 2, 1.0))
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, 0, 0.75))  # 0.5 + 0.3 reaches 0.75: two tokens
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_small = torch.isfinite(filter_logits(logits, 0, 0.1))  # the top token always survives
    assert kept_small.tolist() == [[True, False, False, False]]


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=0).check()
    with pytest.raises(ConfigError, match="top-p"):
        SamplingConfig(top_p=0).check()


def _random_decoder(kind: str, vocab: int):
    """A small random decoder of another Llama-layout family: GQA, biases (Qwen2), a sliding window."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = Qwen2Config(**common) if kind == "qwen2" else MistralConfig(**common, sliding_window=8)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        for layer in getattr(model.model, "layers", []):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)  # Qwen2's q/k/v biases start at zero: make them count
    return _with_random_norms(model)


def _with_random_norms(model):
    """RMSNorm weights start at one; the fused decode step folds them into the projections: make them count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral_window"])
def test_fast_decode_equals_the_transformers_loop(kind, fused, policy, prompts, tiny_tokenizer, monkeypatch):
    """The lean decode step (in-place KV buffer, RoPE table; fused projections with the norm weights folded
    in, or the model's own weights one by one) gives the transformers loop's tokens and log-probs, with
    left padding and several samples per prompt; a sliding window shorter than the rollout falls back to
    transformers."""
    from rlhfkit.rollout.fast_decode import FastDecoder, fast_decoder

    if not fused:
        monkeypatch.setattr(FastDecoder, "FUSE_MAX_BYTES", 0)
    model = _with_random_norms(copy.deepcopy(policy)) if kind == "llama" \
        else _random_decoder(kind.split("_")[0], len(tiny_tokenizer))
    decoder = fast_decoder(model)
    assert decoder is not None
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=14)
    for update in range(2):  # the second rollout after an optimizer-like in-place update of the weights
        if update:
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(1.1)
        rollouts = [HFGenerationBackend(tiny_tokenizer, fast_decode=fast).generate(
            model, prompts, 2, sampling, torch.Generator().manual_seed(5)) for fast in (True, False)]
        assert rollouts[0].response_ids == rollouts[1].response_ids
        torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs, atol=1e-5, rtol=0)
        if update == 0:
            first = rollouts[0]
    assert first.logprobs.ne(rollouts[0].logprobs).any()  # the update changed the distribution
    assert decoder.fits(30) is (kind != "mistral_window")
    if kind != "mistral_window":  # the fast path ran, fused or not as asked
        decoder.start(_prefilled_cache(model, prompts), torch.ones(len(prompts), 30, dtype=torch.long), 30,
                      torch.full((len(prompts),), 5))
        assert decoder.fused is fused
    if kind == "qwen2":  # and the rows equal a full forward (prompt + response in one pass)
        for i, (prompt, response) in enumerate(zip(rollouts[0].prompt_ids, rollouts[0].response_ids)):
            reference = full_forward_logps(model, prompt, response, 0.8)
            assert torch.allclose(rollouts[0].logprobs[i, :len(response)], reference, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("through_mkl", [True, False], ids=["mkl", "blocked"])
def test_fused_weight_fill_is_the_stacked_transpose_times_the_norm(dtype, through_mkl, monkeypatch):
    """The fused decode weights: [out, in] parts stacked along the output, transposed to [in, out], each input
    row times the folded norm weight; the same values through MKL's transposition and through the blocked
    copy (an x86 build of PyTorch links MKL: the fast path must be found there, not silently skipped);
    a part that is not contiguous, and a refill after an in-place update, too."""
    from rlhfkit.rollout import fast_decode

    if through_mkl:
        if torch.backends.mkl.is_available():
            assert dtype in fast_decode._mkl_omatcopy()
    else:
        monkeypatch.setattr(fast_decode, "_mkl_omatcopy", lambda: {})
    monkeypatch.setattr(fast_decode, "_COPY_ROWS", 48)  # several blocks per part in the fallback
    took = []  # per part: went through MKL or not
    transpose = fast_decode._mkl_transpose
    monkeypatch.setattr(fast_decode, "_mkl_transpose", lambda *a: took.append(transpose(*a)) or took[-1])
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(rows, 40, generator=generator, dtype=dtype) for rows in (100, 7, 64)]
    parts[1] = torch.randn(40, 7, generator=generator, dtype=dtype).t()  # a transposed view: not contiguous
    scale = torch.rand(40, generator=generator, dtype=dtype) + 0.5
    buffers: dict = {}
    for _ in range(2):  # a refill reuses the buffer and sees the new weights
        fused = fast_decode._fill(buffers, "w", parts, scale)
        assert torch.equal(fused, torch.cat(parts).t() * scale[:, None])
        plain = fast_decode._fill(buffers, "plain", parts[:1], None)
        assert torch.equal(plain, parts[0].t()) and plain.is_contiguous()
        parts[0].mul_(1.5)
    assert buffers["w"] is fused and fused.shape == (40, 171)
    if through_mkl and torch.backends.mkl.is_available():  # the contiguous parts went through MKL
        assert took == [True, False, True, True] * 2
    else:
        assert not any(took)


def _prefilled_cache(model, prompts):
    from transformers import DynamicCache

    from rlhfkit.rollout.generate import cache_keyword

    width = min(len(p) for p in prompts)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([p[:width] for p in prompts]), use_cache=True, **{cache_keyword(model): cache})
    return cache


def test_fast_decode_declines_lora_and_unknown_layouts(policy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from rlhfkit.rollout.fast_decode import fast_decoder

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert fast_decoder(gpt2) is None
    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fast_decoder(lora) is None and fast_decoder(lora.get_base_model()) is None  # LoRA layers inside
    # ZeRO-3 marks its partitioned parameters (ds_id) and re-partitions them after each module forward
    sharded = copy.deepcopy(policy)
    assert fast_decoder(sharded) is not None
    sharded.model.layers[0].self_attn.q_proj.weight.ds_id = 0
    assert fast_decoder(sharded) is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_compiled_decode_equals_the_transformers_loop(kind, policy, prompts, tiny_tokenizer, tmp_path, monkeypatch):
    """--compile-decode: the step exported and AOT-compiled in a child process gives the transformers loop's
    tokens and log-probs (top-k / top-p included); one package serves other batch sizes (down to one row) and
    buffer lengths, and sees in-place weight updates (the weights are inputs, not baked constants); another
    sampling setting asks for another package."""
    from rlhfkit.rollout import compiled_decode

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled_decode, "_FAILED", [])
    model = _with_random_norms(copy.deepcopy(policy)) if kind == "llama" \
        else _random_decoder(kind, len(tiny_tokenizer))
    calls = []
    build = compiled_decode._build_in_child
    monkeypatch.setattr(compiled_decode, "_build_in_child", lambda *a: calls.append(a) or build(*a))
    compiled, plain = HFGenerationBackend(tiny_tokenizer, compile_decode=True), \
        HFGenerationBackend(tiny_tokenizer, fast_decode=False)
    # (prompts, samples per prompt, max_new_tokens, top-k, top-p): 6 rows with left padding, then 1 row, then
    # 4 rows longer; Llama samples plainly, Qwen2 with top-k + top-p (sampling settings are compiled in: one
    # package per setting, and each build costs ~30 s, so each architecture builds one)
    top_k, top_p = (0, 1.0) if kind == "llama" else (20, 0.8)
    shapes = [(prompts, 2, 12, top_k, top_p), (prompts[:1], 1, 9, top_k, top_p), (prompts[1:], 2, 20, top_k, top_p)]
    for update, (batch, samples, steps, top_k, top_p) in enumerate(shapes):
        if update:
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(1.05)
        sampling = SamplingConfig(temperature=0.8, max_new_tokens=steps, top_k=top_k, top_p=top_p)
        got, want = (backend.generate(model, batch, samples, sampling, torch.Generator().manual_seed(7))
                     for backend in (compiled, plain))
        assert got.response_ids == want.response_ids
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        assert got.logprobs.abs().sum() > 0
    if kind == "llama":  # rows that end (EOS) at different steps inside the compiled step, which records it
        eos = tiny_tokenizer.eos_token_id
        sampling = SamplingConfig(temperature=0.8, max_new_tokens=12)
        eos_row = model.lm_head.weight[eos].detach().clone()
        for boost in (2.0, 4.0, 6.0, 10.0):  # the smallest EOS boost that ends rows mid-rollout
            with torch.no_grad():
                model.lm_head.weight[eos] = eos_row * boost
            got, want = (backend.generate(model, prompts, 2, sampling, torch.Generator().manual_seed(7))
                         for backend in (compiled, plain))
            with torch.no_grad():
                model.lm_head.weight[eos] = eos_row
            if len({length for length, ended in zip(want.lengths, want.ended) if ended and length > 1}) >= 2:
                break
        assert len({length for length, ended in zip(want.lengths, want.ended) if ended and length > 1}) >= 2
        assert (got.response_ids, got.ended, got.decode_steps) == (want.response_ids, want.ended,
                                                                   want.decode_steps)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
    built = list((tmp_path / "compiled_decode").glob("*.pt2"))
    assert len(calls) == 1 and len(built) == 1
    assert not compiled_decode._FAILED
    # another sampling setting is another package (the settings are compiled in): asked for, not reused; its
    # build is refused here (one build per architecture keeps the test short) and the rollout decodes eagerly
    asked = []

    def refuse(spec, path):
        asked.append((spec, path))
        raise RuntimeError("not built in this test")

    monkeypatch.setattr(compiled_decode, "_build_in_child", refuse)
    other = (20, 0.8) if kind == "llama" else (0, 1.0)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=12, top_k=other[0], top_p=other[1])
    got, want = (backend.generate(model, prompts, 2, sampling, torch.Generator().manual_seed(7))
                 for backend in (compiled, plain))
    assert got.response_ids == want.response_ids
    assert len(asked) == 1 and (asked[0][0]["top_k"], asked[0][0]["top_p"]) == other
    assert Path(asked[0][1]) != built[0]


def test_compiled_decode_failure_falls_back_to_eager(policy, prompts, tiny_tokenizer, tmp_path, monkeypatch, caplog):
    """A failed build (no compiler, say) is logged once and the rollout decodes eagerly, same samples."""
    from rlhfkit.rollout import compiled_decode

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled_decode, "_FAILED", [])

    def no_compiler(spec, path):
        raise RuntimeError("compile child exited with 1: error: no C++ compiler found")

    monkeypatch.setattr(compiled_decode, "_build_in_child", no_compiler)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=10)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        rollouts = [HFGenerationBackend(tiny_tokenizer, compile_decode=compile_).generate(
            policy, prompts, 2, sampling, torch.Generator().manual_seed(3)) for compile_ in (True, True, False)]
    assert rollouts[0].response_ids == rollouts[1].response_ids == rollouts[2].response_ids
    warnings = [r.getMessage() for r in caplog.records if "compile-decode" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0]


def test_compile_decode_flag_reaches_the_backend(tiny_tokenizer):
    from rlhfkit.options import parse_trainer_args
    from rlhfkit.rollout.vllm_backend import build_rollout_backend
    from rlhfkit.trainers.rl import RLConfig

    # tests/conftest.py sets RLHFKIT_COMPILE_DECODE=0, so here the default is off (test_compile_decode_default)
    for flags, expected in (([], False), (["--compile-decode"], True), (["--no-compile-decode"], False)):
        config = parse_trainer_args(RLConfig, ["--model", "m", "--dataset", "d.jsonl", *flags], "rlhfkit grpo", "")
        assert build_rollout_backend(config, tiny_tokenizer).compile_decode is expected


def test_compile_decode_default(monkeypatch):
    """On unless RLHFKIT_COMPILE_DECODE says 0 / false / no / off; a fresh interpreter (the CLI) reads it at
    import, so its --help shows the default it will use."""
    import os
    import subprocess
    import sys

    from rlhfkit.rollout.options import compile_decode_by_default

    for value, expected in ((None, True), ("1", True), ("0", False), ("false", False), (" OFF ", False),
                            ("no", False), ("yes", True)):
        if value is None:
            monkeypatch.delenv("RLHFKIT_COMPILE_DECODE", raising=False)
        else:
            monkeypatch.setenv("RLHFKIT_COMPILE_DECODE", value)
        assert compile_decode_by_default() is expected, value
    code = "from rlhfkit.trainers.rl import RLConfig; print(RLConfig().compile_decode)"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "RLHFKIT_COMPILE_DECODE": value}).stdout.strip()
        assert out == expected


def test_no_cxx_compiler_fails_fast_with_one_line(policy, prompts, tiny_tokenizer, tmp_path, monkeypatch, caplog):
    """Without a C++ compiler no child is started: one warning, then the eager step's samples."""
    import shutil
    import subprocess

    from rlhfkit.rollout import compiled_decode

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled_decode, "_FAILED", [])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no compile child expected"))
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=8)
    with caplog.at_level("INFO", logger="rlhfkit"):
        got = [HFGenerationBackend(tiny_tokenizer, compile_decode=True).generate(
            policy, prompts, 2, sampling, torch.Generator().manual_seed(5)) for _ in range(2)]
    want = HFGenerationBackend(tiny_tokenizer, compile_decode=False).generate(
        policy, prompts, 2, sampling, torch.Generator().manual_seed(5))
    assert got[0].response_ids == got[1].response_ids == want.response_ids
    torch.testing.assert_close(got[0].logprobs, want.logprobs, atol=0, rtol=0)
    said = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(said) == 1 and "no C++ compiler" in said[0].getMessage() and said[0].levelname == "WARNING"
    assert "--no-compile-decode" in said[0].getMessage()
    assert not list(tmp_path.rglob("*.pt2"))


def test_compile_decode_skips_unfused_models_with_one_line(policy, prompts, tiny_tokenizer, monkeypatch, caplog):
    from rlhfkit.rollout import compiled_decode
    from rlhfkit.rollout.fast_decode import FastDecoder

    monkeypatch.setattr(FastDecoder, "FUSE_MAX_BYTES", 0)  # as if the policy were too big for the fused copies
    monkeypatch.setattr(compiled_decode, "_build_in_child", lambda *a: pytest.fail("no build expected"))
    backend = HFGenerationBackend(tiny_tokenizer, compile_decode=True)
    sampling = SamplingConfig(max_new_tokens=6)
    with caplog.at_level("INFO", logger="rlhfkit"):
        for _ in range(2):
            backend.generate(policy, prompts, 1, sampling, torch.Generator().manual_seed(0))
    said = [r for r in caplog.records if "the compiled step covers CPU policies" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"  # the default: a big model is not a mistake


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_eager_cpu_decode_hints_at_compile_decode_once(fused, policy, prompts, tiny_tokenizer, monkeypatch, caplog):
    """A CPU run that could compile its decode step says so once per backend; one that could not stays quiet."""
    from rlhfkit.rollout.fast_decode import FastDecoder

    if not fused:
        monkeypatch.setattr(FastDecoder, "FUSE_MAX_BYTES", 0)
    backend = HFGenerationBackend(tiny_tokenizer)
    with caplog.at_level("INFO", logger="rlhfkit"):
        for _ in range(3):
            backend.generate(policy, prompts, 1, SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0))
    hints = [r for r in caplog.records if "compiles it once and caches it" in r.getMessage()]
    assert len(hints) == (1 if fused else 0)
    assert all(r.levelname == "INFO" for r in hints)


def test_generate_names_the_kv_cache_as_the_installed_transformers_does(policy, prompts, tiny_tokenizer):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, then goes in
    5.40); the decode loop must use whichever name this install's models take, through PEFT wrappers too."""
    import warnings

    from rlhfkit.rollout.generate import cache_keyword

    class Wrapper(torch.nn.Module):  # forwards **kwargs, as PeftModel does
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, **kwargs):
            return self.base(**kwargs)

    assert cache_keyword(policy) in inspect.signature(type(policy).forward).parameters
    assert cache_keyword(Wrapper(policy)) == cache_keyword(policy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated", category=FutureWarning)
        for fast in (False, True):  # the transformers loop, and the lean step's prefill
            rollout = HFGenerationBackend(tiny_tokenizer, fast_decode=fast).generate(
                policy, prompts, 2, SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0))
            assert rollout.decode_steps >= 1
