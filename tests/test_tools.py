"""The tool layer of multi-turn RL: loading tools, parsing calls, running them safely, and the tool turn's text."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
from toy import TOOLS_SOURCE as TOOLS_FILE

from rlhfkit.errors import ConfigError, ModelError
from rlhfkit.rollout.tools import (
    ToolCall,
    ToolCallError,
    ToolResult,
    ToolStats,
    call_closed,
    continuation_text,
    load_tools,
    parse_tool_call,
    render_with_tools,
    run_tool_call,
    tool_message,
)

# a template that shows `tools` in a system turn of its own (as Qwen's and Llama 3's do)
# (transformers renders templates with trim_blocks: a newline right after a tag goes, hence {{ '\\n' }})
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\n# Tools\n{% for tool in tools %}{{ tool['function']['name'] }}: "
    "{{ tool['function']['description'] }}\n{% endfor %}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_FILE)
    return path


@pytest.fixture
def tools(tools_file):
    return load_tools(f"{tools_file}:add,lookup,fail,hang,huge,odd")


@pytest.fixture
def tools_tokenizer(tiny_model_dir):
    """A fresh copy of the tiny tokenizer whose template renders tools natively."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------- loading


def test_schemas_come_from_type_hints_and_docstrings(tools):
    assert [t.name for t in tools] == ["add", "lookup", "fail", "hang", "huge", "odd"]
    assert tools[0].function(2, 3) == 5
    assert tools[0].schema == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "description": "The first number."},
            "b": {"type": "integer", "description": "The second number."}}, "required": ["a", "b"]},
        "return": {"type": "integer"}}}
    detail = tools[1].schema["function"]["parameters"]["properties"]["detail"]
    assert detail == {"type": "string", "enum": ["capital", "population"], "description": "What to return."}
    assert tools[1].schema["function"]["parameters"]["required"] == ["country"]


def test_tools_load_from_a_module_name_and_from_several_specs(tools_file, monkeypatch):
    monkeypatch.syspath_prepend(str(tools_file.parent))
    from_module = load_tools("my_tools:add")
    assert [t.name for t in from_module] == ["add"] and from_module[0].function(4, 5) == 9
    both = load_tools([f"{tools_file}:add", "my_tools:lookup"])
    assert [t.name for t in both] == ["add", "lookup"]


@pytest.mark.parametrize("spec, words", [
    ("{file}:add,missing_fn", ["my_tools.py", "missing_fn", "has no function"]),
    ("{file}:NOT_CALLABLE", ["my_tools.py", "NOT_CALLABLE", "not a function"]),
    ("{dir}/nope.py:add", ["nope.py", "does not exist"]),
    ("no_such_module_xyz:add", ["no_such_module_xyz", "cannot be imported"]),
    ("{file}", ["my_tools.py", "file.py:fn1,fn2"]),
    ("{file}:add,", ["my_tools.py", "file.py:fn1,fn2"]),
    ("{file}:no_hints", ["my_tools.py", "no_hints", "missing a type hint"]),
    ("{file}:no_docstring", ["my_tools.py", "no_docstring", "no docstring"]),
    ("{file}:add,lookup,add", ["my_tools.py", "'add'", "already loaded"]),
])
def test_bad_tool_specs_are_one_line_config_errors(tools_file, spec, words):
    with pytest.raises(ConfigError) as info:
        load_tools(spec.format(file=tools_file, dir=tools_file.parent))
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_same_tool_name_from_two_files_is_refused(tools_file, tmp_path):
    other = tmp_path / "other.py"
    other.write_text(TOOLS_FILE)
    with pytest.raises(ConfigError, match=r"tool 'add' in '.*other.py': a tool named 'add' is already loaded"):
        load_tools([f"{tools_file}:add", f"{other}:add"])


# ---------------------------------------------------------------------------------------------- parsing


def test_a_good_call_is_parsed_with_its_span(tools):
    text = f"Let me add them. {CALL} trailing"
    call = parse_tool_call(text, tools)
    start = text.index("<tool_call>")
    assert call == ToolCall("add", {"a": 2, "b": 3}, (start, start + len(CALL)))
    assert text[slice(*call.span)] == CALL
    # arguments as a JSON string (OpenAI's convention) and omitted defaults are fine
    arguments_text = json.dumps({"name": "lookup", "arguments": json.dumps({"country": "Atlantis"})})
    as_string = parse_tool_call(f"<tool_call>{arguments_text}</tool_call>", tools)
    assert isinstance(as_string, ToolCall) and as_string.arguments == {"country": "Atlantis"}
    no_arguments = parse_tool_call('<tool_call>{"name": "huge"}</tool_call>', tools)
    assert isinstance(no_arguments, ToolCall) and no_arguments.arguments == {}


def test_text_without_a_call_is_none(tools):
    assert parse_tool_call("The answer is 5.", tools) is None
    assert parse_tool_call("", tools) is None


@pytest.mark.parametrize("body, words", [
    ('{"name": "add", "arguments": {"a": 2, "b": 3}', ["not valid JSON"]),
    ('["add", 2, 3]', ["JSON list", "not an object"]),
    ('{"arguments": {"a": 2}}', ["no 'name'"]),
    ('{"name": "multiply", "arguments": {"a": 2}}', ["no tool 'multiply'", "add, lookup"]),
    ('{"name": "add", "arguments": [2, 3]}', ["'arguments' must be a JSON object"]),
    ('{"name": "add", "arguments": {"a": 2}}', ["missing the required argument(s): b"]),
    ('{"name": "add", "arguments": {"a": 2, "b": 3, "c": 4}}', ["no argument(s) c", "it takes: a, b"]),
    ('{"name": "add", "arguments": {"a": "2", "b": 3}}', ["argument 'a' should be integer", '"2"']),
    ('{"name": "add", "arguments": {"a": true, "b": 3}}', ["argument 'a' should be integer", "true"]),
    ('{"name": "lookup", "arguments": {"country": "X", "detail": "flag"}}',
     ["argument 'detail' should be one of", "capital", '"flag"']),
])
def test_malformed_calls_say_what_is_wrong(tools, body, words):
    text = f"ok <tool_call>{body}</tool_call>"
    error = parse_tool_call(text, tools)
    assert isinstance(error, ToolCallError), error
    assert all(w in error.message for w in words), error.message
    assert error.span == (3, len(text))


def test_an_unclosed_call_is_malformed_and_not_closed(tools):
    text = 'x <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
    error = parse_tool_call(text, tools)
    assert isinstance(error, ToolCallError) and "no closing </tool_call>" in error.message
    assert not call_closed(text)
    assert call_closed(text + "</tool_call>")
    assert not call_closed("</tool_call> then <tool_call>")  # a close before the open does not end a call
    assert not call_closed("plain text")


# ---------------------------------------------------------------------------------------------- running


def _run(tools, body, timeout_s=5.0, max_chars=1000):
    return run_tool_call(parse_tool_call(f"<tool_call>{body}</tool_call>", tools), tools, timeout_s, max_chars)


def test_results_become_text(tools):
    added = _run(tools, '{"name": "add", "arguments": {"a": 2, "b": 3}}')
    assert (added.text, added.error) == ("5", None)
    looked_up = _run(tools, '{"name": "lookup", "arguments": {"country": "Atlantis"}}')
    assert (looked_up.text, looked_up.error) == ('{"country": "Atlantis", "capital": "Xanadu"}', None)
    assert _run(tools, '{"name": "odd", "arguments": {}}').text == "{1, 2}"  # a set: str(), not JSON


def test_a_raising_tool_gives_an_exception_result(tools):
    result = _run(tools, '{"name": "fail", "arguments": {"x": 7}}')
    assert (result.text, result.error) == ("tool 'fail' raised ValueError: bad x 7", "exception")


def test_a_hanging_tool_is_killed_at_its_timeout(tools, tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result = _run(tools, json.dumps({"name": "hang", "arguments": {"pid_file": str(pid_file)}}), timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert (result.text, result.error) == ("tool 'hang' timed out after 0.5 s", "timeout")
    assert 0.5 <= result.seconds <= elapsed < 2.0
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert multiprocessing.active_children() == []


def test_a_huge_result_is_cut_with_a_marker(tools):
    result = _run(tools, '{"name": "huge", "arguments": {}}', max_chars=1000)
    assert result.error == "truncated"
    assert result.text == "x" * 1000 + "\n[... 999000 more characters cut: the result had 1000000]"


def test_a_malformed_call_runs_nothing(tools):
    result = _run(tools, '{"name": "add", "arguments": {"a": 2}}')
    assert result.error == "malformed"
    assert result.text == "malformed tool call: tool 'add' is missing the required argument(s): b"


def test_stats_count_calls_errors_and_seconds():
    stats = ToolStats()
    for result in [ToolResult("5", None, 0.25), ToolResult("t", "timeout", 0.5), ToolResult("m", "malformed", 0.0),
                   ToolResult("t", "timeout", 0.5), ToolResult("x", "truncated", 0.25)]:
        stats.record(result)
    assert stats.as_dict() == {"tools/calls": 5, "tools/errors": 4, "tools/errors/malformed": 1,
                               "tools/errors/exception": 0, "tools/errors/timeout": 2,
                               "tools/errors/truncated": 1, "tools/seconds": 1.5}


def test_stats_of_real_calls(tools):
    stats = ToolStats()
    for body in ['{"name": "add", "arguments": {"a": 1, "b": 1}}', '{"name": "fail", "arguments": {"x": 1}}',
                 '{"name": "huge", "arguments": {}}', '{"name": "nope"}']:
        stats.record(_run(tools, body, max_chars=100))
    metrics = stats.as_dict()
    assert (metrics["tools/calls"], metrics["tools/errors"]) == (4, 3)
    assert (metrics["tools/errors/exception"], metrics["tools/errors/truncated"],
            metrics["tools/errors/malformed"]) == (1, 1, 1)
    assert metrics["tools/seconds"] > 0


# ---------------------------------------------------------------------------------------------- prompting


def test_a_template_with_tools_renders_them_itself(tools_tokenizer, tools):
    text = render_with_tools(tools_tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], tools[:2])
    assert text == ("<|bos|><|system|>\n# Tools\nadd: Add two integers.\nlookup: Look a country up in the atlas.\n"
                    "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")


def test_a_template_without_tools_gets_them_in_the_system_message(tiny_tokenizer, tools):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    text = render_with_tools(tiny_tokenizer, messages, tools)
    assert all(t.name in text for t in tools)
    assert text.count("<|system|>") == 1 and text.startswith("<|bos|><|system|>\nBe brief.\n\n# Tools")
    assert json.dumps(tools[0].schema) in text and "<tool_call>" in text
    assert text.endswith("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")
    alone = render_with_tools(tiny_tokenizer, messages[1:], tools)  # no system message: one is prepended
    assert alone.startswith("<|bos|><|system|>\n# Tools") and all(t.name in alone for t in tools)
    plain = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_with_tools(tiny_tokenizer, messages, []) == plain


@pytest.mark.parametrize("native, expected", [
    (True, "<|eos|><|tool|>\n5\n<|assistant|>\n"),
    (False, "<|eos|><|user|>\n<tool_response>\n5\n</tool_response>\n<|assistant|>\n"),
])
def test_continuation_is_the_exact_suffix(native, expected, tools_tokenizer, tiny_tokenizer, tools):
    tokenizer = tools_tokenizer if native else tiny_tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": f"Adding. {CALL}"}]
    call = parse_tool_call(messages[-1]["content"], tools)
    result = run_tool_call(call, tools, timeout_s=5.0, max_chars=100)
    tool_msg = tool_message(call, result)
    assert tool_msg == {"role": "tool", "name": "add", "content": "5"}
    continuation = continuation_text(tokenizer, messages, tool_msg, tools)
    assert continuation == expected
    prompt = render_with_tools(tokenizer, messages[:-1], tools)
    assert prompt + messages[-1]["content"] + continuation == render_with_tools(tokenizer, [*messages, tool_msg], tools)


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_model_dir, tools):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # keeps only the latest assistant turn's text (as templates that strip earlier reasoning do)
    tokenizer.chat_template = TOOLS_TEMPLATE.replace(
        "{{ message['content'] }}", "{% if message['role'] != 'assistant' or loop.last %}{{ message['content'] }}"
        "{% endif %}")
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": CALL}]
    with pytest.raises(ModelError, match="not prefix-stable for tool turns"):
        continuation_text(tokenizer, messages, {"role": "tool", "name": "add", "content": "5"}, tools)


# ---------------------------------------------------------------------------------------------- the worker process

WORKER_TOOLS = '''
import os
import time

COUNT = [0]


def whoami() -> int:
    """The id of the process the tool runs in."""
    return os.getpid()


def count() -> int:
    """How many times this tool ran in its process."""
    COUNT[0] += 1
    return COUNT[0]


def die(code: int) -> int:
    """End the process at once, as a crash would.

    Args:
        code: The exit code.
    """
    os._exit(code)


def nap(seconds: float) -> str:
    """Sleep a while.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "rested"
'''


@pytest.fixture
def worker_tools(tools, tmp_path):
    path = tmp_path / "worker_tools.py"
    path.write_text(WORKER_TOOLS)
    return [*tools, *load_tools(f"{path}:whoami,count,die,nap")]


def _gone(pid):
    """Whether process ``pid`` has ended and been reaped (a zombie left to an init that does not reap counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _children():
    """This process's live child processes (psutil's view when it is installed, else multiprocessing's)."""
    try:
        import psutil
    except ImportError:
        return multiprocessing.active_children()
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def test_calls_share_one_worker_and_cost_far_less_than_a_process_each(worker_tools):
    from rlhfkit.rollout.tool_worker import shared_worker

    first = _run(worker_tools, '{"name": "whoami"}')
    worker = shared_worker((t.name, t.function) for t in worker_tools)
    assert first.error is None and int(first.text) == worker.pid != os.getpid()
    started = time.perf_counter()
    results = [_run(worker_tools, '{"name": "whoami"}') for _ in range(50)]
    mean_ms = (time.perf_counter() - started) / 50 * 1000
    assert {r.text for r in results} == {first.text} and worker.starts == 1  # no process per call
    assert mean_ms < 5.0, f"{mean_ms:.2f} ms per call (a process per call took ~15-30 ms)"
    assert all(0 <= r.seconds < 1.0 for r in results)


def test_a_tool_keeps_its_state_between_calls_in_the_worker(worker_tools):
    assert [_run(worker_tools, '{"name": "count"}').text for _ in range(3)] == ["1", "2", "3"]
    assert _run(worker_tools, '{"name": "nap", "arguments": {"seconds": 30}}', timeout_s=0.3).error == "timeout"
    assert _run(worker_tools, '{"name": "count"}').text == "1"  # a fresh worker after the timeout
    from rlhfkit.rollout.tool_worker import shared_worker

    assert shared_worker((t.name, t.function) for t in worker_tools).starts == 2


def test_the_call_after_a_timeout_gets_a_fresh_worker_and_the_right_answer(worker_tools, tmp_path):
    before = int(_run(worker_tools, '{"name": "whoami"}').text)
    pid_file = tmp_path / "pid"
    hung = _run(worker_tools, json.dumps({"name": "hang", "arguments": {"pid_file": str(pid_file)}}), timeout_s=0.4)
    assert (hung.text, hung.error) == ("tool 'hang' timed out after 0.4 s", "timeout")
    assert int(pid_file.read_text()) == before and _gone(before)  # the worker it hung in: killed and reaped
    for a in range(3):
        added = _run(worker_tools, json.dumps({"name": "add", "arguments": {"a": a, "b": 10}}))
        assert (added.text, added.error) == (str(a + 10), None)
    after = int(_run(worker_tools, '{"name": "whoami"}').text)
    assert after != before and not _gone(after)


def test_the_call_after_an_exception_or_a_crash_works(worker_tools):
    pid = _run(worker_tools, '{"name": "whoami"}').text
    failed = _run(worker_tools, '{"name": "fail", "arguments": {"x": 3}}')
    assert (failed.text, failed.error) == ("tool 'fail' raised ValueError: bad x 3", "exception")
    assert _run(worker_tools, '{"name": "add", "arguments": {"a": 1, "b": 2}}').text == "3"
    assert _run(worker_tools, '{"name": "whoami"}').text == pid  # an exception does not cost the worker
    crashed = _run(worker_tools, '{"name": "die", "arguments": {"code": 3}}')
    assert crashed.error == "exception"
    assert crashed.text == "tool 'die' crashed: the tool's process ended (exit code 3) before it answered"
    assert _gone(int(pid))
    assert _run(worker_tools, '{"name": "add", "arguments": {"a": 4, "b": 2}}').text == "6"


def test_closing_leaves_no_child_process(worker_tools):
    from rlhfkit.rollout.tool_worker import ToolWorker, close_shared_worker

    shared = int(_run(worker_tools, '{"name": "whoami"}').text)
    own = ToolWorker((t.name, t.function) for t in worker_tools)
    with own:
        mine = int(run_tool_call(parse_tool_call('<tool_call>{"name": "whoami"}</tool_call>', worker_tools),
                                 worker_tools, 5.0, 100, worker=own).text)
        assert mine not in (shared, os.getpid()) and len(_children()) == 2
    assert _gone(mine) and own.pid is None
    close_shared_worker()
    assert _gone(shared) and _children() == [] and multiprocessing.active_children() == []
    close_shared_worker()  # idempotent


def test_a_worker_nobody_holds_is_ended_by_garbage_collection(worker_tools):
    import gc

    from rlhfkit.rollout.tool_worker import ToolWorker

    worker = ToolWorker((t.name, t.function) for t in worker_tools)
    kind, text, _ = worker.call("whoami", {}, 5.0, 100)
    assert kind is None
    del worker
    gc.collect()
    assert _gone(int(text))


def test_a_new_tool_set_closes_the_previous_shared_worker(worker_tools):
    first = int(_run(worker_tools, '{"name": "whoami"}').text)
    fewer = [t for t in worker_tools if t.name in ("whoami", "add")]
    second = int(_run(fewer, '{"name": "whoami"}').text)
    assert second != first and _gone(first) and len(_children()) == 1


def _call_in_forked_child(tools, connection):
    """In a forked child: the pid of the worker a call runs in there, then this process's own pid."""
    result = run_tool_call(parse_tool_call('<tool_call>{"name": "whoami"}</tool_call>', tools), tools, 5.0, 100)
    connection.send((int(result.text), os.getpid()))
    connection.close()


def test_a_worker_is_not_reused_by_a_process_forked_from_its_owner(worker_tools):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    parent_worker = int(_run(worker_tools, '{"name": "whoami"}').text)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_call_in_forked_child, args=(worker_tools, sender))
    child.start()
    sender.close()
    assert receiver.poll(10.0)
    child_worker, child_pid = receiver.recv()
    child.join(10.0)
    assert child.exitcode == 0
    assert child_worker not in (parent_worker, child_pid, os.getpid())  # the child started a worker of its own
    assert _gone(child_worker)  # and it ended with the child
    assert int(_run(worker_tools, '{"name": "whoami"}').text) == parent_worker  # the parent's is untouched


@pytest.mark.parametrize("ending", ["exit", "killed", "killed mid-call"])
def test_a_worker_does_not_outlive_its_process(ending):
    """Interpreter exit ends the worker; so does the process being killed, even while the worker is busy in a
    tool that hangs (the worker notices within ~1 s)."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, threading, time\n"
        "from rlhfkit.rollout.tool_worker import ToolWorker\n"
        "def nap(seconds):\n"
        "    time.sleep(seconds)\n"
        "worker = ToolWorker({'whoami': os.getpid, 'nap': nap})\n"
        "print(worker.call('whoami', {}, 5.0, 100)[1], flush=True)\n"
        "if sys.argv[1] == 'exit':\n"
        "    sys.exit(0)\n"
        "if sys.argv[1] == 'killed mid-call':\n"
        "    threading.Thread(target=worker.call, args=('nap', {'seconds': 120}, 300.0, 100), daemon=True).start()\n"
        "    time.sleep(0.3)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, ending], capture_output=True, text=True, timeout=60)
    worker_pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10.0
    while not _gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(worker_pid), done.stderr
