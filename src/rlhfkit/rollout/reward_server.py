"""``rlhfkit serve-rm``: a reward model behind the HTTP protocol that :class:`~rlhfkit.rollout.rewards.HTTPReward`
speaks, so ``rlhfkit ppo --reward-url http://HOST:PORT/score`` can score on another machine or GPU.

Protocol: ``POST /score`` with JSON ``{"prompts": [str, ...], "responses": [str, ...]}`` and optionally
``"ended": [bool, ...]`` (did each response end with EOS or a stop string; default true); the reply is
``{"scores": [float, ...]}`` in the same order. ``GET /health`` names the model, tokenizer and device.
Errors are JSON ``{"detail": "one line"}``: 400 (not JSON), 401 (bearer token), 413 (too many items or
bytes), 422 (wrong shape or types), 500 (the model failed).

Scoring goes through :class:`~rlhfkit.rollout.rewards.ModelReward` on its re-tokenising path (the request
carries text, not token ids): ``rm_tok(prompt)`` + ``rm_tok(response, add_special_tokens=False)`` + EOS
when the response ended, exactly what a local run with a policy of another tokenizer scores. Concurrent
requests are coalesced into forward batches of up to ``--batch-size`` sequences by one worker thread,
which alone touches the model.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request  # the `app` extra; this module is imported only by `serve-rm`
from fastapi.responses import JSONResponse, Response

from ..errors import ConfigError, OneLineParser, RlhfkitError
from .rewards import API_KEY_ENV, ModelReward, ScoringBatch

logger = logging.getLogger("rlhfkit")

__all__ = ["RequestError", "ScoreBatcher", "create_app", "load_served_reward", "main", "parse_score_request"]

DEFAULT_MAX_ITEMS = 4096
DEFAULT_MAX_BODY = 64 * 1024 * 1024


class RequestError(Exception):
    """A bad request: ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_score_request(data: Any, max_items: int = DEFAULT_MAX_ITEMS) -> tuple[list[str], list[str], list[bool]]:
    """Check a decoded ``/score`` body and return (prompts, responses, ended).

    ``ended`` defaults to all true (a reward model is trained on responses that end with EOS). Raises
    :class:`RequestError` (422 for a wrong shape or type, 413 for more than ``max_items`` responses).
    """
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object with 'prompts' and 'responses', got {type(data).__name__}")
    missing = [key for key in ("prompts", "responses") if key not in data]
    if missing:
        raise RequestError(422, f"missing key(s): {', '.join(repr(k) for k in missing)}; expected "
                                "{\"prompts\": [...], \"responses\": [...]}")
    lists = {}
    for key in ("prompts", "responses", "ended"):
        value = data.get(key)
        if key == "ended" and value is None:
            continue
        if not isinstance(value, list):
            raise RequestError(422, f"'{key}' must be a list, not {type(value).__name__}")
        lists[key] = value
    prompts, responses = lists["prompts"], lists["responses"]
    if len(prompts) != len(responses):
        raise RequestError(422, f"{len(prompts)} prompts but {len(responses)} responses; they pair up one to one")
    if len(responses) > max_items:
        raise RequestError(413, f"{len(responses)} responses in one request; this server takes at most {max_items} "
                                "(send smaller chunks, or restart it with a larger --max-items)")
    for key in ("prompts", "responses"):
        for i, value in enumerate(lists[key]):
            if not isinstance(value, str):
                raise RequestError(422, f"{key}[{i}] is a {type(value).__name__}; expected a string")
    ended = lists.get("ended")
    if ended is None:
        ended = [True] * len(responses)
    elif len(ended) != len(responses):
        raise RequestError(422, f"'ended' has {len(ended)} entries for {len(responses)} responses")
    else:
        for i, value in enumerate(ended):
            if not isinstance(value, bool):
                raise RequestError(422, f"ended[{i}] is a {type(value).__name__}; expected true or false")
    return list(prompts), list(responses), list(ended)


def text_batch(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> ScoringBatch:
    """A ScoringBatch of text only: token ids are empty, a re-tokenising ModelReward never reads them."""
    empty: list[list[int]] = [[] for _ in responses]
    return ScoringBatch(list(prompts), list(responses), empty, [[] for _ in responses], list(ended))


@dataclass
class _Job:
    prompts: list[str]
    responses: list[str]
    ended: list[bool]
    future: Future = field(default_factory=Future)


class ScoreBatcher:
    """One worker thread that owns the scorer and coalesces queued requests into batches.

    A batch takes waiting requests, in arrival order, while the total stays within ``batch_size``
    responses, waiting at most ``max_wait_s`` for more to arrive; a single request larger than
    ``batch_size`` is scored alone (the scorer chunks it). When a coalesced batch fails, each request is
    retried alone, so one bad request cannot fail its neighbours.
    """

    def __init__(self, score: Callable[[ScoringBatch], torch.Tensor], batch_size: int, max_wait_s: float = 0.002):
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {batch_size}")
        self._score_fn, self.batch_size, self.max_wait_s = score, int(batch_size), float(max_wait_s)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.requests = self.items = self.batches = 0
        self._thread = threading.Thread(target=self._run, name="rlhfkit-serve-rm", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], responses: list[str], ended: list[bool]) -> Future:
        """Queue one request; the future resolves to its list of float scores."""
        job = _Job(prompts, responses, ended)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            jobs, size = [job], len(job.responses)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.batch_size:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # stop after this batch
                    self._queue.put(None)
                    break
                if size + len(nxt.responses) > self.batch_size:
                    carry = nxt  # the first request of the next batch
                    break
                jobs.append(nxt)
                size += len(nxt.responses)
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        try:
            batch = text_batch([p for j in jobs for p in j.prompts], [r for j in jobs for r in j.responses],
                               [e for j in jobs for e in j.ended])
            scores = self._score_fn(batch).detach().to("cpu", torch.float32).tolist() if len(batch) else []
        except Exception as exc:  # handed to the waiting request(s)
            if len(jobs) > 1:
                for job in jobs:
                    self._score([job])
                return
            jobs[0].future.set_exception(exc)
            return
        self.batches += 1
        start = 0
        for job in jobs:
            n = len(job.responses)
            self.requests += 1
            self.items += n
            job.future.set_result(scores[start:start + n])
            start += n


def _one_line(text: Any, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def create_app(reward: ModelReward, *, batch_size: int = 16, api_key: str | None = None,
               max_items: int = DEFAULT_MAX_ITEMS, max_body: int = DEFAULT_MAX_BODY, max_wait_s: float = 0.002):
    """The FastAPI app serving ``reward`` (see the module docstring for the protocol).

    ``api_key``: when set, every route needs ``Authorization: Bearer <api_key>`` (401 otherwise).
    """
    batcher = ScoreBatcher(reward.score, batch_size, max_wait_s)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="rlhfkit serve-rm", version="1", lifespan=lifespan,
                  description="A reward model: POST /score {prompts, responses[, ended]} -> {scores}.")
    app.state.batcher = batcher
    expected = f"Bearer {api_key}".encode() if api_key else None

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers or None)

    def unauthorised(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        sent = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(sent, expected):
            return None
        return error(401, "missing or wrong bearer token: send 'Authorization: Bearer <key>' (HTTPReward sends "
                          f"${API_KEY_ENV})", **{"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health(request: Request):
        if (refused := unauthorised(request)) is not None:
            return refused
        tokenizer = reward.tokenizer
        return {"status": "ok", "model": reward.name, "tokenizer": getattr(tokenizer, "name_or_path", "") or
                type(tokenizer).__name__, "device": str(reward.device), "batch_size": batcher.batch_size,
                "max_items": max_items, "auth": expected is not None, "requests": batcher.requests,
                "items": batcher.items, "batches": batcher.batches, "truncated": reward.num_truncated}

    @app.post("/score")
    async def score(request: Request):
        if (refused := unauthorised(request)) is not None:
            return refused
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return error(413, f"request body of {length} bytes; this server takes at most {max_body}")
        raw = await request.body()
        if len(raw) > max_body:
            return error(413, f"request body of {len(raw)} bytes; this server takes at most {max_body}")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return error(400, f"request body is not JSON ({_one_line(exc, 120)}); expected "
                              "{\"prompts\": [...], \"responses\": [...]}")
        try:
            prompts, responses, ended = parse_score_request(data, max_items)
        except RequestError as exc:
            return error(exc.status, exc.message)
        try:
            scores = await asyncio.wrap_future(batcher.submit(prompts, responses, ended))
        except RlhfkitError as exc:  # e.g. an empty prompt with an empty response
            return error(422, _one_line(exc))
        except Exception as exc:  # a one-line 500; the traceback stays in the server log
            logger.exception("serve-rm: scoring failed")
            return error(500, f"scoring failed: {type(exc).__name__}: {_one_line(exc, 200)}")
        # json.dumps writes NaN/Infinity, which HTTPReward reads back; the trainer then names the source
        return Response(json.dumps({"scores": scores}), media_type="application/json")

    return app


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when one is visible, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device '{device}' is not a device torch knows ({_one_line(exc, 80)})") from None


def load_served_reward(model: str, device: str | torch.device = "auto", batch_size: int = 16,
                       trust_remote_code: bool = False) -> ModelReward:
    """A ModelReward for serving: its own tokenizer, always on the re-tokenising (text) path."""
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    dev = resolve_device(device) if isinstance(device, str) else device
    reward = ModelReward(model, tokenizer, device=dev, batch_size=batch_size, tokenizer=tokenizer,
                         trust_remote_code=trust_remote_code)
    reward.retokenize = True  # requests carry text: score it as a local run re-tokenises for another tokenizer
    return reward


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="rlhfkit serve-rm", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description="Serve a reward model over HTTP for `rlhfkit ppo --reward-url "
                                  "http://HOST:PORT/score`: POST /score {prompts, responses[, ended]} "
                                  "-> {scores}; GET /health.")
    p.add_argument("model", nargs="?", help="reward model: a folder or hub id (sequence classification, 1 output)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same, as the trainers take it")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward; concurrent requests are "
                                                              "coalesced up to this many")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the bearer token "
                                                              "clients must send; unset or empty = no auth")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="most responses in one request")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.model and a.model_flag and a.model != a.model_flag:
        p.error(f"two models: {a.model} and --model {a.model_flag}")
    a.model = a.model or a.model_flag
    if not a.model:
        p.error("the reward model is required: rlhfkit serve-rm MODEL")
    if a.batch_size < 1 or a.max_items < 1:
        raise ConfigError("--batch-size and --max-items must be >= 1")
    if not 0 <= a.port < 65536:
        raise ConfigError(f"--port {a.port} is not a TCP port")
    api_key = os.environ.get(a.api_key_env) or None
    reward = load_served_reward(a.model, a.device, a.batch_size, a.trust_remote_code)
    app = create_app(reward, batch_size=a.batch_size, api_key=api_key, max_items=a.max_items)

    import uvicorn

    auth = f"bearer token from ${a.api_key_env}" if api_key else "no auth"
    print(f"rlhfkit serve-rm: {reward.name} on {reward.device}, http://{a.host}:{a.port}/score ({auth})", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0
