"""Grading one answer on a 1-10 scale (MT-Bench style): the grade parser, the grading templates and graders.

A grader has ``grade(question_turns, answer_turns, turn, reference=None) -> (score, reply_text)``:
``question_turns`` are the user messages of one conversation, ``answer_turns`` the assistant's answers (at
least ``turn`` of them), ``turn`` the 1-based number of the answer being graded and ``reference`` (or None)
the reference answers per user message (reference-guided grading, for maths and reasoning). Turn 1 is graded
from the question and answer alone; a later turn shows the judge the whole conversation up to that answer
and asks it to grade only that one.

Three kinds of judge (:func:`build_grader`):

* ``openai[:MODEL]``: a chat judge writes an assessment ending in ``Rating: [[N]]``; :func:`parse_grade` reads
  the number. A reply without a readable grade raises :class:`UngradedReply` (a JudgeReplyError carrying the
  reply), which the caller counts; it is not asked again (a temperature-0 judge would answer the same).
* ``lm:PATH``: a local causal LM is not asked to write. The template is rendered with its chat template, the
  text ``Rating: [[`` is appended, and the grade is the expected value
  ``E[s] = Σ_s s · p(s)``, ``p(s) = exp(ℓ_s) / Σ_s' exp(ℓ_s')`` over s = 1..10, where ℓ_s is the log-prob of
  the option's full token sequence ``"s]]"`` (every token, the closing brackets included). Scoring whole
  sequences matters: "10" is often two tokens, and "1" is a prefix of "10", so the first token alone would
  give "1" the mass of "10"; with the closing ``]]`` the ten options are prefix-free.
* the scoring judges (``model:``, ``fn:``, ``http:``, ``gold:``): their raw score of the graded answer (the
  conversation up to it is the prompt), reported as is. It is not a 1-10 grade (``scale`` is None) and the
  reference is not shown to them.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .backends import LocalLMJudge, OpenAIJudge, SourceJudge
from .base import JudgeReplyError
from .templates import JudgeTemplate

__all__ = ["GRADING_TEMPLATES", "GradingTemplates", "LMGrader", "OpenAIGrader", "ScoreGrader", "UngradedReply",
           "build_grader", "parse_grade", "render_conversation", "render_references"]

_NUMBER = r"(-?\d+(?:\.\d+)?)"
# "[[7]]", "[[ 8.5 ]]", "[[7/10]]": MT-Bench's format, preferred wherever it appears (the last one wins)
_BRACKETS = re.compile(r"\[\[\s*" + _NUMBER + r"\s*(?:/\s*(\d+)\s*)?\]\]")
# "Rating: 9", "**Score:** 7/10", "Final grade - 8", "I would rate this 6 out of 10"
_LABELLED = re.compile(r"\b(?:rating|score|grade|rate[sd]?)\b[^\d\n]{0,40}?" + _NUMBER
                       + r"(?:\s*(?:/|out\s+of)\s*(\d+))?", re.IGNORECASE)
# "an 8/10", "7 out of 10" with no label
_OUT_OF = re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*(\d+)", re.IGNORECASE)
# a line that is only a number, maybe decorated: "7", "**8**", "(9)"
_BARE = re.compile(r"^[\s*_#>`'\"(\[]*" + _NUMBER + r"[\s*_`'\").\]]*$")


class UngradedReply(JudgeReplyError):
    """A judge reply with no readable grade; ``reply`` keeps the judge's text for the output files."""

    def __init__(self, message: str, reply: str = ""):
        super().__init__(message)
        self.reply = reply


def _snippet(text: str) -> str:
    return " ".join(str(text).split())[:80]


def _checked(value: str, denominator: str | None, scale: int, text: str) -> float:
    if denominator is not None and int(denominator) != scale:
        raise UngradedReply(f"reply grades out of {denominator}, not {scale}: {_snippet(text)!r}", str(text))
    grade = float(value)
    if not 1 <= grade <= scale:
        raise UngradedReply(f"reply's grade {value} is outside [1, {scale}]: {_snippet(text)!r}", str(text))
    return grade


def parse_grade(text: str, scale: int = 10) -> float:
    """The grade in a judge's reply, a number in [1, ``scale``]; raises :class:`UngradedReply` when none.

    The last ``[[N]]`` anywhere wins (the format the templates ask for). Without one, lines are read from the
    last up, and the first line with a grade gives it: a labelled number (``Rating: 9``, ``**Score:** 7/10``,
    ``I would rate this 6 out of 10``), else ``N/10`` or ``N out of 10``, else a line holding only a number. A
    grade outside [1, scale], or a labelled one out of another denominator (``Rating: 4/5``), is rejected
    rather than guessed at. (``backends.parse_score`` reads only a line starting ``Score: N``.)
    """
    text = str(text)
    brackets = list(_BRACKETS.finditer(text))
    if brackets:
        last = brackets[-1]
        return _checked(last.group(1), last.group(2), scale, text)
    for line in reversed([ln.strip() for ln in text.splitlines() if ln.strip()]):
        labelled = list(_LABELLED.finditer(line))
        if labelled:
            return _checked(labelled[-1].group(1), labelled[-1].group(2), scale, text)
        out_of = [m for m in _OUT_OF.finditer(line) if int(m.group(2)) == scale]
        if out_of:
            return _checked(out_of[-1].group(1), None, scale, text)
        bare = _BARE.match(line)
        if bare:
            return _checked(bare.group(1), None, scale, text)
    raise UngradedReply(f"reply has no grade (expected 'Rating: [[N]]'): {_snippet(text)!r}", text)


GRADING_TEMPLATES = {
    "single": "grade_single.txt",
    "reference": "grade_reference.txt",
    "single_multi": "grade_single_multi.txt",
    "reference_multi": "grade_reference_multi.txt",
}


@dataclass
class GradingTemplates:
    """The four grading templates: single-answer or reference-guided, for turn 1 or a later turn.

    Placeholders: turn 1 ``{question}``, ``{answer}`` (and ``{reference}``); later turns ``{conversation}``
    (every message up to the graded answer), ``{turn}`` (and ``{reference}``: the references so far).
    ``load(folder)`` takes user copies from a folder holding files of the shipped names (missing ones fall
    back to the shipped text).
    """

    single: JudgeTemplate
    reference: JudgeTemplate
    single_multi: JudgeTemplate
    reference_multi: JudgeTemplate

    @classmethod
    def load(cls, folder: str | Path | None = None) -> GradingTemplates:
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise ConfigError(f"grading templates: '{folder}' is not a folder (it should hold "
                              f"{', '.join(GRADING_TEMPLATES.values())})")
        parsed = {}
        for key, name in GRADING_TEMPLATES.items():
            own = Path(folder).expanduser() / name if folder is not None else None
            if own is not None and own.is_file():
                parsed[key] = JudgeTemplate.parse(own.read_text(encoding="utf-8"), source=str(own))
            else:
                text = (resources.files("rlhfkit") / "templates" / name).read_text(encoding="utf-8")
                parsed[key] = JudgeTemplate.parse(text, source=name)
        return cls(**parsed)

    def messages(self, question_turns: Sequence[str], answer_turns: Sequence[str], turn: int,
                 reference: Sequence[str | None] | None = None) -> tuple[JudgeTemplate, list[dict[str, str]]]:
        """The template for this turn and mode, and its chat messages filled in."""
        _check_turn(question_turns, answer_turns, turn)
        if turn == 1:
            template = self.reference if reference is not None else self.single
            values = {"question": str(question_turns[0]), "answer": str(answer_turns[0])}
            if reference is not None:
                values["reference"] = _reference_at(reference, 0)
        else:
            template = self.reference_multi if reference is not None else self.single_multi
            values = {"conversation": render_conversation(question_turns, answer_turns, turn), "turn": str(turn)}
            if reference is not None:
                values["reference"] = render_references(reference, turn)
        return template, template.messages(**values)


def _check_turn(question_turns: Sequence[str], answer_turns: Sequence[str], turn: int) -> None:
    if not 1 <= int(turn) <= len(question_turns) or len(answer_turns) < turn:
        raise ConfigError(f"cannot grade turn {turn}: {len(question_turns)} question(s), {len(answer_turns)} "
                          "answer(s)")


def _reference_at(reference: Sequence[str | None], index: int) -> str:
    value = reference[index] if index < len(reference) else None
    return "(no reference given)" if value is None or not str(value).strip() else str(value)


def render_conversation(question_turns: Sequence[str], answer_turns: Sequence[str], turn: int) -> str:
    """User messages and assistant replies 1..turn, each under a ``[User message i]`` / ``[Assistant reply
    i]`` header."""
    parts = []
    for i in range(turn):
        parts += [f"[User message {i + 1}]\n{question_turns[i]}", f"[Assistant reply {i + 1}]\n{answer_turns[i]}"]
    return "\n\n".join(parts)


def render_references(reference: Sequence[str | None], turn: int) -> str:
    """Reference answers 1..turn, each under a ``[Reference answer to user message i]`` header."""
    return "\n\n".join(f"[Reference answer to user message {i + 1}]\n{_reference_at(reference, i)}"
                       for i in range(turn))


class OpenAIGrader:
    """A chat judge (:class:`OpenAIJudge`, through its ``chat``) that writes ``Rating: [[N]]``."""

    def __init__(self, judge: OpenAIJudge, templates: GradingTemplates | None = None, scale: int = 10):
        self.judge, self.scale = judge, int(scale)
        self.templates = templates or GradingTemplates.load()
        self.name = judge.name

    def grade(self, question_turns: Sequence[str], answer_turns: Sequence[str], turn: int,
              reference: Sequence[str | None] | None = None) -> tuple[float, str]:
        _template, messages = self.templates.messages(question_turns, answer_turns, turn, reference)
        try:
            text = self.judge.chat(messages)
        except JudgeReplyError as exc:  # not chat-completions JSON: counted like a reply without a grade
            raise UngradedReply(str(exc), "") from None
        return parse_grade(text, self.scale), text


class LMGrader:
    """A local causal LM's expected grade: Σ s·p(s) over the options "1".."scale" (module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, templates: GradingTemplates | None = None,
                 scale: int = 10, closing: str = "]]", name: str = "lm"):
        self.model, self.tokenizer, self.scale, self.closing, self.name = model, tokenizer, int(scale), closing, name
        self.templates = templates or GradingTemplates.load()
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    def render(self, question_turns: Sequence[str], answer_turns: Sequence[str], turn: int,
               reference: Sequence[str | None] | None = None) -> str:
        """The text the model continues: the template in its chat template, then the verdict ``Rating: [[``."""
        template, messages = self.templates.messages(question_turns, answer_turns, turn, reference)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant: "
        return text + template.verdict

    def context_ids(self, text: str) -> list[int]:
        special = not getattr(self.tokenizer, "chat_template", None)  # a chat template writes its own BOS
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def option_ids(self, text: str, context: list[int]) -> list[list[int]]:
        """Token ids of each option ``"s]]"`` after ``context``: as tokenised in context when the context's
        tokens stay a prefix, else the option tokenised alone (the boundary is found by tokens)."""
        special = not getattr(self.tokenizer, "chat_template", None)
        out = []
        for s in range(1, self.scale + 1):
            option = f"{s}{self.closing}"
            full = list(self.tokenizer(text + option, add_special_tokens=special).input_ids)
            if len(full) > len(context) and full[:len(context)] == context:
                out.append(full[len(context):])
            else:
                out.append(list(self.tokenizer(option, add_special_tokens=False).input_ids))
        return out

    def option_logprobs(self, text: str) -> list[float]:
        """ℓ_s = Σ_j log p(token_j of option s | context, earlier tokens of s), for s = 1..scale: one
        forward over the context (kept in a KV cache) and one batched forward over the ten options."""
        from transformers import DynamicCache

        from ..rollout.generate import cache_keyword

        context = self.context_ids(text)
        options = self.option_ids(text, context)
        width = max(len(o) for o in options)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(context) + width > limit:
            context = context[-(limit - width):]
        n = len(options)
        with self._lock, torch.no_grad():
            cache = DynamicCache(config=getattr(self.model, "config", None))
            with_cache = {cache_keyword(self.model): cache, "use_cache": True}
            first = self.model(input_ids=torch.tensor([context], device=self.device), **with_cache).logits[0, -1]
            first = torch.log_softmax(first.float(), -1)
            totals = [float(first[o[0]]) for o in options]
            if width > 1:  # the options' later tokens, right-padded (causal: padding never reaches real tokens)
                cache.batch_repeat_interleave(n)
                ids = torch.tensor([o + [o[-1]] * (width - len(o)) for o in options], device=self.device)
                positions = torch.arange(len(context), len(context) + width, device=self.device).expand(n, width)
                logits = self.model(input_ids=ids, position_ids=positions, **with_cache).logits
                logp = torch.log_softmax(logits.float(), -1)
                for i, o in enumerate(options):
                    totals[i] += sum(float(logp[i, j - 1, o[j]]) for j in range(1, len(o)))
        return totals

    def grade(self, question_turns: Sequence[str], answer_turns: Sequence[str], turn: int,
              reference: Sequence[str | None] | None = None) -> tuple[float, str]:
        logps = self.option_logprobs(self.render(question_turns, answer_turns, turn, reference))
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
        total = sum(weights)
        probs = [w / total for w in weights]
        expected = sum((s + 1) * p for s, p in enumerate(probs))
        return expected, "p(grade): " + " ".join(f"{s + 1}:{p:.3f}" for s, p in enumerate(probs))


class ScoreGrader:
    """A scoring judge (reward model, gold judge, function, reward server): its raw score, not a 1-10 grade.

    The prompt is the first question as text (turn 1) or the conversation up to the graded answer as chat
    messages (later turns); references are not shown to it."""

    scale = None

    def __init__(self, judge: SourceJudge):
        self.judge, self.name = judge, judge.name

    def grade(self, question_turns: Sequence[str], answer_turns: Sequence[str], turn: int,
              reference: Sequence[str | None] | None = None) -> tuple[float, str]:
        _check_turn(question_turns, answer_turns, turn)
        if turn == 1:
            prompt: Any = str(question_turns[0])
        else:
            prompt = []
            for i in range(turn - 1):
                prompt += [{"role": "user", "content": str(question_turns[i])},
                           {"role": "assistant", "content": str(answer_turns[i])}]
            prompt.append({"role": "user", "content": str(question_turns[turn - 1])})
        score = float(self.judge.score(prompt, str(answer_turns[turn - 1])))
        if not math.isfinite(score):
            raise UngradedReply(f"judge '{self.name}' returned a non-finite score {score}", "")
        return score, ""


def build_grader(spec: str, *, templates: GradingTemplates | None = None, device: str = "cpu",
                 base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, rate: float = 0.0, max_tokens: int = 1024) -> Any:
    """A grader from a judge spec: ``openai[:MODEL]`` -> :class:`OpenAIGrader`, ``lm:PATH`` ->
    :class:`LMGrader`, a scoring spec (``model:``, ``fn:``, ``http:``, ``gold:``) -> :class:`ScoreGrader`."""
    from .spec import build_judge

    text = str(spec).strip()
    if text.lower().startswith("pairfn:"):
        raise ConfigError(f"judge '{text}': a pairwise function cannot grade one answer; use openai[:MODEL], "
                          "lm:PATH or a scoring judge (model:, fn:, http:, gold:)")
    judge = build_judge(text, base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                        rate=rate, device=device, **({"max_tokens": max_tokens}
                                                     if text.lower().startswith("openai") else {}))
    templates = templates or GradingTemplates.load()
    if isinstance(judge, OpenAIJudge):
        return OpenAIGrader(judge, templates)
    if isinstance(judge, LocalLMJudge):
        return LMGrader(judge.model, judge.tokenizer, templates, name=judge.name)
    if isinstance(judge, SourceJudge):
        return ScoreGrader(judge)
    raise ConfigError(f"judge '{text}' ({type(judge).__name__}) cannot grade one answer")
