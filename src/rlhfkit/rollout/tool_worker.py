"""The process tool calls run in: started once, reused for every call, replaced when a call times out.

:func:`rlhfkit.rollout.tools.run_tool_call` runs a tool outside the training process so that a hanging tool
can be killed at its timeout (a thread cannot be). Starting a process per call costs ~15-30 ms (fork, and
waiting for the exit), more than decoding a tool turn on a small model; a :class:`ToolWorker` starts one
process for a tool set at its first call and serves every later call over a pipe, ~0.05-0.1 ms each. The
process is forked where the platform has ``fork`` (it inherits the tools; a call sends the tool's name), else
spawned (each call sends the function itself, pickled by reference: it must be importable by its module
name, and one that is not fails that call only):

- a tool that raises gives an ``"exception"`` answer and the worker serves on;
- a call that runs past its timeout kills the worker (SIGKILL, reaped at once): the call is a ``"timeout"``,
  and the next call starts a fresh worker; a tool that ends the worker itself (``os._exit``, a crash) is
  ``"crashed"``, and the next call starts a fresh one too;
- the result is cut to ``max_chars`` in the worker, so that a huge one never crosses the pipe;
- :meth:`ToolWorker.close`, garbage collection and interpreter exit end the worker (it is also a daemon
  process, and a worker whose parent died, even one busy in a hung tool, exits within a second): no
  orphan, no zombie.

State: the worker is forked at its first call (or at :meth:`ToolWorker.start`), so a tool sees the training
process as it was then, and what a tool keeps between calls (module globals, caches, open files) lasts until
the worker is replaced, as with tools called in-process (TRL's); it never reaches the training process.
A worker belongs to the process that started it: in a process forked from that one (a data-loader worker,
say), it starts a worker of its own and never touches the parent's.

:func:`shared_worker` keeps one worker for the most recent tool set (what ``run_tool_call`` uses by
default): a different tool set closes the previous worker, so a process holds at most one shared worker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ToolWorker", "as_text", "close_shared_worker", "shared_worker"]

_PARENT_CHECK_S = 1.0  # how often a worker checks that its parent is still alive
_CLOSE_WAIT_S = 2.0  # how long close() waits for an idle worker to exit before killing it


def as_text(value: Any) -> str:
    """A tool's return value as the tool turn's text: a string as is, else ``json.dumps``, else ``str``."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - an exception whose str() fails
        return type(exc).__name__


def _watch_parent(parent_pid: int) -> None:
    """In the worker, a thread's loop: end the worker once its parent has died (busy in a tool or idle), so
    that no worker lives on as an orphan whatever ended the training process."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_S)
    os._exit(0)


def _serve(connection: Any, functions: dict[str, Callable[..., Any]], parent_pid: int) -> None:
    """The worker's loop: for each ``(name or function, arguments, max_chars)`` received, call the tool and
    send back ``(None or "exception", text cut to max_chars, full length)``; ``None`` received or the pipe
    closed ends it."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's; it ends the worker
    except ValueError:  # not the main thread (cannot happen in a fresh process; harmless if it does)
        pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    while True:
        try:
            raw = connection.recv_bytes()
        except (EOFError, OSError):
            return
        max_chars = 2000
        try:
            request = pickle.loads(raw)  # spawned: the function comes by reference, and its import can fail
            if request is None:
                return
            tool, arguments, max_chars = request
            kind, text = None, as_text((functions[tool] if isinstance(tool, str) else tool)(**arguments))
        except BaseException as exc:  # noqa: BLE001 - any failure of user code is reported, never raised
            kind, text = "exception", _describe(exc)
        try:
            connection.send((kind, text[:max_chars], len(text)))
        except (OSError, ValueError):
            return


def _context(by_name: bool) -> Any:
    return multiprocessing.get_context("fork" if by_name else "spawn")


def _stop(process: Any, connection: Any, owner: int, graceful: bool) -> None:
    """End a worker and reap it: ask it to exit (``graceful``), kill it if it has not. A no-op in any
    process but its ``owner`` (a forked copy must not end, or wait for, its parent's child)."""
    if os.getpid() != owner:
        return
    try:
        if graceful and process.is_alive():
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
            process.join(_CLOSE_WAIT_S)
        if process.is_alive():
            process.kill()
        process.join()
    finally:
        connection.close()


class ToolWorker:
    """One process serving calls of a tool set (``{name: function}``) over a pipe; see the module docstring.

    ``call`` never raises for what a tool does; calls from several threads take turns. ``starts`` counts the
    processes started (one, plus one after each timeout or crash).
    """

    def __init__(self, functions: dict[str, Callable[..., Any]] | Iterable[tuple[str, Callable[..., Any]]]):
        self.functions = dict(functions)
        self.starts = 0
        self._by_name = "fork" in multiprocessing.get_all_start_methods()  # else: send the function per call
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._process: Any = None
        self._connection: Any = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """The worker process's id while one is running (for this process), else None."""
        self._adopt()
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def start(self) -> None:
        """Start the worker now if none is running (else the first call does); a process forked here is a copy
        of this one as it is now, so starting early (before loading a model) keeps the worker small."""
        self._adopt()
        with self._lock:
            self._ensure_running()

    def call(self, name: str, arguments: dict[str, Any], timeout_s: float,
             max_chars: int) -> tuple[str | None, str | None, int]:
        """``(kind, text, full length)`` of ``functions[name](**arguments)``: kind None (text: the result as text,
        cut to ``max_chars``), ``"exception"`` (text: ``TYPE: MESSAGE``), ``"timeout"`` (no text: the worker was
        killed after ``timeout_s``) or ``"crashed"`` (text: how the worker ended without answering)."""
        self._adopt()
        with self._lock:
            try:
                self._ensure_running()
            except Exception as exc:  # the process could not start
                return "exception", _describe(exc), 0
            process, connection = self._process, self._connection
            try:
                request = (name if self._by_name else self.functions.get(name, name), arguments, max_chars)
                try:
                    payload = pickle.dumps(request)
                except Exception as exc:  # spawned: a function that cannot be pickled (nothing was sent)
                    return "exception", _describe(exc), 0
                connection.send_bytes(payload)
                if not connection.poll(timeout_s):
                    self._release(graceful=False)
                    return "timeout", None, 0
                return connection.recv()
            except (EOFError, OSError):  # the worker ended mid-call: the tool exited it or crashed it
                self._release(graceful=False)
                return "crashed", f"the tool's process ended (exit code {process.exitcode}) before it answered", 0
            except BaseException:  # interrupted here (Ctrl-C): the worker's state is unknown, so it goes
                self._release(graceful=False)
                raise

    def close(self) -> None:
        """End the worker (the next call would start a fresh one). Idempotent."""
        self._adopt()
        with self._lock:
            self._release(graceful=True)

    def __enter__(self) -> ToolWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _adopt(self) -> None:
        """In a process forked from the owner: forget the owner's worker (not this process's child, and busy
        serving the owner) and its lock (possibly held at the fork by a thread this process does not have)."""
        if self._owner == os.getpid():
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        self._process = self._connection = self._finalizer = None
        self._owner, self._lock = os.getpid(), threading.Lock()

    def _ensure_running(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._release(graceful=False)  # a worker that died between calls: reap it
        context = _context(self._by_name)
        mine, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, self.functions if self._by_name else {},
                                                       os.getpid()), daemon=True, name="rlhfkit-tool-worker")
        try:
            process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker's end lives on in the worker only
        self._process, self._connection = process, mine
        self._finalizer = weakref.finalize(self, _stop, process, mine, os.getpid(), True)
        self.starts += 1

    def _release(self, graceful: bool) -> None:
        finalizer, self._finalizer = self._finalizer, None
        self._process = self._connection = None
        detached = finalizer.detach() if finalizer is not None else None
        if detached is not None:
            _stop(*detached[2][:3], graceful=graceful)


_SHARED: dict[str, Any] = {"key": None, "worker": None}


def shared_worker(tools: Iterable[tuple[str, Callable[..., Any]]]) -> ToolWorker:
    """The shared worker for a tool set (``(name, function)`` pairs): the same one while the set is the same
    functions, a new one (the previous one closed) when it changes."""
    pairs = list(tools)
    key = tuple((name, id(fn)) for name, fn in pairs)  # the worker holds the functions: their ids stay theirs
    worker = _SHARED["worker"]
    if worker is None or _SHARED["key"] != key:
        if worker is not None:
            worker.close()
        worker = ToolWorker(pairs)
        _SHARED.update(key=key, worker=worker)
    return worker


def close_shared_worker() -> None:
    """End the shared worker, if any (garbage collection and interpreter exit do too)."""
    worker = _SHARED["worker"]
    _SHARED.update(key=None, worker=None)
    if worker is not None:
        worker.close()
