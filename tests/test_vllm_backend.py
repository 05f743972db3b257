"""The vLLM rollout backend without vLLM: the pure parts (sampling parameters, vLLM outputs -> Rollout, weight
names) and the whole RL wiring against a stand-in engine with vLLM's interface (``LLM.generate`` returning
``RequestOutput``-shaped objects, ``collective_rpc`` into a worker whose model has ``load_weights``).

The real backend (vllm.LLM on a GPU) is not exercised here; `bench/bench_rollout_backends.py` does that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import rlhfkit.rollout.vllm_backend as vb
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.rollout.generate import HFGenerationBackend, SamplingConfig
from rlhfkit.rollout.logprob_check import LogprobMismatchError
from rlhfkit.rollout.vllm_backend import (
    VLLMGenerationBackend,
    merged_named_weights,
    rollout_from_vllm,
    sampling_params_kwargs,
    token_logprobs,
    vllm_param_name,
)
from rlhfkit.trainers.rl import GRPOConfig, PPOConfig, run_rl


# ------------------------------------------------------------ stand-ins for vllm.outputs
@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields rlhfkit reads, plus text)
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    text: str = ""
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    request_id: str = "0"
    finished: bool = True


def completion(index, tokens, logps, finish, stop_reason=None, top1=None):
    entries = []
    for token, lp in zip(tokens, logps):
        entry = {token: Logprob(lp, rank=2)}
        if top1 is not None:  # logprobs=0 may also bring the top-1 token
            entry[top1] = Logprob(-0.01, rank=1)
        entries.append(entry)
    return CompletionOutput(index, list(tokens), entries, finish, stop_reason)


EOS = 2


def test_rollout_from_vllm_orders_cuts_and_flags_ended():
    outputs = [
        RequestOutput([1, 5], [  # samples arrive out of order
            completion(1, [7, 8, 9], [-0.1, -0.2, -0.3], "length"),
            completion(0, [6, EOS], [-1.0, -2.0], "stop", top1=11),  # EOS kept, as vLLM returns it
        ]),
        RequestOutput([1, 6, 6], [
            completion(0, [4, 40], [-0.4, -0.5], "stop", stop_reason="xy"),  # a stop string completed by 40
            completion(1, [3, EOS, 3], [-0.6, -0.7, -0.8], "length"),  # an engine that ran past EOS
        ]),
    ]
    rollout = rollout_from_vllm(outputs, [[1, 5], [1, 6, 6]], 2, [EOS])
    assert rollout.prompt_ids == [[1, 5], [1, 5], [1, 6, 6], [1, 6, 6]]
    assert rollout.response_ids == [[6, EOS], [7, 8, 9], [4, 40], [3, EOS]]
    assert rollout.ended == [True, False, True, True]
    expected = torch.tensor([[-1.0, -2.0, 0.0], [-0.1, -0.2, -0.3], [-0.4, -0.5, 0.0], [-0.6, -0.7, 0.0]])
    assert torch.equal(rollout.logprobs, expected)
    assert rollout.decode_steps == 3 and rollout.lengths == [2, 3, 2, 2]


@pytest.mark.parametrize("outputs, prompts, n, words", [
    ([], [[1]], 1, "0 results for 1 prompts"),
    ([RequestOutput([1], [completion(0, [5], [-1.0], "stop")])], [[1]], 2, "1 samples for prompt 0; asked for 2"),
    ([RequestOutput([1], [completion(0, [5], [-1.0], "abort")])], [[1]], 1, "finished with 'abort'"),
    ([RequestOutput([1], [CompletionOutput(0, [5], None, "stop")])], [[1]], 1, "no log-probs"),
    ([RequestOutput([1], [CompletionOutput(0, [5, 6], [{5: Logprob(-1.0)}], "stop")])], [[1]], 1,
     "1 log-prob entries for 2 tokens"),
    ([RequestOutput([1], [CompletionOutput(0, [5], [{9: Logprob(-1.0)}], "stop")])], [[1]], 1,
     "lack the sampled token 5"),
])
def test_rollout_from_vllm_rejects_malformed_outputs(outputs, prompts, n, words):
    with pytest.raises(RlhfkitError, match=words):
        rollout_from_vllm(outputs, prompts, n, [EOS])


def test_token_logprobs_reads_logprob_objects_and_plain_floats():
    assert token_logprobs([{3: Logprob(-0.5)}, {4: -0.25, 9: -0.1}], [3, 4]) == [-0.5, -0.25]


def test_sampling_params_match_the_hf_backend_conventions():
    kwargs = sampling_params_kwargs(SamplingConfig(0.7, 0, 1.0, 32, ("\n\n", "")), 4, [2, 5])
    assert kwargs == {"n": 4, "temperature": 0.7, "top_k": -1, "top_p": 1.0, "max_tokens": 32, "stop": ["\n\n"],
                      "stop_token_ids": [2, 5], "logprobs": 0, "skip_special_tokens": True}
    assert sampling_params_kwargs(SamplingConfig(top_k=20, top_p=0.9), 1, [2])["top_k"] == 20
    assert sampling_params_kwargs(SamplingConfig(), 1, [2])["stop"] is None
    with pytest.raises(ConfigError):
        sampling_params_kwargs(SamplingConfig(temperature=0), 1, [2])


def test_vllm_param_names():
    assert vllm_param_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_param_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "lora_") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert vllm_param_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "lora_") is None
    assert vllm_param_name("base_model.model.lm_head.original_module.weight", "lora_") is None
    assert vllm_param_name("base_model.model.lm_head.modules_to_save.default.weight", "lora_") == "lm_head.weight"


def test_missing_vllm_is_a_one_line_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ConfigError, match=r"needs vLLM \(No module named 'vllm'\): pip install 'rlhfkit\[vllm\]'"):
        vb.require_vllm()
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(__import__("sys").modules, "vllm", SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        vb.require_vllm()


# ------------------------------------------------------------ a stand-in engine with vLLM's interface
@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True


class FakeWorkerModel:
    """What ``worker.model_runner.model`` offers: ``load_weights(iterable of (name, tensor))``."""

    def __init__(self, model):
        self.model = model
        self.loaded: list[str] = []

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                assert name in params, f"unknown weight name {name}"  # vLLM would fail on it too
                params[name].copy_(tensor)
                self.loaded.append(name)
        return set(self.loaded)


class FakeLLM:
    """``vllm.LLM`` in miniature: its own copy of the model (loaded from the path), sampling via the HF loop,
    answers packaged as RequestOutput / CompletionOutput with per-token Logprob dicts."""

    instances: list[FakeLLM] = []  # every engine built, for the tests to inspect

    def __init__(self, model, tokenizer, seed=0, logprobs_mode="raw_logprobs", **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = dict(kwargs, model=model, tokenizer=tokenizer, seed=seed, logprobs_mode=logprobs_mode)
        self.engine_model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=FakeWorkerModel(self.engine_model)))
        self.sampler = HFGenerationBackend(AutoTokenizer.from_pretrained(tokenizer), fast_decode=False)
        self.generator = torch.Generator().manual_seed(seed)
        self.events: list[str] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        assert self.kwargs["logprobs_mode"] == "processed_logprobs" and params.logprobs == 0
        self.events.append("generate")
        ids = [p["prompt_token_ids"] for p in prompts]
        sampling = SamplingConfig(params.temperature, max(params.top_k, 0), params.top_p, params.max_tokens,
                                  tuple(params.stop or ()))
        r = self.sampler.generate(self.engine_model, ids, params.n, sampling, self.generator)
        out = []
        for p, prompt in enumerate(ids):
            samples = []
            for j in range(params.n):
                i = p * params.n + j
                toks = r.response_ids[i]
                samples.append(completion(j, toks, r.logprobs[i, :len(toks)].tolist(),
                                          "stop" if r.ended[i] else "length"))
            out.append(RequestOutput(prompt, samples[::-1]))
        return out

    def collective_rpc(self, method, args=(), kwargs=None):
        self.events.append("sync")
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.events.append("reset")

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake")


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances.clear()
    monkeypatch.setattr(vb, "require_vllm", lambda: SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams,
                                                                      __version__="fake"))
    return FakeLLM


def test_backend_generates_like_the_hf_loop_and_syncs_merged_lora(tiny_model_dir, tiny_tokenizer, fake_vllm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    backend = VLLMGenerationBackend(str(tiny_model_dir), tiny_tokenizer, seed=5, enable_sleep_mode=True,
                                    max_model_len=64)
    llm = fake_vllm.instances[-1]
    assert llm.kwargs["generation_config"] == "vllm" and llm.kwargs["max_model_len"] == 64
    prompts = [tiny_tokenizer(t).input_ids for t in ("Tell me about cats.", "Why?")]
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=10)
    rollout = backend.generate(None, prompts, 3, sampling, torch.Generator())
    reference = HFGenerationBackend(tiny_tokenizer, fast_decode=False).generate(
        llm.engine_model, prompts, 3, sampling, torch.Generator().manual_seed(5))
    assert rollout.response_ids == reference.response_ids and rollout.ended == reference.ended
    assert torch.equal(rollout.logprobs, reference.logprobs)
    assert llm.events == ["generate", "sleep1"]

    # a LoRA policy whose adapters moved: the engine receives base names with the adapters merged in
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    count = backend.sync_weights(policy)
    assert llm.events[-3:] == ["wake", "sync", "reset"]
    expected = {n: p.detach().clone() for n, p in
                get_peft_model_merged(policy).named_parameters()}
    engine = dict(llm.engine_model.named_parameters())
    assert count == len(expected) == len(llm.worker.model_runner.model.loaded)
    for name, value in expected.items():
        assert torch.allclose(engine[name], value, atol=1e-6), name
    assert not torch.allclose(engine["model.layers.0.self_attn.q_proj.weight"],
                              AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[
                                  "model.layers.0.self_attn.q_proj.weight"])
    # merging was undone: the policy's own forward still runs base + adapter
    assert any("lora_A" in n for n, _ in policy.named_parameters())


def get_peft_model_merged(policy):
    """A merged copy of a PEFT policy, leaving the original as it is."""
    import copy

    return copy.deepcopy(policy).merge_and_unload()


def test_merged_named_weights_of_a_plain_model_are_its_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with merged_named_weights(model) as weights:
        assert [n for n, _ in weights] == [n for n, _ in model.named_parameters()]
        assert all(t.data_ptr() == p.data_ptr() for (_, t), (_, p) in zip(weights, model.named_parameters()))


def _config(cls, model_dir, count_e_files, out, **overrides):
    settings = dict(model=str(model_dir), dataset=str(count_e_files / "prompts.jsonl"), output_dir=str(out),
                    reward_fn=f"{count_e_files / 'reward.py'}:count_e", max_new_tokens=10, progress_bar=False,
                    eval_on_start=False, prompts_per_step=2, num_generations=4, learning_rate=1e-2,
                    rollout_backend="vllm", logprob_check_steps=1, logprob_check_tolerance=1e-4)
    settings.update(overrides)
    return cls(**settings)


@pytest.mark.parametrize("lora", [False, True])
def test_run_rl_with_the_vllm_backend_syncs_weights_before_every_rollout(lora, tiny_model_dir, count_e_files, tmp_path,
                                                                         fake_vllm):
    """Checked every step at 1e-4: the engine samples with the trainer's current weights (else the check
    fails from step 2, see below), and PPO's old log-probs are the trainer's own."""
    out = tmp_path / "run"
    run_rl(_config(GRPOConfig, tiny_model_dir, count_e_files, out, max_steps=3, **({"lora_r": 4} if lora else {})))
    llm = fake_vllm.instances[-1]
    assert llm.events == ["sync", "reset", "generate"] * 3  # one sync per update phase, before sampling
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout_logprob_diff_mean"] < 1e-4 for r in rows)
    assert all(r["rollout_logprob_mismatch"] < 1e-4 for r in rows)


def test_stale_engine_weights_are_caught_by_the_check(tiny_model_dir, count_e_files, tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setattr(VLLMGenerationBackend, "sync_weights", lambda self, policy: 0)  # a broken sync
    with pytest.raises(LogprobMismatchError, match=r"disagree at step 2 \(vllm rollouts"):
        run_rl(_config(PPOConfig, tiny_model_dir, count_e_files, tmp_path / "stale", max_steps=3, num_generations=1,
                       ppo_epochs=2))
