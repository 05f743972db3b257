"""Tools a policy can call during a rollout: loading them, offering them in the prompt, parsing and running calls.

This is the tool layer of multi-turn RL (issue 24); the decode loop uses it to stop at a call
(:func:`call_closed`), read it (:func:`parse_tool_call`), run it (:func:`run_tool_call`) and append the
tool turn (:func:`continuation_text`) before decoding on in the same KV cache.

- A tool is a plain Python function with type hints and a Google-style docstring (``--tools
  file.py:fn1,fn2``); ``transformers.utils.get_json_schema`` turns it into the JSON schema chat templates
  take as ``tools=``.
- Calls use the Hermes/Qwen format the common templates teach: ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``. A malformed call is a :class:`ToolCallError`, never an exception: the model is told
  what was wrong in the tool turn, and the metrics count it.
- A call runs in a worker process (:mod:`rlhfkit.rollout.tool_worker`: started at the first call, ``fork``
  where the platform has it, else ``spawn``, which needs a tool importable by its module name; reused by
  later calls) so that a hanging tool can be killed at its timeout, which a thread cannot be; a timeout
  replaces the worker. What a tool keeps between calls lasts in the worker, as with in-process tools.
  Exceptions, timeouts, crashes, huge results and malformed calls all become a :class:`ToolResult` text.
- Templates that render ``tools`` get them natively; others get the same schemas and the call format in a
  system message (:func:`render_with_tools`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import get_json_schema

from ..errors import ConfigError, ModelError
from ..models.tiny import DEFAULT_CHAT_TEMPLATE
from .tool_worker import ToolWorker, shared_worker
from .user_code import load_functions

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "ERROR_KINDS",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolResult",
    "ToolStats",
    "call_closed",
    "continuation_text",
    "load_tools",
    "parse_tool_call",
    "render_with_tools",
    "run_tool_call",
    "tool_message",
]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ERROR_KINDS = ("malformed", "exception", "timeout", "truncated")  # a ToolResult's ``error``, when not None

# JSON schema types (as get_json_schema writes them) -> the Python values json.loads gives for them
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,), "array": (list,), "object": (dict,),
                                            "null": (type(None),)}


@dataclass(frozen=True)
class Tool:
    """A function the policy may call, with the JSON schema the prompt shows for it."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters", ...}}


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: a known tool and arguments that fit its schema; ``span`` = [start, end) of the
    ``<tool_call>...</tool_call>`` text it was read from."""

    name: str
    arguments: dict[str, Any]
    span: tuple[int, int]


@dataclass(frozen=True)
class ToolCallError:
    """A call the model tried to make but got wrong; ``message`` says what, for the tool turn. ``name`` is
    the tool it named, when it named one."""

    message: str
    span: tuple[int, int]
    name: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: the text of the tool turn, the error kind (one of ERROR_KINDS) or None, and the
    wall-clock seconds it took (the worker's start included, when the call started one)."""

    text: str
    error: str | None
    seconds: float


# ---------------------------------------------------------------------------------------------- loading


def _tool_from_function(fn: Callable[..., Any], where: str) -> Tool:
    try:
        schema = get_json_schema(fn)
    except Exception as exc:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ConfigError(f"{where}: {' '.join(str(exc).split())} (a tool needs a type hint for each "
                          "parameter and a Google-style docstring with an 'Args:' line for each)") from None
    return Tool(name=schema["function"]["name"], function=fn, schema=schema)


def load_tools(spec: str | Sequence[str]) -> list[Tool]:
    """The tools of ``path/to/file.py:fn1,fn2`` or ``package.module:fn1,fn2`` (or of several such specs),
    in order; a function without the hints or docstring its schema needs, a missing file or function and
    two tools of the same name are one-line ConfigErrors."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    tools: list[Tool] = []
    for one in specs:
        source = one.strip().rpartition(":")[0]
        for attribute, fn in load_functions(one, "tool", many=True):
            tool = _tool_from_function(fn, f"tool '{attribute}' in '{source}'")
            if any(t.name == tool.name for t in tools):
                raise ConfigError(f"tool '{attribute}' in '{source}': a tool named '{tool.name}' is already "
                                  "loaded; tool names must be unique")
            tools.append(tool)
    return tools


# ---------------------------------------------------------------------------------------------- parsing


def call_closed(text: str) -> bool:
    """Whether ``text`` holds a complete call (``</tool_call>`` after ``<tool_call>``): the decode loop's
    stop condition, so that the tool runs before the model writes anything after its call."""
    start = text.find(CALL_OPEN)
    return start >= 0 and text.find(CALL_CLOSE, start + len(CALL_OPEN)) >= 0


def _type_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    """Why ``value`` does not fit a parameter's schema (its JSON type, or its ``enum``), or None."""
    wanted = schema.get("type")
    if wanted is not None:
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        if schema.get("nullable"):
            names.append("null")
        types = tuple(t for n in names for t in _JSON_TYPES.get(n, (object,)))
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and "boolean" not in names and object not in types):
            return f"should be {' or '.join(names)}, not {json.dumps(value)[:40]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"should be one of {json.dumps(schema['enum'])}, not {json.dumps(value)[:40]}"
    return None


def _argument_problem(arguments: dict[str, Any], tool: Tool) -> str | None:
    parameters = tool.schema["function"].get("parameters", {})
    properties = parameters.get("properties", {})
    missing = [p for p in parameters.get("required", []) if p not in arguments]
    if missing:
        return f"tool '{tool.name}' is missing the required argument(s): {', '.join(missing)}"
    unknown = [a for a in arguments if a not in properties]
    if unknown:
        return (f"tool '{tool.name}' has no argument(s) {', '.join(unknown)} (it takes: "
                f"{', '.join(properties) or 'none'})")
    for name, value in arguments.items():
        problem = _type_problem(value, properties[name])
        if problem:
            return f"tool '{tool.name}': argument '{name}' {problem}"
    return None


def parse_tool_call(text: str, tools: Sequence[Tool]) -> ToolCall | ToolCallError | None:
    """The first call in ``text``: None when there is none, a ToolCallError when it is malformed (unclosed,
    bad JSON, not an object, no name, an unknown tool, arguments that miss a required parameter, name an
    unknown one or have the wrong JSON type). ``arguments`` may be omitted (no arguments) or a JSON string
    of an object (OpenAI's convention)."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    body_start = start + len(CALL_OPEN)
    close = text.find(CALL_CLOSE, body_start)
    if close < 0:
        return ToolCallError(f"the call has no closing {CALL_CLOSE}", (start, len(text)))
    span = (start, close + len(CALL_CLOSE))
    body = text[body_start:close].strip()
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCallError(f"the call is not valid JSON ({exc.msg} at character {exc.pos})", span)
    if not isinstance(payload, dict):
        return ToolCallError(f"the call is a JSON {type(payload).__name__}, not an object with 'name' and "
                             "'arguments'", span)
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError("the call has no 'name' (a string naming the tool)", span)
    by_name = {t.name: t for t in tools}
    if name not in by_name:
        return ToolCallError(f"there is no tool '{name}' (tools: {', '.join(by_name) or 'none'})", span, name)
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # reported below as not an object
    if not isinstance(arguments, dict):
        return ToolCallError(f"tool '{name}': 'arguments' must be a JSON object", span, name)
    problem = _argument_problem(arguments, by_name[name])
    if problem:
        return ToolCallError(problem, span, name)
    return ToolCall(name, arguments, span)


# ---------------------------------------------------------------------------------------------- running


def run_tool_call(call: ToolCall | ToolCallError, tools: Sequence[Tool], timeout_s: float,
                  max_chars: int, worker: ToolWorker | None = None) -> ToolResult:
    """Run ``call`` in a worker process, killed after ``timeout_s``; never raises.

    ``worker``: the :class:`~rlhfkit.rollout.tool_worker.ToolWorker` of ``tools`` to run it in; by default
    the process's shared worker for ``tools`` (:func:`~rlhfkit.rollout.tool_worker.shared_worker`).
    The text is the tool's return value (a string as is, else ``json.dumps`` of it, else ``str``); an
    exception gives "tool 'NAME' raised TYPE: MESSAGE" (error "exception", as does a tool that ends its
    process), a timeout error "timeout", a malformed call its ToolCallError's message (error "malformed").
    A text longer than ``max_chars`` keeps its first ``max_chars`` characters plus a line saying how many
    were cut (error "truncated", unless the call already failed otherwise).
    """
    started = time.monotonic()
    if isinstance(call, ToolCallError):
        return ToolResult(f"malformed tool call: {call.message}", "malformed", time.monotonic() - started)
    tool = next((t for t in tools if t.name == call.name), None)
    if tool is None:  # a ToolCall parsed against other tools
        names = ", ".join(t.name for t in tools) or "none"
        return ToolResult(f"malformed tool call: there is no tool '{call.name}' (tools: {names})", "malformed",
                          time.monotonic() - started)
    if worker is None:
        worker = shared_worker((t.name, t.function) for t in tools)
    kind, text, length = worker.call(call.name, call.arguments, timeout_s, max_chars)
    if kind == "timeout":
        text = f"tool '{tool.name}' timed out after {timeout_s:g} s"
    elif kind == "exception":
        text = f"tool '{tool.name}' raised {text}"
    elif kind == "crashed":
        kind, text = "exception", f"tool '{tool.name}' crashed: {text}"
    if length > max_chars:
        text += f"\n[... {length - max_chars} more characters cut: the result had {length}]"
        kind = kind or "truncated"
    return ToolResult(text, kind, time.monotonic() - started)


@dataclass
class ToolStats:
    """Counts of tool calls, their errors by kind and the seconds spent in tools, for the metrics."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    seconds: float = 0.0

    def record(self, result: ToolResult) -> None:
        self.calls += 1
        self.seconds += result.seconds
        if result.error is not None:
            self.errors[result.error] = self.errors.get(result.error, 0) + 1

    def as_dict(self) -> dict[str, float]:
        """``tools/calls``, ``tools/errors`` (all kinds), ``tools/errors/<kind>`` and ``tools/seconds``."""
        return {"tools/calls": self.calls, "tools/errors": sum(self.errors.values()),
                **{f"tools/errors/{kind}": n for kind, n in self.errors.items()}, "tools/seconds": self.seconds}


# ---------------------------------------------------------------------------------------------- prompting


def tool_message(call: ToolCall | ToolCallError, result: ToolResult) -> dict[str, Any]:
    """The tool turn for a call's result, as chat templates take it."""
    return {"role": "tool", "name": call.name or "", "content": result.text}


def _fallback_prompt(schemas: Sequence[dict[str, Any]]) -> str:
    """The tools and the call format in words, close to Qwen's own system text, for templates without tools."""
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one of these functions to help answer. Their JSON schemas:\n"
            f"<tools>\n{listed}\n</tools>\n\nTo call one, write its name and arguments as a JSON object inside "
            f"{CALL_OPEN}{CALL_CLOSE} tags and stop; the result comes back in the next turn:\n"
            f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}')


def _with_fallback_prompt(messages: Sequence[Mapping[str, Any]],
                          schemas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template without tools: the tool prompt merged into the system message (or
    prepended as one), and tool turns as user turns in ``<tool_response>`` tags (Hermes' convention), since
    such templates often know only the system, user and assistant roles."""
    prompt = _fallback_prompt(schemas)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return [{"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
            if m.get("role") == "tool" else m for m in out]


def _apply_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                    schemas: Sequence[dict[str, Any]] | None = None) -> str:
    # a tokenizer without a template of its own gets rlhfkit's default, as everywhere else in rlhfkit
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(list(messages), tools=schemas, tokenize=False, chat_template=template,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors: a conversation the template refuses
        raise ModelError(f"chat template failed: {' '.join(str(exc).split())}") from None
    if not isinstance(text, str):
        raise ModelError("chat template did not return text")
    return text


def _renders_tools(tokenizer: Any, messages: Sequence[Mapping[str, Any]], schemas: Sequence[dict[str, Any]]) -> bool:
    """Whether the template shows ``tools=`` itself: its text changes with them and names every tool (a
    template that ignores ``tools`` renders the same text without them)."""
    with_tools = _apply_template(tokenizer, messages, True, schemas)
    return (with_tools != _apply_template(tokenizer, messages, True)
            and all(s["function"]["name"] in with_tools for s in schemas))


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], schemas: Sequence[dict[str, Any]], native: bool,
            add_generation_prompt: bool) -> str:
    if native or not schemas:
        return _apply_template(tokenizer, messages, add_generation_prompt, schemas or None)
    return _apply_template(tokenizer, _with_fallback_prompt(messages, schemas), add_generation_prompt)


def render_with_tools(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool],
                      add_generation_prompt: bool = True) -> str:
    """The conversation as text with the tools offered: through the template's own ``tools=`` when it
    renders them (the format the model was tuned on), else in a system message that lists the schemas and
    explains the ``<tool_call>`` format (merged into the conversation's system message when it has one)."""
    schemas = [t.schema for t in tools]
    native = bool(schemas) and _renders_tools(tokenizer, messages, schemas)
    return _render(tokenizer, messages, schemas, native, add_generation_prompt)


def continuation_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tool_msg: Mapping[str, Any],
                      tools: Sequence[Tool]) -> str:
    """What the rollout appends after the model's call so that decoding continues in the same KV cache.

    ``messages`` ends with the model's call turn (an assistant message whose content is the text it wrote,
    up to ``</tool_call>``). The result is everything the re-rendered conversation has after that text:
    the end of the assistant turn (the model stopped at the call, so it has not written it), the tool
    turn and the next assistant generation prompt. It holds that
    ``render(messages + [tool_msg]) == render(messages[:-1]) + messages[-1]["content"] + continuation``
    (renders with the generation prompt); a template that renders earlier turns differently once later
    ones follow breaks this and is a ModelError naming the problem.
    """
    if not messages or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise ModelError("continuation_text: the conversation must end with the model's call turn (an assistant "
                         "message with text content)")
    schemas = [t.schema for t in tools]
    native = bool(schemas) and _renders_tools(tokenizer, messages, schemas)
    prompt = _render(tokenizer, messages[:-1], schemas, native, True)
    written = prompt + messages[-1]["content"]
    full = _render(tokenizer, [*messages, dict(tool_msg)], schemas, native, True)
    if not full.startswith(written):
        raise ModelError("chat template is not prefix-stable for tool turns: the conversation rendered with the "
                         "tool turn does not start with the prompt plus the model's call as written (the template "
                         "re-renders earlier turns, e.g. it strips or reformats the assistant's text); "
                         "a tool turn cannot continue the same KV cache with it")
    return full[len(written):]
