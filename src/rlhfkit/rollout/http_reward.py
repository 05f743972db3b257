"""Rewards from a server over HTTP: :class:`HTTPReward` and the retry policy it shares with HTTP judges.

:func:`post_with_retries` POSTs one JSON body and retries connection errors, timeouts, HTTP 429 (honouring
a numeric Retry-After, capped) and 5xx with exponential back-off; any other 4xx fails at once, and every
failure is a one-line RlhfkitError (:func:`describe_request_error`). :class:`HTTPReward` sends prompts and
responses in chunks and checks that the reply holds one number per response. Only the standard library
talks to the network.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError, RlhfkitError
from .scoring import ScoringBatch, _as_scores, _one_line

__all__ = ["API_KEY_ENV", "HTTPReward", "describe_request_error", "post_with_retries"]

API_KEY_ENV = "RLHFKIT_REWARD_API_KEY"
RETRY_AFTER_CAP_S = 60.0


def _retry_after(headers) -> float | None:
    """Seconds from a numeric Retry-After header, capped at RETRY_AFTER_CAP_S; None when absent/not numeric."""
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:  # an HTTP date: fall back to exponential back-off
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_CAP_S)


def describe_request_error(exc: BaseException, timeout: float) -> str:
    """One line for a failed HTTP request (connection refused, reset, DNS, timeout)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    text = _one_line(reason, 120)
    return f"{type(reason).__name__}: {text}" if isinstance(reason, BaseException) else text


def post_with_retries(url: str, body: bytes, headers: dict[str, str], *, timeout: float, max_retries: int,
                      backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                      who: str | None = None, before_attempt: Callable[[], None] | None = None) -> bytes:
    """POST ``body`` to ``url`` and return the reply body; the retry policy of :class:`HTTPReward`.

    Connection errors, timeouts, HTTP 429 and 5xx are retried up to ``max_retries`` times, waiting
    ``backoff * 2**k`` seconds or, for a 429 with a numeric Retry-After header, that many seconds (at most
    RETRY_AFTER_CAP_S). Any other 4xx fails at once. Errors are one-line RlhfkitErrors starting with
    ``who``. ``before_attempt`` (e.g. a rate limiter) is called before every attempt.
    """
    who = who or url
    attempts = max_retries + 1
    problem = "no attempt made"
    for attempt in range(1, attempts + 1):
        if before_attempt is not None:
            before_attempt()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        wait = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = _one_line(exc.read().decode("utf-8", "replace"), 120)
            except Exception:  # the body is only for the message
                detail = ""
            finally:
                exc.close()
            problem = f"HTTP {exc.code} {exc.reason}" + (f" ({detail})" if detail else "")
            if exc.code == 429:
                wait = _retry_after(exc.headers)
            elif exc.code < 500:
                raise RlhfkitError(f"{who}: {problem}; not retried (attempt {attempt} of {attempts})") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, timeouts
            problem = describe_request_error(exc, timeout)
        if attempt < attempts:
            sleep(wait if wait is not None else backoff * 2 ** (attempt - 1))
    raise RlhfkitError(f"{who}: {problem}; gave up after {attempts} attempts")


class HTTPReward:
    """A reward server: POST ``{"prompts": [...], "responses": [...], "ended": [...], "columns": {...}}`` as
    JSON, in chunks of ``batch_size`` (``ended``: whether each response produced EOS / a stop string;
    ``columns``: the dataset row of each response's prompt, as reward functions get it: ``prompt`` as the
    user wrote it and every other column by name, one value per response; servers may ignore both).

    The reply is ``{"scores": [...]}``, ``{"rewards": [...]}`` or a bare JSON list, one number per
    response. Connection errors, timeouts, HTTP 429 and 5xx are retried up to ``max_retries`` times,
    waiting ``backoff * 2**k`` seconds (0.5, 1, 2, ...) or, for a 429 with a numeric Retry-After header,
    that many seconds (at most 60). Any other 4xx fails at once. ``Authorization: Bearer
    $RLHFKIT_REWARD_API_KEY`` is sent when that variable is set at construction (an Authorization entry
    in ``headers`` wins). Only the standard library is used.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        max_retries: int = 3,
        batch_size: int = 64,
        headers: dict[str, str] | None = None,
        *,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"reward URL '{url}' must start with http:// or https://")
        if timeout <= 0 or max_retries < 0 or batch_size < 1:
            raise ConfigError(f"reward URL '{url}': need timeout > 0, max_retries >= 0 and batch_size >= 1")
        self.url = url
        self.name = url
        self.metric_name = parsed.hostname or url  # reward/<host> in the metrics
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.batch_size = int(batch_size)
        self.backoff = float(backoff)
        self._sleep = sleep
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.headers.update(headers or {})

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        n = len(batch.responses)
        parts = [torch.zeros(0, dtype=torch.float32)]
        for start in range(0, n, self.batch_size):
            prompts = list(batch.prompts[start:start + self.batch_size])
            responses = list(batch.responses[start:start + self.batch_size])
            ended = [bool(e) for e in batch.ended[start:start + self.batch_size]]
            row = {name: list(values[start:start + self.batch_size])
                   for name, values in {"prompt": batch.raw_prompts, **batch.columns}.items()}
            parts.append(self._parse(self._post(prompts, responses, ended, row), len(responses)))
        return torch.cat(parts)

    def _post(self, prompts: list[str], responses: list[str], ended: list[bool] | None = None,
              columns: dict[str, list[Any]] | None = None) -> bytes:
        payload: dict[str, Any] = {"prompts": prompts, "responses": responses}
        if ended is not None:  # extra key: `rlhfkit serve-rm` adds EOS only to responses that ended
            payload["ended"] = ended
        if columns:
            payload["columns"] = columns
        body = json.dumps(payload, default=str).encode("utf-8")  # dates and other non-JSON cells as text
        return post_with_retries(self.url, body, self.headers, timeout=self.timeout, max_retries=self.max_retries,
                                 backoff=self.backoff, sleep=self._sleep, who=f"reward server {self.url}")

    def _parse(self, raw: bytes, n: int) -> torch.Tensor:
        who = f"reward server {self.url}"
        try:
            data = json.loads(raw)
        except ValueError:
            text = _one_line(raw.decode("utf-8", "replace"), 80)
            raise RlhfkitError(f"{who}: reply is not JSON: {text!r}") from None
        if isinstance(data, dict):
            key = next((k for k in ("scores", "rewards") if k in data), None)
            if key is None:
                raise RlhfkitError(f"{who}: reply has no 'scores' or 'rewards' key (keys: "
                                   f"{_one_line(', '.join(map(str, data)), 80)})")
            data = data[key]
        if not isinstance(data, list):
            raise RlhfkitError(f"{who}: expected a JSON list of scores, got {type(data).__name__}")
        return _as_scores(data, n, who)
