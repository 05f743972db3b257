"""A minimal OpenAI-compatible chat server for tests: local causal LMs answer ``/v1/chat/completions`` greedily.

Run as its own process (loopback only, no network)::

    python tests/openai_server.py --model NAME=DIR [--model NAME2=DIR2] --port PORT [--max-new-tokens 16]

The request's ``model`` picks the model (the first one when it names none of them); the messages are
rendered with the model's chat template plus the generation prompt, and the reply is the greedy
continuation, at most ``min(max_tokens, --max-new-tokens)`` tokens, special tokens removed. ``GET /health``
answers once the models are loaded; ``GET /stats`` counts the chat requests served, so a test can check
that its requests (and retries) reached the server. Why not ``transformers serve``: it needs the ``openai``
package (with a compiled dependency, jiter), which the test environment does not carry.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float | None = None


def build_app(models: dict[str, str], max_new_tokens: int) -> FastAPI:
    loaded = {}
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        loaded[name] = (model, tokenizer)
    default = next(iter(loaded))
    lock = threading.Lock()
    stats = {"requests": 0}
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/stats")
    def get_stats() -> dict:
        return dict(stats)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"} for name in loaded]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> dict:
        name = request.model if request.model in loaded else default
        model, tokenizer = loaded[name]
        ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        limit = min(int(request.max_tokens or max_new_tokens), max_new_tokens)
        with lock, torch.no_grad():
            stats["requests"] += 1
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        ended = bool(len(new)) and int(new[-1]) == tokenizer.eos_token_id
        text = tokenizer.decode(new, skip_special_tokens=True)
        return {"id": f"chatcmpl-{stats['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "finish_reason": "stop" if ended else "length"}],
                "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": int(len(new)),
                          "total_tokens": int(ids.shape[1] + len(new))}}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (repeatable)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    models = dict(item.split("=", 1) for item in a.model)
    uvicorn.run(build_app(models, a.max_new_tokens), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
