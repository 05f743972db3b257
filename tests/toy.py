"""A small, learnable preference task generated from a seed (tests and the interim demo use it).

Requests are arithmetic questions and small facts; a good reply answers correctly and politely, a bad
one is wrong, rude, or refuses. The split between train and held-out data is by question, so held-out
accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

_COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
           "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "rose": "red", "lemon": "yellow"}
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _in_split(key: str, split: str) -> bool:
    """A fixed fifth of all questions is held out; train and eval never share a question."""
    held_out = sum(map(ord, key)) % 5 == 0
    return held_out if split == "eval" else not held_out


def _questions(rng: random.Random, split: str) -> tuple[str, str, str]:
    """(prompt, correct answer, wrong answer) for a question of ``split`` (train or eval)."""
    if rng.random() < 0.5:
        a, b = rng.choice([(a, b) for a in range(10) for b in range(10) if _in_split(f"{a}+{b}", split)])
        wrong = (a + b + rng.choice([1, 2, 3, -1, -2])) % 19
        return f"What is {_WORDS[a]} plus {_WORDS[b]}?", f"{_WORDS[a]} plus {_WORDS[b]} is {_WORDS[a + b]}.", \
            f"{_WORDS[a]} plus {_WORDS[b]} is {_WORDS[wrong]}."
    thing = rng.choice([t for t in sorted(_COLORS) if _in_split(t, split)])
    wrong = rng.choice(sorted({c for c in _COLORS.values() if c != _COLORS[thing]}))
    return f"What color is the {thing}?", f"The {thing} is {_COLORS[thing]}.", f"The {thing} is {wrong}."


_GOOD_OPENERS = ["Sure!", "Happy to help.", "Good question.", "Of course."]
_BAD_STYLES = ["No. Figure it out yourself.", "I cannot help with that.", "Whatever."]


def preference_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Rows in the explicit-prompt preference layout: prompt / chosen / rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, right, wrong = _questions(rng, split)
        chosen = f"{rng.choice(_GOOD_OPENERS)} {right}"
        rejected = rng.choice([f"{rng.choice(_GOOD_OPENERS)} {wrong}", rng.choice(_BAD_STYLES),
                               f"{rng.choice(_BAD_STYLES)} {wrong}"])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def ranked_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Rows in the ranked layout: prompt / responses (best first)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, right, wrong = _questions(rng, split)
        rows.append({"prompt": prompt, "responses": [f"{rng.choice(_GOOD_OPENERS)} {right}", right,
                                                      f"{rng.choice(_GOOD_OPENERS)} {wrong}", rng.choice(_BAD_STYLES)]})
    return rows


def sft_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Rows in the prompt / completion layout with the good reply."""
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n, seed, split)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def write_toy_task(out_dir: str | Path, n_train: int = 256, n_eval: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write sft/preference train and eval files; eval rows ask only held-out questions."""
    out = Path(out_dir)
    return {
        "sft_train": write_jsonl(sft_rows(n_train, seed), out / "sft_train.jsonl"),
        "sft_eval": write_jsonl(sft_rows(n_eval, seed + 1000, "eval"), out / "sft_eval.jsonl"),
        "pref_train": write_jsonl(preference_rows(n_train, seed + 1), out / "pref_train.jsonl"),
        "pref_eval": write_jsonl(preference_rows(n_eval, seed + 2000, "eval"), out / "pref_eval.jsonl"),
    }


# The tool functions the tool tests load by name (rlhfkit.rollout.tools): ones that work, raise, hang, return
# too much or cannot be JSON-written, and ones that are not valid tools.
TOOLS_SOURCE = '''
import os
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def lookup(country: str, detail: str = "capital") -> dict:
    """Look a country up in the atlas.

    Args:
        country: The country's name.
        detail: What to return. (choices: ["capital", "population"])
    """
    return {"country": country, detail: "Xanadu"}


def fail(x: int) -> int:
    """Always fails.

    Args:
        x: Shown in the message.
    """
    raise ValueError(f"bad x {x}")


def hang(pid_file: str) -> str:
    """Write its process id, then sleep far past any timeout.

    Args:
        pid_file: Where the process id goes.
    """
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return "woke"


def huge() -> str:
    """One megabyte of text."""
    return "x" * 1_000_000


def odd() -> object:
    """A value JSON cannot write."""
    return {1, 2}


def no_hints(a):
    """No type hints.

    Args:
        a: Something.
    """
    return a


def no_docstring(a: int) -> int:
    return a


NOT_CALLABLE = 3
'''

# Environments for --env (issue 24): `countdown.py:Countdown` etc. once written to a file.
ENV_SOURCE = '''
class Countdown:
    """Opens with the row's 'start'; turn k scores k * the row's 'scale'; the observation counts the turns
    left; done after the row's 'turns' turns. Keeps what the policy said in ``said``."""

    def reset(self, row):
        self.left, self.scale, self.turn, self.said = int(row["turns"]), float(row["scale"]), 0, []
        return f"count down from {row['start']}"

    def step(self, text):
        self.turn += 1
        self.left -= 1
        self.said.append(text)
        return (None if self.left <= 0 else f"{self.left} to go"), self.scale * self.turn, self.left <= 0


class Endless(Countdown):
    """Never done: one more turn, reward 1, every time."""

    def step(self, text):
        self.said.append(text)
        return "again", 1.0, False


class Broken(Countdown):
    """Raises at its second step."""

    def step(self, text):
        if self.said:
            raise RuntimeError("boom")
        self.said.append(text)
        return "again", 1.0, False


class BadReward(Countdown):
    def step(self, text):
        return "again", float("nan"), False


class BadReset(Countdown):
    """Raises in reset for rows whose 'start' is negative."""

    def reset(self, row):
        if int(row["start"]) < 0:
            raise KeyError("negative start")
        return super().reset(row)


class NoStep:
    def reset(self, row):
        return "hi"


class NeedsArgs(Countdown):
    def __init__(self, level):
        self.level = level


NOT_A_CLASS = 3
'''


def save_e_heavy_policy(tiny_model_dir, out):
    """Save the tiny model with its 'e' token boosted to ``out`` and return its tokenizer: a second policy that
    writes many more 'e's (and shorter texts of one-character tokens). The final hidden states share a common
    direction: aligning the 'e' row of the LM head with it raises its logit by about 10 nats everywhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok(["Tell me about the water and the old man, and what we see there."], return_tensors="pt").input_ids
    with torch.no_grad():
        mean_hidden = model.model(ids).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.convert_tokens_to_ids("e")] = 2.0 * mean_hidden / mean_hidden.norm()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok


class ServerThread:
    """uvicorn serving ``app`` on a free localhost port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
