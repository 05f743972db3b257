"""Judge backends: a local causal LM (option-token log-probs), an OpenAI-compatible chat endpoint, a reward
source (reward model, the demo world's gold judge, a scoring function or server) and a pairwise function."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError, RlhfkitError
from ..rollout.rewards import ModelReward, ScoringBatch, post_with_retries
from .base import JudgeReplyError, PairwiseJudge, ScoringJudge
from .templates import JudgeTemplate, load_template, prompt_text, response_text

logger = logging.getLogger("rlhfkit")

__all__ = [
    "BASE_URL_ENVS",
    "API_KEY_ENVS",
    "FunctionJudge",
    "LocalLMJudge",
    "OpenAIJudge",
    "RateLimiter",
    "SourceJudge",
    "parse_score",
    "parse_verdict",
]

BASE_URL_ENVS = ("RLHFKIT_JUDGE_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENVS = ("RLHFKIT_JUDGE_API_KEY", "OPENAI_API_KEY")
MODEL_ENV = "RLHFKIT_JUDGE_MODEL"

# A verdict line: "Verdict: A", "**Final answer:** (B)", "Better response: Response A", "Winner - tie", ...
_VERDICT_LINE = re.compile(
    r"^\W*(?:final\s+)?(?:verdict|answer|preferred(?:\s+response)?|preference|winner|better(?:\s+response)?|"
    r"choice)\W*(?:is\W*)?(?:response\s+|option\s+)?\W*(A|B|tie|equal)\b", re.IGNORECASE)
_BARE_LINE = re.compile(r"^\W*(?:response\s+|option\s+)?(A|B)\W*$", re.IGNORECASE)
_SCORE_LINE = re.compile(r"^\W*(?:final\s+)?(?:score|rating)\W*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_verdict(text: str) -> float:
    """P(first slot better) from a reply: the LAST line naming a verdict (a rationale may come before it).

    ``A`` -> 1.0, ``B`` -> 0.0, ``tie``/``equal`` -> 0.5. Raises JudgeReplyError when no line names one.
    """
    for line in reversed([ln.strip() for ln in str(text).splitlines() if ln.strip()]):
        m = _VERDICT_LINE.match(line) or _BARE_LINE.match(line)
        if m:
            choice = m.group(1).upper()
            return 1.0 if choice == "A" else 0.0 if choice == "B" else 0.5
    snippet = " ".join(str(text).split())[:80]
    raise JudgeReplyError(f"reply names neither option (no 'Verdict: A' or 'Verdict: B' line): {snippet!r}")


def parse_score(text: str) -> float:
    """The number on the last ``Score: N`` line of a reply."""
    for line in reversed([ln.strip() for ln in str(text).splitlines() if ln.strip()]):
        m = _SCORE_LINE.match(line)
        if m:
            return float(m.group(1))
    snippet = " ".join(str(text).split())[:80]
    raise JudgeReplyError(f"reply has no 'Score: N' line: {snippet!r}")


class RateLimiter:
    """At most ``rate`` calls of ``acquire()`` per second across threads (evenly spaced); 0 = unlimited."""

    def __init__(self, rate: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate < 0:
            raise ConfigError(f"rate limit must be >= 0 requests/s, not {rate}")
        self.interval = 1.0 / rate if rate else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class LocalLMJudge(PairwiseJudge):
    """A local transformers causal LM: P(first better) = softmax over the next-token logits of the option
    tokens (" A", " B") after the template rendered with the model's chat template plus the verdict prefix.
    """

    def __init__(self, model: str | torch.nn.Module, tokenizer=None, template: JudgeTemplate | str | None = None,
                 principles: str = "", device: str | torch.device = "cpu", options: tuple[str, str] = (" A", " B")):
        from ..models import load_causal_lm, load_tokenizer

        if isinstance(model, torch.nn.Module):
            self.name = f"lm:{getattr(getattr(model, 'config', None), '_name_or_path', '') or type(model).__name__}"
            if tokenizer is None:
                raise ConfigError("LocalLMJudge: give the tokenizer of an already loaded model")
        else:
            self.name = f"lm:{model}"
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model))
            model = load_causal_lm(str(model))
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.template = template if isinstance(template, JudgeTemplate) else load_template(template, "pairwise")
        self.principles = principles
        self.option_ids = [self._option_id(o) for o in options]
        if self.option_ids[0] == self.option_ids[1]:
            raise ConfigError(f"{self.name}: options {options!r} start with the same token")
        self._lock = threading.Lock()

    def _option_id(self, option: str) -> int:
        base = self.tokenizer(self.template.verdict, add_special_tokens=False).input_ids
        full = self.tokenizer(self.template.verdict + option, add_special_tokens=False).input_ids
        if len(full) <= len(base) or full[:len(base)] != base:
            full = self.tokenizer(option, add_special_tokens=False).input_ids
            base = []
        return int(full[len(base)])

    def render(self, prompt: Any, first: Any, second: Any) -> str:
        messages = self.template.messages(prompt=prompt_text(prompt), response_a=response_text(first),
                                          response_b=response_text(second), principles=self.principles)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant: "
        return text + self.template.verdict

    def option_logprobs(self, prompt: Any, first: Any, second: Any) -> tuple[float, float]:
        """Log-probabilities of the two option tokens as the next token (over the whole vocabulary)."""
        text = self.render(prompt, first, second)
        ids = self.tokenizer(text, add_special_tokens=not getattr(self.tokenizer, "chat_template", None)).input_ids
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) > limit:
            ids = ids[-limit:]
        with self._lock, torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        return float(logp[self.option_ids[0]]), float(logp[self.option_ids[1]])

    def compare_once(self, prompt: Any, first: Any, second: Any) -> tuple[float, str]:
        lp_a, lp_b = self.option_logprobs(prompt, first, second)
        return 1.0 / (1.0 + math.exp(lp_b - lp_a)), ""


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class OpenAIJudge(ScoringJudge):
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, ...).

    The base URL and key come from the arguments or from ``$RLHFKIT_JUDGE_BASE_URL`` / ``$OPENAI_BASE_URL``
    and ``$RLHFKIT_JUDGE_API_KEY`` / ``$OPENAI_API_KEY``. HTTP failures (connection errors, timeouts, 429
    with Retry-After, 5xx) are retried with back-off by the same policy as the HTTP reward source (giving
    up raises RlhfkitError). A reply that is not chat-completions JSON, or names neither option, is asked
    again up to ``reply_retries`` times, then raises JudgeReplyError (the labeller records the row as
    unlabelled). Pairwise verdicts come from the reply's last ``Verdict: A|B`` line; scores from ``Score: N``.
    """

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 template: JudgeTemplate | str | None = None, score_template: JudgeTemplate | str | None = None,
                 principles: str = "", timeout: float = 60.0, max_retries: int = 3, reply_retries: int = 2,
                 backoff: float = 0.5, rate: float = 0.0, temperature: float = 0.0, max_tokens: int = 512,
                 sleep: Callable[[float], None] = time.sleep):
        base_url = base_url or _env(BASE_URL_ENVS)
        if not base_url:
            raise ConfigError(f"OpenAI-compatible judge: give a base URL (--base-url or ${BASE_URL_ENVS[0]})")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge base URL '{base_url}' must start with http:// or https://")
        if timeout <= 0 or max_retries < 0 or reply_retries < 0:
            raise ConfigError("judge: need timeout > 0, max_retries >= 0 and reply_retries >= 0")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/chat/completions")
                                           else "/chat/completions")
        self.model = model or os.environ.get(MODEL_ENV) or "default"
        self.name = f"openai:{self.model}@{base_url}"
        self.template = template if isinstance(template, JudgeTemplate) else load_template(template, "pairwise")
        self.score_template = (score_template if isinstance(score_template, JudgeTemplate)
                               else load_template(score_template, "score"))
        self.principles = principles
        self.timeout, self.max_retries, self.reply_retries = float(timeout), int(max_retries), int(reply_retries)
        self.backoff, self.temperature, self.max_tokens = float(backoff), float(temperature), int(max_tokens)
        self.limiter = RateLimiter(rate)
        self._sleep = sleep
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = api_key or _env(API_KEY_ENVS)
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.malformed_replies = 0  # replies asked again because they could not be read
        self._count_lock = threading.Lock()

    def chat(self, messages: list[dict[str, str]]) -> str:
        """One chat completion (with HTTP retries); the reply text, or JudgeReplyError if not readable."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        raw = post_with_retries(self.url, body, self.headers, timeout=self.timeout, max_retries=self.max_retries,
                                backoff=self.backoff, sleep=self._sleep, who=f"judge endpoint {self.url}",
                                before_attempt=self.limiter.acquire)
        try:
            data = json.loads(raw)
        except ValueError:
            snippet = " ".join(raw.decode("utf-8", "replace").split())[:80]
            raise JudgeReplyError(f"reply is not JSON: {snippet!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeReplyError("reply has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise JudgeReplyError(f"choices[0].message.content is {type(content).__name__}, not text")
        return content

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], float]) -> tuple[float, str]:
        problem: JudgeReplyError | None = None
        for _attempt in range(self.reply_retries + 1):
            try:
                text = self.chat(messages)
                return parse(text), text
            except JudgeReplyError as exc:
                problem = exc
                with self._count_lock:
                    self.malformed_replies += 1
        assert problem is not None
        raise JudgeReplyError(f"judge endpoint {self.url}: {problem} (asked {self.reply_retries + 1} times)")

    def compare_once(self, prompt: Any, first: Any, second: Any) -> tuple[float, str]:
        messages = self.template.messages(prompt=prompt_text(prompt), response_a=response_text(first),
                                          response_b=response_text(second), principles=self.principles)
        return self._ask(messages, parse_verdict)

    def compare(self, prompt, a, b):  # pairwise in both orders (not from scores)
        return PairwiseJudge.compare(self, prompt, a, b)

    def score(self, prompt: Any, response: Any) -> float:
        messages = self.score_template.messages(prompt=prompt_text(prompt), response=response_text(response),
                                                principles=self.principles)
        return self._ask(messages, parse_score)[0]


class SourceJudge(ScoringJudge):
    """A reward source (``rlhfkit.rollout.rewards`` / ``rlhfkit.judges.spec.load_judge``) as a scoring judge:
    a reward model, the demo world's gold judge, a ``fn(prompts, responses)`` function or a reward server.
    Pairwise: ``sigmoid((score_a - score_b) / temperature)``.
    """

    def __init__(self, source: Any, temperature: float = 1.0, name: str | None = None):
        if temperature <= 0:
            raise ConfigError(f"judge temperature must be > 0, not {temperature}")
        self.source = source
        self.temperature = float(temperature)
        self.name = name or str(getattr(source, "name", type(source).__name__))
        self._lock = threading.Lock()
        if isinstance(source, ModelReward):
            source.retokenize = True  # it reads text: the judge has no policy token ids

    def _prompt(self, prompt: Any) -> Any:
        tok = getattr(self.source, "tokenizer", None) if isinstance(self.source, ModelReward) else None
        if tok is not None and getattr(tok, "chat_template", None):  # reward models saw chat-rendered prompts
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(self.source, ModelReward):
            return prompt_text(prompt)
        return prompt

    def score_many(self, prompts: list[Any], responses: list[Any]) -> list[float]:
        n = len(responses)
        batch = ScoringBatch(prompts=[self._prompt(p) for p in prompts],
                             responses=[response_text(r) for r in responses],
                             prompt_ids=[[] for _ in range(n)], response_ids=[[] for _ in range(n)],
                             ended=[True] * n, raw_prompts=list(prompts))  # a function's prompt= keyword
        with self._lock:  # models are not shared across threads concurrently
            scores = self.source.score(batch)
        if torch.is_tensor(scores):
            scores = scores.tolist()
        if len(scores) != n:
            raise RlhfkitError(f"judge '{self.name}' returned {len(scores)} scores for {n} responses")
        return [float(s) for s in scores]

    def score(self, prompt: Any, response: Any) -> float:
        return self.score_many([prompt], [response])[0]


class FunctionJudge(PairwiseJudge):
    """A Python function ``fn(prompt, first, second)`` returning P(first better) in [0, 1], or ``"A"``,
    ``"B"``, ``"tie"`` (or a reply text with a verdict line). ``None`` means no verdict (JudgeReplyError).
    """

    def __init__(self, fn: Callable[[Any, Any, Any], Any], name: str = "function"):
        if not callable(fn):
            raise ConfigError(f"judge function '{name}' is not callable")
        self.fn = fn
        self.name = name

    def compare_once(self, prompt: Any, first: Any, second: Any) -> tuple[float, str]:
        out = self.fn(prompt, first, second)
        if out is None:
            raise JudgeReplyError(f"judge function '{self.name}' gave no verdict")
        if isinstance(out, str):
            return parse_verdict(out), out
        if isinstance(out, bool):
            return float(out), ""
        return float(out), ""
