#!/usr/bin/env python
"""Benchmark rlhfkit against TRL: SFT, reward model and DPO on the same tiny model, data and settings.

    .venv/bin/python bench/bench_vs_trl.py                 # all stages, both libraries (< 10 min on 2 cores)
    .venv/bin/python bench/bench_vs_trl.py --only dpo --steps 20 --warmup-steps 3
    .venv/bin/python bench/bench_vs_trl.py --repeats 3     # medians of 3 runs, library order alternating

Every (stage, library) pair trains in its own subprocess, one at a time, so that its peak RSS is that
process's own high-water mark (VmHWM; not ``ru_maxrss``, which Linux carries over from the parent across
exec) and no other benchmark competes for the CPU while it is timed. Both libraries are measured the same
way, independently of their own logging:

* time: a global ``torch.optim`` step post-hook stamps ``time.perf_counter()`` after every optimizer
  step; the timed window runs from the end of the last warm-up step to the end of the last step, so it
  holds whole iterations (data, forward, backward, clipping, optimizer, the library's own logging);
* useful tokens: a global forward pre-hook on ``nn.Embedding`` modules that are training with grad
  enabled (the policy / reward model, never the frozen DPO reference) counts the non-pad input ids of
  every step; a prompt that rlhfkit's packed batch shares among its responses counts once per response,
  as the data holds it (the model sees it once: fewer tokens processed, same useful tokens). As a
  cross-check, the table also shows the estimate "mean example length x batch / s per step" computed
  from the data files (chosen + rejected for RM and DPO).

The data set holds exactly steps x batch rows, so each library consumes every row once (in its own order);
the script checks that the tokens each library counted over all steps equal the tokens of the data, that
training ran in plain fp32 (no autocast) and with the requested thread count.

The machine may be shared: before each run the script waits (--quiet-wait) until other processes leave
the CPU idle, measures how many cores other processes used while a run was timed (/proc/stat minus this
run's own CPU time), reruns a disturbed run (--retries) and flags what stayed noisy under the table.

Results (Markdown table + raw numbers) go to bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
STAGES = ("sft", "rm", "dpo")
LIBRARIES = ("rlhfkit", "trl")
STAGE_NAMES = {"sft": "SFT", "rm": "reward model", "dpo": "DPO"}

# What TRL gets beyond the common settings (printed in the footnote).
TRL_OPTIONS = {
    "sft": "padding_free=True (max_length=None: TRL refuses max_length with padding-free and no packing; "
    "no row exceeds --max-length), packing=False",
    "rm": "padded batches (RewardConfig has no padding-free/packing option in TRL 1.16)",
    "dpo": "padded batches (DPOConfig.padding_free is disabled in TRL 1.16: it warns and falls back to "
    "padding), precompute_ref_log_probs=False, ref model = separate copy loaded by TRL",
}


# ----------------------------------------------------------------------------------------------- data
def _word_list() -> list[str]:
    from rlhfkit.models.tiny import default_corpus

    words = set()
    for line in default_corpus(num_lines=2000, seed=0):
        for word in re.findall(r"[a-z]+", line.lower()):
            if word not in ("human", "assistant"):
                words.add(word)
    return sorted(words)


class TextMaker:
    """Random word sequences with an exact token count (byte-level BPE: ' word' pieces are additive)."""

    def __init__(self, tokenizer, rng: random.Random):
        self.tok, self.rng = tokenizer, rng
        self.words = _word_list()
        self.cost_first = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in self.words}
        self.cost_next = {w: len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in self.words}
        self.one_token = [w for w in self.words if self.cost_next[w] == 1]

    def text(self, n_tokens: int, leading_space: bool) -> str:
        """Words totalling exactly ``n_tokens`` tokens (without special tokens)."""
        parts: list[str] = []
        used = 0
        while used < n_tokens:
            first = not parts and not leading_space
            cost = self.cost_first if first else self.cost_next
            word = self.rng.choice(self.words)
            if used + cost[word] > n_tokens:
                pool = [w for w in self.one_token if cost[w] == 1]
                word = self.rng.choice(pool)
            parts.append(word)
            used += cost[word]
        out = " ".join(parts)
        return " " + out if leading_space else out


def example_tokens(tok, prompt: str, response: str) -> int:
    """Tokens of prompt + response as both libraries build them: BOS + prompt + response + EOS."""
    prompt_ids = tok(prompt).input_ids
    response_ids = tok(response, add_special_tokens=False).input_ids
    together = tok(prompt + response).input_ids
    if together != prompt_ids + response_ids:
        raise RuntimeError(f"prompt/response boundary merges tokens: {prompt!r} + {response!r}")
    return len(prompt_ids) + len(response_ids) + 1


def make_data(model_dir: Path, out_dir: Path, rows: int, min_len: int, max_len: int, seed: int) -> dict:
    """Write sft.jsonl (prompt/completion) and pref.jsonl (prompt/chosen/rejected); return length stats."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    specials = len(tok("x").input_ids) - len(tok("x", add_special_tokens=False).input_ids) + 1  # BOS + EOS
    rng = random.Random(seed)
    maker = TextMaker(tok, rng)

    def pair(total: int, prompt_total: int) -> tuple[str, str]:
        return maker.text(prompt_total, False), maker.text(total - prompt_total - specials, True)

    sft_rows, sft_lens = [], []
    for _ in range(rows):
        total = rng.randint(min_len, max_len)
        prompt, completion = pair(total, rng.randint(3, max(3, total // 2)))
        sft_rows.append({"prompt": prompt, "completion": completion})
        sft_lens.append(example_tokens(tok, prompt, completion))
    pref_rows, pref_lens = [], []
    for _ in range(rows):
        len_c, len_r = rng.randint(min_len, max_len), rng.randint(min_len, max_len)
        prompt_total = rng.randint(3, max(3, min(len_c, len_r) // 2))
        prompt = maker.text(prompt_total, False)
        chosen = maker.text(len_c - prompt_total - specials, True)
        rejected = maker.text(len_r - prompt_total - specials, True)
        while rejected == chosen:
            rejected = maker.text(len_r - prompt_total - specials, True)
        pref_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        pref_lens.append((example_tokens(tok, prompt, chosen), example_tokens(tok, prompt, rejected)))

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("sft.jsonl", sft_rows), ("pref.jsonl", pref_rows)):
        with open(out_dir / name, "w", encoding="utf-8") as fh:
            for row in data:
                fh.write(json.dumps(row) + "\n")
    flat_pref = [n for p in pref_lens for n in p]
    return {
        "rows": rows,
        "pad_token_id": tok.pad_token_id,
        "sft": {
            "lengths": sft_lens,
            "tokens_per_example": sum(sft_lens) / rows,
            "total_tokens": sum(sft_lens),
        },
        "pref": {
            "lengths": pref_lens,
            "tokens_per_example": sum(flat_pref) / rows,
            "total_tokens": sum(flat_pref),
        },
        "min_tokens": min(sft_lens + flat_pref),
        "max_tokens": max(sft_lens + flat_pref),
    }


def check_trl_padding_free(model_dir: Path, lengths: list[int]) -> float:
    """Max |logit difference| between TRL's padding-free batch (as SFTTrainer feeds it: use_cache=False)
    and separate forwards of the same sequences, on this model with its default (sdpa) attention on CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=model.config.pad_token_id, padding_free=True)(
        [{"input_ids": s} for s in seqs]
    )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    worst, offset = 0.0, 0
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for s in seqs:
            alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            worst = max(worst, float((packed[offset : offset + len(s)] - alone).abs().max()))
            offset += len(s)
    return worst


# ------------------------------------------------------------------------------------------- the child
class Probe:
    """Global hooks: optimizer-step timestamps and non-pad tokens fed to trainable embeddings per step."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.step_ends: list[float] = []
        self.optimizer_s: list[float] = []  # duration of each optimizer.step()
        self._step_start = 0.0
        self.step_tokens: list[int] = []
        self.step_padded: list[int] = []
        self._tokens = self._padded = 0
        self._shared = 0  # prompt tokens rlhfkit's shared-prompt batches did not repeat (see count_shared_prompts)
        self.autocast_seen = False
        self.embedding_dtypes: set[str] = set()
        self.optimizers: set[str] = set()
        self.models_seen: set[str] = set()  # top-level model forwards: class, mode, attention implementation
        self.cpu: list[tuple[float, float]] = []  # per step end: (machine busy CPU s, this process's CPU s)

    def install(self) -> None:
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from transformers import PreTrainedModel

        def on_forward(module, args):
            if isinstance(module, PreTrainedModel):
                mode = "train" if module.training else "eval"
                impl = getattr(module.config, "_attn_implementation", None)
                self.models_seen.add(
                    f"{type(module).__name__}({mode}, grad={torch.is_grad_enabled()}): {impl}"
                )
            if (
                isinstance(module, torch.nn.Embedding)
                and module.training
                and torch.is_grad_enabled()
                and args
                and torch.is_tensor(args[0])
                and not args[0].is_floating_point()
            ):
                ids = args[0]
                self._tokens += int((ids != self.pad).sum())
                self._padded += int(ids.numel())
                self.autocast_seen |= torch.is_autocast_enabled("cpu")
                self.embedding_dtypes.add(str(module.weight.dtype))

        def before_step(_optimizer, _args, _kwargs):
            self._step_start = time.perf_counter()

        def on_step(optimizer, _args, _kwargs):
            self.step_ends.append(time.perf_counter())
            self.optimizer_s.append(self.step_ends[-1] - self._step_start)
            self.cpu.append(cpu_seconds())
            self.step_tokens.append(self._tokens + self._shared)
            self.step_padded.append(self._padded + self._shared)
            self._tokens = self._padded = self._shared = 0
            self.optimizers.add(type(optimizer).__name__)

        register_module_forward_pre_hook(on_forward)
        register_optimizer_step_pre_hook(before_step)
        register_optimizer_step_post_hook(on_step)

    def count_shared_prompts(self) -> None:
        """Count a prompt that rlhfkit's packed batch shares among its responses (``--share-prompts``) once per
        response, as the data holds it: useful tokens are the examples' tokens whatever the layout, so the
        tokens a library saves by not repeating a prompt make it faster, not its token count smaller."""
        from rlhfkit.data import collate

        packed_once = collate.pack_shared_prompts

        def counted(prompts, responses):
            batch = packed_once(prompts, responses)
            self._shared += sum(len(p) + len(r) for p, r in zip(prompts, responses)) - batch["num_tokens"]
            return batch

        collate.pack_shared_prompts = counted


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM).

    Not ``ru_maxrss``: Linux carries the RSS of the process that forked us into ``ru_maxrss`` across exec
    (the parent holds torch, transformers and the model, ~0.5 GiB), so small children would read high.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(values) - values[3] - values[4]) / _CLK_TCK  # all but idle and iowait


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return machine_busy_seconds(), usage.ru_utime + usage.ru_stime


def other_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over ``seconds`` (this process sleeps meanwhile)."""
    before, own_before = cpu_seconds()
    time.sleep(seconds)
    after, own_after = cpu_seconds()
    return max(after - before - (own_after - own_before), 0.0) / seconds


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_rlhfkit(spec: dict) -> dict:
    from rlhfkit.trainers import DPOConfig, RewardConfig, SFTConfig, run_dpo, run_reward, run_sft

    common = dict(
        model=spec["model_dir"],
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        learning_rate=spec["lr"],
        seed=spec["seed"],
        num_threads=spec["threads"],
        progress_bar=False,
        eval_on_start=False,
        logging_steps=1,
        packing=spec["rlhfkit_packing"],
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        overwrite=True,  # each repeat replaces the previous repeat's run in the same folder
    )
    stage = spec["stage"]
    if stage == "sft":
        summary = run_sft(SFTConfig(dataset=spec["sft_file"], **common))
    elif stage == "rm":
        summary = run_reward(RewardConfig(dataset=spec["pref_file"], **common))
    else:
        summary = run_dpo(
            DPOConfig(
                dataset=spec["pref_file"], beta=0.1, loss_type="sigmoid", precompute_ref=False, **common
            )
        )
    rows = [r for r in _read_jsonl(Path(spec["output_dir"]) / "metrics.jsonl") if "step_time_s" in r]
    timed = [r for r in rows if r["step"] > spec["warmup_steps"]]
    own = {}
    if timed:
        own = {
            "step_time_s_mean": sum(r["step_time_s"] for r in timed) / len(timed),
            "tokens_per_s_mean": sum(r["tokens_per_s"] for r in timed) / len(timed),
        }
    return {
        "packing": summary.get("packing"),
        "final_loss": summary.get("train_loss"),
        "first_loss": rows[0].get("loss") if rows else None,
        "own_metrics": own,
        "summary_precision": summary.get("precision"),
    }


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    stage = spec["stage"]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = _read_jsonl(Path(spec["sft_file"] if stage == "sft" else spec["pref_file"]))
    dataset = Dataset.from_list(rows)
    common = dict(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=spec["steps"],
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        args = SFTConfig(
            max_length=None, padding_free=True, packing=False, completion_only_loss=True, **common
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model_dir"], num_labels=1, dtype=torch.float32
        )
        args = RewardConfig(max_length=spec["max_length"], **common)
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        args = DPOConfig(
            max_length=spec["max_length"],
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            padding_free=False,
            **common,
        )
        trainer = DPOTrainer(
            model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok
        )
    if len(trainer.train_dataset) != len(rows):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} rows")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "final_loss": losses[-1] if losses else None,
        "trl_bf16": args.bf16,
        "trl_optim": str(args.optim),
        "trl_padding_free": getattr(trainer, "padding_free", None),
    }


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    rss_import = peak_rss_mib()
    probe = Probe(spec["pad_token_id"])
    probe.install()
    if spec["library"] == "rlhfkit":
        probe.count_shared_prompts()
    t0 = time.perf_counter()
    extra = run_rlhfkit(spec) if spec["library"] == "rlhfkit" else run_trl(spec)
    wall = time.perf_counter() - t0
    ends, warm = probe.step_ends, spec["warmup_steps"]
    if len(ends) != spec["steps"]:
        raise RuntimeError(f"saw {len(ends)} optimizer steps, expected {spec['steps']}")
    timed_steps = len(ends) - warm
    timed_s = ends[-1] - ends[warm - 1]
    timed_tokens = sum(probe.step_tokens[warm:])
    timed_padded = sum(probe.step_padded[warm:])
    (busy0, own0), (busy1, own1) = probe.cpu[warm - 1], probe.cpu[-1]
    own_cores = (own1 - own0) / timed_s
    other_cores = max(busy1 - busy0 - (own1 - own0), 0.0) / timed_s
    result = {
        "stage": spec["stage"],
        "library": spec["library"],
        "steps": len(ends),
        "timed_steps": timed_steps,
        "timed_s": timed_s,
        "s_per_step": timed_s / timed_steps,
        "timed_tokens": timed_tokens,
        "tokens_per_s": timed_tokens / timed_s,
        "timed_tokens_incl_pad": timed_padded,
        "pad_fraction": 1 - timed_tokens / max(timed_padded, 1),
        "all_tokens": sum(probe.step_tokens),
        "step_times_s": [b - a for a, b in zip(ends, ends[1:])],
        "step_tokens": probe.step_tokens,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_import_mib": rss_import,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cores_used": own_cores,
        "other_processes_cores": other_cores,
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "torch_threads": torch.get_num_threads(),
        "autocast_seen": probe.autocast_seen,
        "embedding_dtypes": sorted(probe.embedding_dtypes),
        "optimizers": sorted(probe.optimizers),
        "model_forwards": sorted(probe.models_seen),
        "optimizer_step_s_mean": sum(probe.optimizer_s[warm:]) / timed_steps,
        "wall_s_in_library": wall,
        **extra,
    }
    Path(spec["result_file"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the parent
def run_one(spec: dict, work: Path, timeout: float) -> dict:
    name = f"{spec['stage']}-{spec['library']}"
    spec = {**spec, "output_dir": str(work / "out" / name), "result_file": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(spec["threads"]),
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not Path(spec["result_file"]).exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return {
            "stage": spec["stage"],
            "library": spec["library"],
            "error": f"exit {proc.returncode}",
            "log_tail": tail,
            "process_s": elapsed,
        }
    result = json.loads(Path(spec["result_file"]).read_text())
    result["process_s"] = elapsed
    return result


def combine(runs: list[dict], quiet_threshold: float) -> dict:
    """One row from the repeats of a (stage, library): medians of the timings, the largest peak RSS.

    Runs that other processes disturbed are left out when at least one undisturbed run exists.
    """
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    quiet = [r for r in ok if r["other_processes_cores"] <= quiet_threshold]
    ok = quiet or ok
    ok.sort(key=lambda r: r["tokens_per_s"])
    out = dict(ok[len(ok) // 2])  # the median run (the upper one for an even count) gives the other fields
    out.update(
        {
            "repeats": len(ok),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
            "s_per_step": statistics.median(r["s_per_step"] for r in ok),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "other_processes_cores": max(r["other_processes_cores"] for r in ok),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in ok],
            "s_per_step_runs": [r["s_per_step"] for r in ok],
            "peak_rss_mib_runs": [r["peak_rss_mib"] for r in ok],
        }
    )
    bad = [r["all_tokens"] for r in ok if r["all_tokens"] != ok[0]["all_tokens"]]
    if bad:
        out["all_tokens"] = bad[0]
    return out


def model_shape(config) -> str:
    """'10 layers, hidden 768, 12 heads, vocab 16384': the shape a table's note names, read from the config."""
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads, vocab {config.vocab_size}")


def git_state() -> str:
    """Commit of the checkout, with '+dirty' when src/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def measure(spec: dict, work: Path, args) -> dict:
    """Run one (stage, library); rerun (up to --retries times) when other processes disturbed the timing,
    keeping the least disturbed attempt."""
    attempts = []
    for attempt in range(args.retries + 1):
        load, waited = wait_for_quiet(args.quiet_wait, args.quiet_threshold)
        try:
            r = run_one(spec, work, args.timeout)
        except subprocess.TimeoutExpired:
            r = {
                "stage": spec["stage"],
                "library": spec["library"],
                "error": f"timeout after {args.timeout:.0f}s",
                "log_tail": [],
            }
        r.update({"other_load_before": load, "waited_for_quiet_s": waited, "attempt": attempt + 1})
        attempts.append(r)
        if "error" in r or r["other_processes_cores"] <= args.quiet_threshold:
            break
        print(
            f"  {spec['stage']}/{spec['library']}: other processes used "
            f"{r['other_processes_cores']:.2f} cores "
            "while it was timed",
            flush=True,
        )
    best = min(attempts, key=lambda a: a.get("other_processes_cores", float("inf")))
    best["attempts_other_cores"] = [a.get("other_processes_cores") for a in attempts]
    return best


def wait_for_quiet(max_wait: float, threshold: float) -> tuple[float, float]:
    """Sample the load other processes put on the CPU; wait (up to ``max_wait`` s) until it is below
    ``threshold`` cores. Returns (last sampled load, seconds waited)."""
    start = time.perf_counter()
    load = other_load(1.0)
    while load > threshold and time.perf_counter() - start < max_wait:
        print(f"  other processes keep {load:.1f} cores busy; waiting for a quiet CPU ...", flush=True)
        time.sleep(4.0)
        load = other_load(1.0)
    return load, time.perf_counter() - start


def use_child_env(threads: int) -> None:
    """This process runs as its children do (their thread settings; the checkout's src on sys.path)."""
    for key, value in child_env(threads).items():
        if key != "PYTHONPATH":
            os.environ[key] = value
    sys.path.insert(0, str(REPO / "src"))


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "CUDA_VISIBLE_DEVICES": "",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def _fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def build_table(results: list[dict], data: dict, args, info: dict) -> str:
    lines = [
        "| stage | library | s/step | useful tok/s | peak RSS MiB | tok/s ratio | RSS ratio "
        "| pad % | tok/s (mean-len est.) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["stage"], r["library"]): r for r in results}
    problems: list[str] = []
    noisy: list[str] = []
    for stage in args.only:
        trl = by_key.get((stage, "trl"))
        for lib in args.libraries:
            r = by_key.get((stage, lib))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {STAGE_NAMES[stage]} | {lib} | failed ({r['error']}) | | | | | | |")
                problems.append(f"{stage}/{lib}: " + " / ".join(r["log_tail"][-3:]))
                continue
            per_example = data["sft" if stage == "sft" else "pref"]["tokens_per_example"]
            estimate = per_example * args.batch_size / r["s_per_step"]
            r["tokens_per_s_mean_len_estimate"] = estimate
            tok_ratio = rss_ratio = None
            if lib == "rlhfkit" and trl is not None and "error" not in trl:
                tok_ratio = r["tokens_per_s"] / trl["tokens_per_s"]
                rss_ratio = r["peak_rss_mib"] / trl["peak_rss_mib"]
                r["tokens_per_s_ratio_vs_trl"], r["rss_ratio_vs_trl"] = tok_ratio, rss_ratio
            ratio_cells = (
                (f"**{tok_ratio:.2f}×**", f"{rss_ratio:.2f}×") if tok_ratio is not None else ("", "")
            )
            lines.append(
                f"| {STAGE_NAMES[stage]} | {lib} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['peak_rss_mib']:,.0f} | {ratio_cells[0]} | {ratio_cells[1]} | "
                f"{100 * r['pad_fraction']:.0f} | {estimate:,.0f} |"
            )
            expected = data["sft" if stage == "sft" else "pref"]["total_tokens"]
            if r["all_tokens"] != expected:
                problems.append(
                    f"{stage}/{lib}: fed {r['all_tokens']} useful tokens to the model over all steps, "
                    f"the data holds {expected}"
                )
            if r.get("autocast_seen") or r.get("embedding_dtypes") != ["torch.float32"]:
                problems.append(
                    f"{stage}/{lib}: not plain fp32 (autocast={r.get('autocast_seen')}, "
                    f"dtypes={r.get('embedding_dtypes')})"
                )
            if r.get("other_processes_cores", 0.0) > args.quiet_threshold:
                noisy.append(f"{stage}/{lib} ({r['other_processes_cores']:.2f} cores)")
            if r.get("torch_threads") != args.threads:
                problems.append(f"{stage}/{lib}: torch used {r.get('torch_threads')} threads")
    packing = {
        r["stage"]: r.get("packing") for r in results if r["library"] == "rlhfkit" and "error" not in r
    }
    timed = args.steps - args.warmup_steps
    notes = [
        "",
        f"Model: Llama ({info['params'] / 1e6:.2f}M params: {info.get('shape', '?')}), fp32, "
        f"random init; the reward model is the same checkpoint with a 1-output score "
        f"head. Data: {data['rows']} rows per file, prompt+response "
        f"{data['min_tokens']}–{data['max_tokens']} tokens (uniform, incl. BOS/EOS), mean "
        f"{data['sft']['tokens_per_example']:.1f} tokens per SFT example "
        f"and {data['pref']['tokens_per_example']:.1f} per preference pair (chosen + rejected).",
        f"Settings (both libraries): batch {args.batch_size} per step, no gradient accumulation, "
        f"{args.steps} steps of which the first {args.warmup_steps} are warm-up (not timed), max length "
        f"{args.max_length} (nothing truncated), lr {args.lr:g} cosine, AdamW, grad clip 1.0, "
        f"seed {args.seed}, activation checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"torch threads {args.threads}, one process at a time. DPO: beta 0.1, sigmoid loss, reference = a "
        "separate frozen copy, reference log-probs computed on the fly (not precomputed).",
        f"rlhfkit {info['rlhfkit_git']}: packing={args.rlhfkit_packing} (packing used: {packing}), "
        "logging every "
        "step, no eval, final model saved after the timed steps.",
    ]
    if info["trl_version"]:
        notes.append(
            f"TRL {info['trl_version']}: bf16=False, fp16=False, use_cpu=True, "
            f"gradient_checkpointing={args.gradient_checkpointing}, "
            "no eval, save_strategy=no, logging only at the last step, report_to=none, "
            "dataloader_num_workers=0; "
            + "; ".join(f"{STAGE_NAMES[s]}: {TRL_OPTIONS[s]}" for s in args.only)
            + ". TRL padding-free check on this model (sdpa, CPU): max |Δlogit| vs separate sequences = "
            f"{info['trl_padding_free_max_diff']:.1e}."
        )
    notes += [
        f"Useful tok/s = non-pad tokens fed to the trained model during the {timed} timed steps "
        "(counted by a "
        "forward hook; chosen + rejected for RM and DPO; a prompt rlhfkit shares among a pair's responses "
        "counted once per response, as the data holds it) / time from the end of the last warm-up step to the "
        "end of the last step (optimizer-step hook). Data order differs between the libraries, so the last "
        "column gives the library-independent estimate mean example length × batch × timed steps / time. "
        "s/step over the timed steps. Peak RSS = VmHWM of the process that trained (imports included). "
        "tok/s ratio = rlhfkit / TRL (> 1: rlhfkit faster); RSS ratio = rlhfkit / TRL (< 1: rlhfkit leaner). "
        "pad % = padding share of the token positions the model processed."
        + (
            f" Timings: median of {args.repeats} runs per (stage, library) (undisturbed runs only, where "
            "there are any), library order alternating; "
            "peak RSS: the largest."
            if args.repeats > 1
            else ""
        ),
    ]
    if noisy:
        notes.append("")
        notes.append(
            "**Noisy timing:** other processes kept the CPU busy while these runs were timed: "
            + ", ".join(noisy)
            + ". Rerun on a quiet machine for trustworthy ratios."
        )
    if problems:
        notes.append("")
        notes.extend(f"**Check failed:** {p}" for p in problems)
    return "\n".join(lines + notes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps excluded from timing (default 5)")
    p.add_argument(
        "--only",
        default="sft,rm,dpo",
        help="stages to run: sft, rm, dpo or a comma-separated list (default all)",
    )
    p.add_argument("--libraries", default="rlhfkit,trl", help="comma-separated: rlhfkit, trl (default both)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--min-tokens", type=int, default=16, help="shortest prompt+response (default 16)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest prompt+response (default 256)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--rlhfkit-packing",
        default="auto",
        choices=("auto", "on", "off"),
        help="rlhfkit's packing setting (default auto)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both libraries recompute activations in backward (memory for time; default off)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds for other processes to leave the CPU idle "
        "(default 60; 0 = don't wait)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="cores other processes may keep busy for the machine to count as quiet (default 0.25)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per (stage, library), library order alternating; the table shows medians (default 1)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="rerun a (stage, library) whose timing other processes disturbed, up to N times (default 1)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per (stage, library) run")
    p.add_argument("--workdir", default=None, help="keep model, data and logs here (default: a temp dir)")
    p.add_argument("--model-dir", default=None, help="train this model (default: build the 5M bench model)")
    p.add_argument("--results-json", default=None, help="also write the results here (bench_scaling.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if not args.only or any(s not in STAGES for s in args.only):
        p.error(f"--only takes {', '.join(STAGES)} (comma-separated)")
    if not args.libraries or any(s not in LIBRARIES for s in args.libraries):
        p.error(f"--libraries takes {', '.join(LIBRARIES)} (comma-separated)")
    if args.repeats < 1 or args.retries < 0:
        p.error("need --repeats >= 1 and --retries >= 0")
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps (the first step is never timed)")
    if args.max_tokens > args.max_length or args.min_tokens < 12:
        p.error("need 12 <= --min-tokens and --max-tokens <= --max-length (nothing may be truncated)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    use_child_env(args.threads)
    started = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfkit.models.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rlhfkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = build_tiny_model(work / "model", layers=4, hidden=256, heads=4, vocab=2048)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    print(f"model: {model_dir} ({params:,} parameters)", flush=True)
    rows = args.steps * args.batch_size
    data = make_data(model_dir, work / "data", rows, args.min_tokens, args.max_tokens, args.seed)
    print(
        f"data: {rows} rows per file, {data['min_tokens']}–{data['max_tokens']} tokens per sequence, "
        f"{data['sft']['tokens_per_example']:.1f} tokens per SFT example, "
        f"{data['pref']['tokens_per_example']:.1f} per preference pair",
        flush=True,
    )
    info = {
        "params": params,
        "vocab": config.vocab_size,
        "shape": model_shape(config),
        "torch_version": torch.__version__,
        "rlhfkit_git": git_state(),
        "trl_version": None,
        "trl_padding_free_max_diff": None,
    }
    if "trl" in args.libraries:
        import trl

        info["trl_version"] = trl.__version__
        info["trl_padding_free_max_diff"] = check_trl_padding_free(model_dir, [5, 17, 9, 40])

    base = {
        "model_dir": str(model_dir),
        "sft_file": str(work / "data" / "sft.jsonl"),
        "pref_file": str(work / "data" / "pref.jsonl"),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "pad_token_id": data["pad_token_id"],
        "rlhfkit_packing": args.rlhfkit_packing,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    runs: list[dict] = []
    results: list[dict] = []
    for stage in args.only:
        stage_runs: dict[str, list[dict]] = {lib: [] for lib in args.libraries}
        for rep in range(args.repeats):
            # Alternate the order (A B, B A, ...) so that a slow phase of the machine hits both libraries.
            for lib in args.libraries if rep % 2 == 0 else args.libraries[::-1]:
                r = measure({**base, "stage": stage, "library": lib}, work, args)
                r["repeat"] = rep + 1
                runs.append(r)
                stage_runs[lib].append(r)
                if "error" in r:
                    print(
                        f"{stage:>4} {lib:<8} FAILED ({r['error']}); log: {work / f'{stage}-{lib}.log'}",
                        flush=True,
                    )
                    print("    " + "\n    ".join(r["log_tail"]), flush=True)
                else:
                    print(
                        f"{stage:>4} {lib:<8} {r['s_per_step']:.3f} s/step  {r['tokens_per_s']:,.0f} tok/s  "
                        f"{r['peak_rss_mib']:,.0f} MiB  ({r['process_s']:.0f}s in all)",
                        flush=True,
                    )
        results.extend(combine(stage_runs[lib], args.quiet_threshold) for lib in args.libraries)

    table = build_table(results, data, args, info)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "table_markdown": table,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "info": info,
        "data": {k: v for k, v in data.items() if k not in ("sft", "pref")}
        | {
            "sft_tokens_per_example": data["sft"]["tokens_per_example"],
            "pref_tokens_per_example": data["pref"]["tokens_per_example"],
            # token-weighted mean sequence length (attention's cost per token grows with it)
            "t_eff": {
                "sft": sum(n * n for n in data["sft"]["lengths"]) / data["sft"]["total_tokens"],
                "pref": sum(n * n for p in data["pref"]["lengths"] for n in p) / data["pref"]["total_tokens"],
            },
        },
        "results": results,
        "runs": runs,
        "total_wall_s": time.perf_counter() - started,
        "workdir": str(work),
    }
    out = RESULTS / f"bench_vs_trl-{stamp}.json"
    out.write_text(json.dumps(payload, indent=1))
    (RESULTS / f"bench_vs_trl-{stamp}.md").write_text(table + "\n")
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(payload, indent=1))
    print(f"\nresults: {out} (total {payload['total_wall_s']:.0f}s)")
    if not args.workdir and not any("error" in r for r in results):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
