"""What vLLM 0.32 (CPU build, tiny model) sends, straight from the engine:
the shapes token capture relies on. If an engine upgrade changes them, these
fail before the capture tests do, naming what changed."""

from __future__ import annotations

import json

import httpx

MESSAGES = [{"role": "user", "content": "Say hello"}]


def chunks(engine, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{engine.url}{path}", json={"model": engine.model, **body}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_chat_stream_prompt_ids_on_top_of_the_first_chunk_and_new_ids_per_chunk(engine):
    body = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True, "return_token_ids": True,
            "logprobs": True, "stream_options": {"include_usage": True}}  # fmt: skip
    got = chunks(engine, "/v1/chat/completions", body)
    assert got[0]["prompt_token_ids"] == engine.tokenize(messages=MESSAGES)
    assert all("prompt_token_ids" not in c for c in got[1:])
    per_chunk = [c["choices"][0] for c in got[1:] if c["choices"]]
    assert all(len(choice["token_ids"]) == len(choice["logprobs"]["content"]) for choice in per_chunk)
    assert sum(len(choice["token_ids"]) for choice in per_chunk) == got[-1]["usage"]["completion_tokens"] == 5


def test_what_is_not_asked_for_comes_as_null(engine):
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    got = chunks(engine, "/v1/chat/completions", body)
    assert got[0]["prompt_token_ids"] is None
    assert all(c["choices"][0]["token_ids"] is None and c["choices"][0]["logprobs"] is None for c in got[1:])
    assert all("usage" not in c for c in got)


def test_completions_put_prompt_ids_in_the_choice(engine):
    body = {"prompt": "def f(x):", "max_tokens": 3, "temperature": 0, "return_token_ids": True, "logprobs": 1}
    response = httpx.post(f"{engine.url}/v1/completions", json={"model": engine.model, **body}, timeout=60).json()
    choice = response["choices"][0]
    assert choice["prompt_token_ids"] == engine.tokenize(prompt="def f(x):")
    assert len(choice["token_ids"]) == len(choice["logprobs"]["token_logprobs"]) == response["usage"]["completion_tokens"]
    streamed = chunks(engine, "/v1/completions", {**body, "stream": True})
    assert streamed[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert [i for c in streamed for i in c["choices"][0]["token_ids"]] == choice["token_ids"]
