#!/usr/bin/env python
"""Benchmark tool-calling GRPO (issue 24): episode rollouts of a 3-turn task, rlhfkit vs TRL's GRPOTrainer(tools=).

    .venv/bin/python bench/bench_tools_vs_trl.py                 # both libraries once (2 cores: fine-tuning
                                                                 # 3-8 min, then ~10 s per run)
    .venv/bin/python bench/bench_tools_vs_trl.py --workdir /tmp/tools-bench --steps 10 --repeats 3
                                                                 # keep (and reuse) the fine-tuned model; medians

The task: "What is 3 plus 4 plus 5?" with one tool, ``add(a, b) -> str``. A solved episode has 3 assistant
turns: call add(3, 4), read 7, call add(7, 5), read 12, answer "The answer is 12." (2 tool calls). A
random-init model never writes a call, so the script first builds a model that does: a tiny Llama (4 layers,
hidden 128, fp32) and a byte-level BPE trained locally with Qwen's ``<|im_start|>``/``<|im_end|>`` tokens
(``<|im_end|>`` = EOS), whose chat template is TRL's own copy of Qwen2.5's (it renders ``tools=`` and the
Hermes ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` format; TRL recognises it, sets its response
parser and accepts it for tool calling), then fine-tunes it briefly with a plain torch loop on synthetic solved
dialogues rendered by that template (loss on everything after the prompt; cached in --workdir). Both
libraries then run the same fine-tuned model, prompts (chat messages, rendered by the same template with the
same tool schema: rlhfkit's and transformers' schema of ``add`` are equal, checked), reward (1 if the last
number of the final answer is the sum), group size, β, temperature, token budget, learning rate and steps;
one step = one rollout of 8 episodes (1 prompt × group 8) + its update.

- rlhfkit: ``rlhfkit grpo --tools tools.py:add --max-turns 3``: one decode loop per rollout; a row that
  closes ``</tool_call>`` gets the tool's answer (run in the tools' persistent worker process) forced into the same KV cache.
- TRL: ``GRPOTrainer(tools=[add])`` with ``max_tool_calling_iterations=3``: transformers ``generate`` per
  turn; after each turn the calling rows' prompt + completion + tool turn are fed to a new ``generate`` call
  (prefilled again).

Both count every token of the episode, tool turns included, against the budget (rlhfkit --max-new-tokens,
TRL max_completion_length). Measured per library, each run in its own subprocess (conventions and helpers of
bench/bench_rl_vs_trl.py and bench/bench_vs_trl.py): the episode rollout time = the library's whole rollout
call (rlhfkit: ``HFGenerationBackend.generate(..., episodes=)``, which runs the tools; TRL:
``GRPOTrainer._generate``, which tokenizes the prompts, generates, parses the calls, runs the tools and
generates again), the time inside tool calls (rlhfkit: ``run_tool_call``, a round trip to the worker process; TRL: the tool
function), step time from an optimizer-step hook, and from the rollout's own output: policy tokens
(sampled by the model), total tokens (policy + forced tool-turn tokens), assistant turns and tool calls per
episode, generate calls per rollout, and peak RSS (VmHWM). It waits for a quiet CPU before each run and writes
a Markdown table + raw JSON to bench/results/ (gitignored). If TRL cannot run the task, its row says why.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_rl_vs_trl as rl  # noqa: E402
import bench_vs_trl as base  # noqa: E402

REPO, RESULTS = base.REPO, base.RESULTS
LIBRARIES = ("rlhfkit", "trl")
TOOLS_SOURCE = '''def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)
'''
REWARD_SOURCE = '''import re


def reward(completions, answer, **kwargs):
    """1 when the last number of the final answer is the sum. rlhfkit passes the whole response as one
    assistant message (tool turns inside), TRL the episode's messages (the final answer last)."""
    out = []
    for completion, want in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        text = (text or "").rsplit("</tool_response>", 1)[-1]
        numbers = re.findall(r"-?[0-9]+", text)
        out.append(1.0 if numbers and int(numbers[-1]) == int(want) else 0.0)
    return out
'''
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


# ------------------------------------------------------------------------------------------- the task
def question(rng: random.Random) -> tuple[list[int], str]:
    xs = [rng.randint(0, 9) for _ in range(3)]
    return xs, f"What is {xs[0]} plus {xs[1]} plus {xs[2]}?"


def solved_dialogue(xs: list[int], text: str) -> list[dict]:
    """The 3-turn episode: two add calls (as chat templates take tool calls) and the answer."""
    def call(a: int, b: int) -> dict:
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]}

    s1, s2 = xs[0] + xs[1], sum(xs)
    return [{"role": "user", "content": text}, call(xs[0], xs[1]), {"role": "tool", "name": "add", "content": str(s1)},
            call(s1, xs[2]), {"role": "tool", "name": "add", "content": str(s2)},
            {"role": "assistant", "content": f"The answer is {s2}."}]


def build_tokenizer(dialogue_texts: list[str]):
    """Byte-level BPE (rlhfkit.models.tiny's recipe) over pseudo-English + the rendered dialogues, with Qwen's
    chat tokens (<|im_end|> = EOS, no BOS) and TRL's copy of Qwen2.5's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen2_5_chat_template

    from rlhfkit.models.tiny import default_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*default_corpus(2000), *dialogue_texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = qwen2_5_chat_template
    return fast


def sft(model_dir: Path, tok, schema: dict, args) -> dict:
    """Fine-tune the tiny model on solved dialogues (plain torch loop, AdamW, loss after the prompt)."""
    import torch
    from transformers import AutoModelForCausalLM

    rng = random.Random(args.seed + 1)
    rows = []
    for _ in range(args.sft_dialogues):
        xs, text = question(rng)
        msgs = solved_dialogue(xs, text)
        full = tok.apply_chat_template(msgs, tools=[schema], tokenize=False)
        prompt = tok.apply_chat_template(msgs[:1], tools=[schema], tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False).input_ids
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        if not full.startswith(prompt) or ids[:n_prompt] != tok(prompt, add_special_tokens=False).input_ids:
            raise RuntimeError("the dialogue's tokens do not start with its prompt's tokens")
        rows.append((ids, n_prompt))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / args.sft_steps))
    start, losses = time.perf_counter(), []
    for step in range(args.sft_steps):
        batch = [rows[(step * args.sft_batch + i) % len(rows)] for i in range(args.sft_batch)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            mask[i, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == args.sft_steps - 1:
            print(f"  sft step {step + 1}/{args.sft_steps} loss {losses[-1]:.3f}", flush=True)
    model.eval().save_pretrained(model_dir)
    return {"sft_s": time.perf_counter() - start, "sft_final_loss": statistics.mean(losses[-10:]),
            "sft_dialogues": len(rows), "sft_tokens_per_dialogue": statistics.mean(len(r[0]) for r in rows)}


def probe_calls(model_dir: Path, tok, schema: dict, n: int = 8) -> dict:
    """Greedy check of the SFT model with transformers: does it write a well-formed first call?"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng, ok, sample = random.Random(12345), 0, ""
    for _ in range(n):
        xs, text = question(rng)
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tools=[schema], tokenize=False,
                                         add_generation_prompt=True)
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
        sample = tok.decode(out[0, ids.shape[1]:])
        ok += bool(re.search(r'<tool_call>\n\{"name": "add", "arguments": \{"a": \d+, "b": \d+\}\}\n</tool_call>',
                             sample))
    return {"greedy_first_call_ok": ok / n, "greedy_sample": sample}


def build_assets(work: Path, args) -> dict:
    """Tokenizer, model (fine-tuned to call), tools, reward and prompt files; reused from --workdir."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import get_json_schema

    from rlhfkit.models.tiny import build_tiny_model
    from rlhfkit.rollout.tools import load_tools

    tools_file, reward_file, prompts_file = work / "tools.py", work / "reward.py", work / "prompts.jsonl"
    tools_file.write_text(TOOLS_SOURCE)
    reward_file.write_text(REWARD_SOURCE)
    namespace: dict = {}
    exec(compile(TOOLS_SOURCE, str(tools_file), "exec"), namespace)
    schema = get_json_schema(namespace["add"])
    if load_tools(f"{tools_file}:add")[0].schema != schema:
        raise RuntimeError("rlhfkit's schema of add differs from transformers': the prompts would differ")
    rng = random.Random(args.seed)
    rows = []
    for _ in range(200):
        xs, text = question(rng)
        rows.append({"prompt": [{"role": "user", "content": text}], "answer": sum(xs)})
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir, marker = work / "model", work / "model" / "sft.json"
    key = {k: getattr(args, k) for k in ("sft_steps", "sft_batch", "sft_lr", "sft_dialogues", "seed", "layers", "hidden")}
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        sft_info = json.loads(marker.read_text())
        tok = AutoTokenizer.from_pretrained(model_dir)
        print(f"reusing the fine-tuned model in {model_dir}", flush=True)
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        rng = random.Random(args.seed + 2)
        texts = []
        for _ in range(300):
            xs, text = question(rng)
            texts.append(base_template_render(solved_dialogue(xs, text), schema))
        tok = build_tokenizer(texts)
        torch.manual_seed(args.seed)
        build_tiny_model(model_dir, layers=args.layers, hidden=args.hidden, heads=4, tokenizer=tok, seed=args.seed)
        tok = AutoTokenizer.from_pretrained(model_dir)
        sft_info = {"key": key, **sft(model_dir, tok, schema, args)}
        sft_info.update(probe_calls(model_dir, tok, schema))
        marker.write_text(json.dumps(sft_info))
    prompt_text = tok.apply_chat_template(rows[0]["prompt"], tools=[schema], tokenize=False, add_generation_prompt=True)
    return {"model_dir": model_dir, "tok": tok, "tools_file": tools_file, "reward_file": reward_file,
            "prompts_file": prompts_file, "sft": sft_info,
            "prompt_tokens": len(tok(prompt_text, add_special_tokens=False).input_ids)}


def base_template_render(messages: list[dict], schema: dict) -> str:
    """Render with TRL's Qwen2.5 template before the tokenizer exists (for the BPE training text)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from trl.chat_template_utils import qwen2_5_chat_template

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    return env.from_string(qwen2_5_chat_template).render(messages=messages, tools=[schema])


# ------------------------------------------------------------------------------------------- the child
def run_trl(spec: dict) -> dict:
    import importlib.util

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def load(path: str, name: str):
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module

    reward, tools = load(spec["reward_file"], "bench_reward"), load(spec["tools_file"], "bench_tools")
    add = timed_tool(tools.add)  # same name, signature and docstring: the same schema
    dataset = Dataset.from_list(base._read_jsonl(Path(spec["prompts_file"])))
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    settings = {**rl._trl_settings({**spec, "algo": "grpo"}), "max_tool_calling_iterations": spec["max_turns"]}
    args = GRPOConfig(output_dir=spec["output_dir"], **settings)
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=reward.reward, args=args, train_dataset=dataset,
                          processing_class=tok, tools=[add])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"reward_mean": statistics.mean(h["reward"] for h in logs) if logs else None,
            "trl_settings": {k: v for k, v in settings.items() if k not in ("max_steps", "seed")},
            "trl_chat_template_replaced": trainer.chat_template is not None}


def run_rlhfkit(spec: dict) -> dict:
    from rlhfkit.cli import main as cli

    argv = ["grpo", "--model", spec["model_dir"], "--dataset", spec["prompts_file"],
            "--output-dir", spec["output_dir"], "--max-steps", str(spec["steps"]),
            "--prompts-per-step", "1", "--num-generations", str(spec["group"]),
            "--max-new-tokens", str(spec["max_new_tokens"]), "--temperature", "1.0",
            "--per-device-batch-size", str(spec["batch"]), "--gradient-accumulation-steps", "1",
            "--learning-rate", str(spec["lr"]), "--lr-scheduler-type", "constant",
            "--kl-coef", str(spec["beta"]), "--reward-fn", f"{spec['reward_file']}:reward",
            "--tools", f"{spec['tools_file']}:add", "--max-turns", str(spec["max_turns"]),
            "--seed", str(spec["seed"]), "--num-threads", str(spec["threads"]), "--precision", "fp32",
            "--logging-steps", "1", "--save-steps", "0", "--sample-steps", "0", "--report-to", "none",
            "--no-progress-bar", "--no-eval-on-start", "--overwrite"]  # fmt: skip
    rc = cli(argv)
    if rc != 0:
        raise RuntimeError(f"rlhfkit {' '.join(argv)} exited with {rc}")
    rows = [r for r in base._read_jsonl(Path(spec["output_dir"]) / "metrics.jsonl") if "step_time_s" in r]
    return {"reward_mean": statistics.mean(r["reward_mean"] for r in rows) if rows else None,
            "own_tool_calls_mean": statistics.mean(r.get("tool_calls_mean", 0.0) for r in rows) if rows else None}


TOOL_CLOCK = {"s": 0.0, "n": 0}  # seconds in tool calls and their number, since the rollout began


def timed_tool(fn):
    """``fn`` with its time (and call) added to TOOL_CLOCK; TRL's tool, or rlhfkit's ``run_tool_call``."""
    import functools

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOOL_CLOCK["s"] += time.perf_counter() - start
            TOOL_CLOCK["n"] += 1

    return timed


def install_rollout_timer(library: str) -> list[dict]:
    """Wrap the library's episode rollout call; each call appends its start/end and, from its output, per
    episode: prompt tokens, total tokens (tool turns included), policy tokens, assistant turns, tool calls;
    and the number of model ``generate`` calls (prefills) it made."""
    import torch

    calls: list[dict] = []
    if library == "trl":
        from transformers.generation.utils import GenerationMixin
        from trl import GRPOTrainer

        inner = {"n": 0, "prefill": 0}
        original_generate, original = GenerationMixin.generate, GRPOTrainer._generate

        def generate(self, *args, **kwargs):
            inner["n"] += 1
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            inner["prefill"] += int(mask.sum()) if mask is not None else int(ids.numel())
            return original_generate(self, *args, **kwargs)

        def _generate(self, prompts):
            inner.update(n=0, prefill=0)
            TOOL_CLOCK.update(s=0.0, n=0)
            start = time.perf_counter()
            out = original(self, prompts)
            end = time.perf_counter()
            prompt_ids, completion_ids, tool_mask, completions = out[:4]
            calls.append({
                "start": start, "end": end, "prompt_tokens": [len(p) for p in prompt_ids],
                "total": [len(c) for c in completion_ids],
                "policy": [sum(m) for m in tool_mask] if tool_mask is not None else [len(c) for c in completion_ids],
                "turns": [sum(m.get("role") == "assistant" for m in c) for c in completions],
                "calls": [sum(m.get("role") == "tool" for m in c) for c in completions],
                "generate_calls": inner["n"], "prefill_tokens": inner["prefill"],
                "tool_s": TOOL_CLOCK["s"], "tool_runs": TOOL_CLOCK["n"],
            })
            return out

        GenerationMixin.generate = generate
        GRPOTrainer._generate = _generate
    else:
        import rlhfkit.rollout.episodes as episodes_module
        from rlhfkit.rollout.generate import HFGenerationBackend

        original = HFGenerationBackend.generate
        episodes_module.run_tool_call = timed_tool(episodes_module.run_tool_call)  # the round trip to the worker process

        def generate(self, policy, prompt_ids, num_samples, *args, **kwargs):
            TOOL_CLOCK.update(s=0.0, n=0)
            start = time.perf_counter()
            rollout = original(self, policy, prompt_ids, num_samples, *args, **kwargs)
            end = time.perf_counter()
            mask = rollout.policy_mask
            lengths = list(rollout.lengths)
            calls.append({
                "start": start, "end": end, "prompt_tokens": [len(p) for p in prompt_ids for _ in range(num_samples)],
                "total": lengths,
                "policy": [int(x) for x in mask.sum(dim=1).tolist()] if mask is not None else lengths,
                "turns": list(rollout.turns or [1] * len(lengths)),
                "calls": list(rollout.tool_calls or [0] * len(lengths)),
                "generate_calls": 1, "prefill_tokens": sum(len(p) for p in prompt_ids),
                "tool_s": TOOL_CLOCK["s"], "tool_runs": TOOL_CLOCK["n"],
            })
            return rollout

        HFGenerationBackend.generate = generate
    del torch
    return calls


def child(spec_path: str) -> None:
    import resource

    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    probe = rl.install_probe(spec["pad_token_id"])
    rolls = install_rollout_timer(spec["library"])
    try:
        extra = run_trl(spec) if spec["library"] == "trl" else run_rlhfkit(spec)
    except Exception as exc:  # the row says why (TRL: its version and the exception)
        import traceback

        traceback.print_exc()
        version = ""
        if spec["library"] == "trl":
            import trl

            version = f"TRL {trl.__version__}: "
        Path(spec["result_file"]).write_text(json.dumps({
            "library": spec["library"], "error": f"{version}{type(exc).__name__}: {' '.join(str(exc).split())}"[:600],
            "log_tail": []}))
        return
    steps, warm = spec["steps"], spec["warmup_steps"]
    ends = probe.step_ends
    if len(ends) != steps or len(rolls) != steps:
        raise RuntimeError(f"saw {len(ends)} optimizer steps and {len(rolls)} rollouts, expected {steps}")
    if any(not ends[i - 1] < rolls[i]["start"] < rolls[i]["end"] < ends[i] for i in range(1, steps)):
        raise RuntimeError("a rollout fell outside its step")
    timed = [rolls[i] for i in range(warm, steps)]
    step_s = [ends[i] - ends[i - 1] for i in range(warm, steps)]
    roll_s = [r["end"] - r["start"] for r in timed]
    episodes = [e for r in timed for e in zip(r["total"], r["policy"], r["turns"], r["calls"], r["prompt_tokens"])]
    total, policy = sum(e[0] for e in episodes), sum(e[1] for e in episodes)
    (busy0, own0), (busy1, own1) = probe.cpu[warm - 1], probe.cpu[-1]
    timed_s = ends[-1] - ends[warm - 1]
    result = {
        "library": spec["library"],
        "s_per_step": statistics.median(step_s),
        "s_per_step_mean": statistics.mean(step_s),
        "rollout_s_per_step": statistics.mean(roll_s),
        "policy_tokens_per_s": policy / sum(roll_s),
        "total_tokens_per_s": total / sum(roll_s),
        "tool_s_per_rollout": statistics.mean(r["tool_s"] for r in timed),
        "ms_per_tool_call": 1000 * sum(r["tool_s"] for r in timed) / max(sum(r["tool_runs"] for r in timed), 1),
        "total_tokens_per_s_without_tools": total / (sum(roll_s) - sum(r["tool_s"] for r in timed)),
        "policy_tokens_per_episode": policy / len(episodes),
        "total_tokens_per_episode": total / len(episodes),
        "turns_mean": statistics.mean(e[2] for e in episodes),
        "tool_calls_mean": statistics.mean(e[3] for e in episodes),
        "three_turn_share": sum(e[2] >= 3 for e in episodes) / len(episodes),
        "prompt_tokens_mean": statistics.mean(e[4] for e in episodes),
        "generate_calls_per_rollout": statistics.mean(r["generate_calls"] for r in timed),
        "prefill_tokens_per_rollout": statistics.mean(r["prefill_tokens"] for r in timed),
        "episodes_timed": len(episodes),
        "step_times_s": step_s,
        "rollout_times_s": roll_s,
        "rollouts": rolls,
        "peak_rss_mib": base.peak_rss_mib(),
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "other_processes_cores": max(busy1 - busy0 - (own1 - own0), 0.0) / timed_s,
        "cores_used": (own1 - own0) / timed_s,
        "torch_threads": torch.get_num_threads(),
        "autocast_seen": probe.autocast_seen,
        "embedding_dtypes": sorted(probe.embedding_dtypes),
        **extra,
    }
    Path(spec["result_file"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the parent
def measure(spec: dict, work: Path, args) -> dict:
    """One run in its own process, rerun when others disturbed it (bench_rl_vs_trl's, with this script)."""
    return rl.measure(spec, work, args, script=__file__)


MEDIAN_KEYS = ("s_per_step", "s_per_step_mean", "rollout_s_per_step", "policy_tokens_per_s", "total_tokens_per_s",
               "tool_s_per_rollout", "ms_per_tool_call", "total_tokens_per_s_without_tools")


def combine(runs: list[dict], threshold: float) -> dict:
    """Medians over the (undisturbed, where there are any) repeats; peak RSS = the largest."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    ok = [r for r in ok if r["other_processes_cores"] <= threshold] or ok
    out = dict(sorted(ok, key=lambda r: r["s_per_step"])[len(ok) // 2])
    out.update({k: statistics.median(r[k] for r in ok) for k in MEDIAN_KEYS})
    out.update({f"{k}_runs": [r[k] for r in ok] for k in MEDIAN_KEYS + ("peak_rss_mib",)})
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    out["other_processes_cores"] = max(r["other_processes_cores"] for r in ok)
    out["repeats"] = len(ok)
    return out


def build_table(results: list[dict], args, info: dict) -> str:
    f = base._fmt
    lines = [
        f"Machine: {info['machine']} (torch threads {args.threads}) · torch {info['torch']} · transformers "
        f"{info['transformers']} · trl {info['trl'] or '—'} · rlhfkit {info['git']}",
        "",
        "| library | episode rollout policy tok/s | total tok/s (incl. tool turns) | rollout s/step | in tools "
        "s/rollout (ms/call) | total tok/s without tool time | s/step (median) | policy / total tokens per episode | turns / tool calls per episode | 3-turn episodes "
        "| generate calls per rollout | prefill tokens per rollout | peak RSS MiB | rollout speed-up vs TRL "
        "| RSS vs TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_lib = {r["library"]: r for r in results}
    trl, problems, noisy = by_lib.get("trl"), [], []
    for lib in LIBRARIES:
        r = by_lib.get(lib)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {lib} | cannot run: {r['error']} |" + " |" * 13)
            problems.append(f"{lib}: " + " / ".join(r.get("log_tail", [])[-3:]))
            continue
        speed = rss = ""
        if lib != "trl" and trl is not None and "error" not in trl:
            r["rollout_speedup_vs_trl"] = trl["rollout_s_per_step"] / r["rollout_s_per_step"]
            r["rss_ratio_vs_trl"] = r["peak_rss_mib"] / trl["peak_rss_mib"]
            speed, rss = f"**{r['rollout_speedup_vs_trl']:.2f}×**", f"{r['rss_ratio_vs_trl']:.2f}×"
        lines.append(
            f"| {lib} | {f(r['policy_tokens_per_s'], 0)} | {f(r['total_tokens_per_s'], 0)} | "
            f"{f(r['rollout_s_per_step'], 3)} | {f(r['tool_s_per_rollout'], 3)} ({f(r['ms_per_tool_call'], 1)}) | "
            f"{f(r['total_tokens_per_s_without_tools'], 0)} | {f(r['s_per_step'], 3)} | {f(r['policy_tokens_per_episode'], 1)} / "
            f"{f(r['total_tokens_per_episode'], 1)} | {f(r['turns_mean'], 2)} / {f(r['tool_calls_mean'], 2)} | "
            f"{r['three_turn_share']:.0%} | {f(r['generate_calls_per_rollout'], 1)} | "
            f"{f(r['prefill_tokens_per_rollout'], 0)} | {f(r['peak_rss_mib'], 0)} | {speed} | {rss} |"
        )
        if r["autocast_seen"] or r["embedding_dtypes"] != ["torch.float32"] or r["torch_threads"] != args.threads:
            problems.append(f"{lib}: not plain fp32 with {args.threads} threads ({r['embedding_dtypes']}, "
                            f"autocast={r['autocast_seen']}, {r['torch_threads']})")
        if r["other_processes_cores"] > args.quiet_threshold:
            noisy.append(f"{lib} ({r['other_processes_cores']:.2f} cores)")
    s = info["sft"]
    notes = [
        "",
        f"Task: 'What is A plus B plus C?' (digits), tool add(a, b) -> str; solved = 3 assistant turns (2 calls + "
        f"the answer). Model: tiny Llama ({info['params'] / 1e6:.2f}M params: {args.layers} layers, hidden "
        f"{args.hidden}, 4 heads, vocab "
        f"{info['vocab']}), fp32, fine-tuned to call by a plain torch loop on {s['sft_dialogues']} synthetic solved "
        f"dialogues ({s['sft_tokens_per_dialogue']:.0f} tokens each; {args.sft_steps} steps × {args.sft_batch}, "
        f"lr {args.sft_lr:g}, {s['sft_s']:.0f} s, final loss {s['sft_final_loss']:.3f}, greedy well-formed first "
        f"call {s['greedy_first_call_ok']:.0%}). Prompt: the user turn rendered by TRL's Qwen2.5 chat template "
        f"with the add schema ({info['prompt_tokens']} tokens; the same template, tokenizer and schema for both).",
        f"Per step (both): 1 prompt × group 8, budget {args.max_new_tokens} tokens per episode (tool turns "
        f"included), at most {args.max_turns} tool calls, temperature 1.0, no top-k / top-p, one update of the 8 "
        f"episodes in one micro-batch: lr {args.lr:g} constant, β 0.04, clip ε 0.2. {args.steps} steps, the first "
        f"{args.warmup_steps} warm-up (not timed); seed {args.seed}; torch threads {args.threads}. Reward: 1 if the "
        "last number of the final answer is the sum"
        + "".join(f" (mean over the run: {lib} {by_lib[lib]['reward_mean']:.2f})"
                  for lib in LIBRARIES if lib in by_lib and by_lib[lib].get("reward_mean") is not None) + ".",
        "rlhfkit: `rlhfkit grpo --tools tools.py:add --max-turns 3 --prompts-per-step 1 --num-generations 8 "
        f"--max-new-tokens {args.max_new_tokens} --per-device-batch-size 8 --learning-rate {args.lr:g} "
        "--lr-scheduler-type constant --kl-coef 0.04 --reward-fn reward.py:reward --precision fp32 --num-threads "
        f"{args.threads} --save-steps 0 --sample-steps 0` (in-process in the child). One decode loop per rollout; "
        "a tool turn is forced into the same KV cache (the tool runs in a persistent worker process, with a timeout).",
    ]
    t = next((r.get("trl_settings") for r in results if r.get("library") == "trl" and r.get("trl_settings")), None)
    if info["trl"]:
        notes.append(
            f"TRL {info['trl']}: GRPOTrainer(model=<model dir>, reward_funcs=reward, processing_class=tokenizer, "
            "tools=[add])" + (" with " + ", ".join(f"{k}={v!r}" for k, v in t.items()) if t else "")
            + ". Each turn is a transformers `generate` call; the rows that called get prompt + completion + tool "
            "turn fed to the next `generate` (prefilled again), the tool runs in-process. TRL's policy tokens "
            "include the `<|im_end|>` the model writes after a call; rlhfkit forces it (part of the tool turn)."
        )
    notes.append(
        "episode rollout tok/s = tokens of the timed rollouts / time in the library's whole rollout call (rlhfkit: "
        "HFGenerationBackend.generate with episodes, tools included; TRL: GRPOTrainer._generate, i.e. prompt "
        "tokenization, every generate call, parsing and tools); policy = tokens the model sampled, total = policy "
        "+ forced tool-turn tokens (the episode's whole completion). in tools = time inside the tool calls "
        "of a rollout (rlhfkit: run_tool_call, i.e. fork a child, call, pipe, join; TRL: the tool function "
        "in-process), ms per call in brackets; 'without tool time' divides by the rollout time minus it. turns = assistant turns, 3-turn episodes = "
        "share with ≥ 3. prefill tokens = prompt tokens fed to generate calls (TRL: again after every tool turn). "
        "s/step: optimizer-step hook intervals (rollout + reward + reference forward + update). Peak RSS = VmHWM of "
        "the training process (rlhfkit's forked tool children not included). speed-up = TRL rollout s/step / "
        "rlhfkit rollout s/step; RSS vs TRL = rlhfkit / TRL. Mind the work differs when the two samplers' "
        "episodes differ (tokens per episode): compare tok/s."
        + (f" Medians of {args.repeats} runs per row; peak RSS: the largest." if args.repeats > 1 else "")
    )
    if noisy:
        notes += ["", "**Noisy timing:** other processes kept the CPU busy during: " + ", ".join(noisy)]
    if problems:
        notes += [""] + [f"**Check failed / reason:** {p}" for p in problems]
    return "\n".join(lines + notes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="rollout+update steps per run (default 6)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps excluded from timing (default 2)")
    p.add_argument("--libraries", default="rlhfkit,trl", help="comma-separated: rlhfkit, trl (default both)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="token budget per episode, tool turns included")
    p.add_argument("--max-turns", type=int, default=3, help="most tool calls per episode (both libraries)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4, help="tiny Llama layers (default 4)")
    p.add_argument("--hidden", type=int, default=128, help="tiny Llama hidden size (default 128; 4 heads)")
    p.add_argument("--sft-steps", type=int, default=200, help="fine-tuning steps of the model that calls")
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-dialogues", type=int, default=600)
    p.add_argument("--repeats", type=int, default=1, help="runs per library; the table shows medians")
    p.add_argument("--retries", type=int, default=1, help="reruns of a run other processes disturbed")
    p.add_argument("--quiet-wait", type=float, default=60, help="seconds to wait for a quiet CPU before a run")
    p.add_argument("--quiet-threshold", type=float, default=0.25, help="cores others may use (quiet)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    p.add_argument("--workdir", default=None, help="keep (and reuse) model, data and logs here (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if not args.libraries or any(s not in LIBRARIES for s in args.libraries):
        p.error(f"--libraries takes {', '.join(LIBRARIES)}")
    if args.repeats < 1 or args.retries < 0 or not 1 <= args.warmup_steps < args.steps - 1:
        p.error("need --repeats >= 1, --retries >= 0 and 1 <= --warmup-steps < --steps - 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    base.use_child_env(args.threads)
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:  # build_tokenizer takes TRL's Qwen2.5 template
        print("TRL is not installed (pip install -e '.[bench]'); it provides the chat template", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rlhfkit-tools-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(work, args)
    config = AutoConfig.from_pretrained(assets["model_dir"])
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tok = assets["tok"]
    common = {
        "model_dir": str(assets["model_dir"]), "prompts_file": str(assets["prompts_file"]),
        "reward_file": str(assets["reward_file"]), "tools_file": str(assets["tools_file"]),
        "steps": args.steps, "warmup_steps": args.warmup_steps, "max_new_tokens": args.max_new_tokens,
        "max_turns": args.max_turns, "lr": args.lr, "seed": args.seed, "threads": args.threads, "batch": 8,
        "group": 8, "beta": 0.04, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
    }
    info = {"machine": rl.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "git": base.git_state(), "params": params, "vocab": config.vocab_size,
            "prompt_tokens": assets["prompt_tokens"], "sft": assets["sft"]}
    print(f"model: {assets['model_dir']} ({params:,} parameters; SFT {assets['sft']['sft_s']:.0f} s, greedy first "
          f"call ok {assets['sft']['greedy_first_call_ok']:.0%}: {assets['sft']['greedy_sample']!r}); "
          f"{info['machine']}", flush=True)

    runs, results = [], []
    per_lib: dict[str, list[dict]] = {lib: [] for lib in args.libraries}
    for rep in range(args.repeats):
        for lib in args.libraries if rep % 2 == 0 else args.libraries[::-1]:
            r = measure({**common, "library": lib}, work, args)
            r["repeat"] = rep + 1
            runs.append(r)
            per_lib[lib].append(r)
            if "error" in r:
                print(f"{lib:<8} FAILED ({r['error']})\n    " + "\n    ".join(r["log_tail"]), flush=True)
            else:
                print(f"{lib:<8} {r['s_per_step']:.3f} s/step (rollout {r['rollout_s_per_step']:.3f})  "
                      f"{r['policy_tokens_per_s']:,.0f} policy tok/s  {r['total_tokens_per_s']:,.0f} total tok/s  "
                      f"turns {r['turns_mean']:.2f}  calls {r['tool_calls_mean']:.2f}  "
                      f"{r['peak_rss_mib']:,.0f} MiB  ({r['process_s']:.0f}s in all)", flush=True)
    results = [combine(per_lib[lib], args.quiet_threshold) for lib in args.libraries]

    table = build_table(results, args, info)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"table_markdown": table, "args": {k: v for k, v in vars(args).items() if k != "child"},
               "info": info, "results": results, "runs": runs, "total_wall_s": time.perf_counter() - started,
               "workdir": str(work)}
    (RESULTS / f"tools_{stamp}.json").write_text(json.dumps(payload, indent=1, default=str))
    (RESULTS / f"tools_{stamp}.md").write_text(table + "\n")
    print(f"\nresults: {RESULTS / f'tools_{stamp}.md'} (+ .json; total {payload['total_wall_s']:.0f}s)")
    failed = any("error" in r for r in results if r["library"] == "rlhfkit")
    if not args.workdir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
