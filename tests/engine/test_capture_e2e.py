"""Token capture end to end: the real openai SDK through a real mitmdump with
`llm_traj_capture_tokens=true` to the real vLLM serving the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from llmtraj.cli.proxy_process import ProxyProcess

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "Say hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
TOOL_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}\n</tool_call>'
NEWLINES = {"structured_outputs": {"regex": "\n\n\n\n"}}  # content that re-tokenizes to the ids produced
# What differs between two runs of the same request: ids and times
_RUN_SPECIFIC = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


@pytest.fixture(scope="module")
def traj_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("traj")


@pytest.fixture(scope="module")
def proxy(engine, traj_dir):
    options = {"llm_traj_mode": "record", "llm_traj_path": traj_dir, "llm_traj_capture_tokens": "true"}
    with ProxyProcess(upstream=engine.url, options=options) as p:
        yield p


@pytest.fixture
def session(request) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:100]


def agent(proxy, session: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="sk-engine", max_retries=0)


def records(traj_dir, session: str, count: int):
    return wait_records(traj_dir / f"{session}.jsonl", count)


def tokens(record) -> dict:
    assert record.tokens is not None, "the record has no token ids"
    return record.tokens.model_dump()


def cli(*args: str) -> str:
    program = Path(sys.executable).with_name("llm-traj")
    return subprocess.run([str(program), *args], capture_output=True, text=True, check=True).stdout


def same_run(data: bytes) -> bytes:
    return _RUN_SPECIFIC.sub(rb'"\1":"-"', data)


def direct(engine, path: str, body: dict) -> bytes:
    """What the engine itself answers the agent's request (no proxy, no capture)."""
    return httpx.post(f"{engine.url}/v1{path}", json={"model": engine.model, **body}, timeout=60).content


def test_streamed_and_non_stream_calls_give_identical_tokens(engine, proxy, traj_dir, session):
    client = agent(proxy, session)
    kwargs = dict(model=engine.model, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    plain, stream = records(traj_dir, session, 2)
    assert tokens(plain) == tokens(stream)
    assert plain.tokens.complete and plain.tokens.problems == [] and plain.tokens.source == "vllm"
    assert plain.tokens.prompt_ids == engine.tokenize(messages=MESSAGES)
    (choice,) = tokens(plain)["choices"]
    assert len(choice["completion_ids"]) == len(choice["logprobs"]) == whole.usage.completion_tokens == 8
    # the record keeps the agent's request as sent, and what the proxy added
    assert "return_token_ids" not in stream.request and "logprobs" not in stream.request
    assert stream.capture.added == {"return_token_ids": True, "logprobs": True, "stream_options": {"include_usage": True}}


def test_an_agent_that_asked_for_nothing_gets_what_the_engine_would_have_sent_it(engine, proxy, traj_dir, session):
    client = agent(proxy, session)
    body = dict(messages=MESSAGES, max_tokens=6, temperature=0)
    create = client.chat.completions  # forced text: the same in every run, whatever the float paths
    with create.with_streaming_response.create(model=engine.model, **body, stream=True, extra_body=NEWLINES) as response:
        got_stream = response.read()
    got_whole = create.with_raw_response.create(model=engine.model, **body, extra_body=NEWLINES).http_response.content
    for got in (got_stream, got_whole):
        assert b'token_ids":[' not in got and b'"logprobs":{' not in got
    assert b'"usage":{' not in got_stream  # the proxy's own include_usage is not passed on
    assert same_run(got_stream) == same_run(direct(engine, "/chat/completions", {**body, **NEWLINES, "stream": True}))
    assert same_run(got_whole) == same_run(direct(engine, "/chat/completions", {**body, **NEWLINES}))
    streamed, whole = records(traj_dir, session, 2)
    assert streamed.tokens.complete and whole.tokens.complete
    # the record's events are what the agent got; which of them were rewritten, and the dropped usage event
    assert "".join(e.raw for e in streamed.events).encode() == got_stream
    assert streamed.capture.rewritten == list(range(len(streamed.events) - 1)) and streamed.capture.dropped == 1
    assert whole.capture.rewritten == [0]


def test_an_agent_that_asked_for_logprobs_gets_exactly_those(engine, proxy, traj_dir, session):
    client = agent(proxy, session)
    kwargs = dict(model=engine.model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(getattr(c.choices[0], "token_ids", None) is None for c in chunks if c.choices)
    (record,) = records(traj_dir, session, 1)
    assert record.capture.added == {"return_token_ids": True, "stream_options": {"include_usage": True}}
    assert tokens(record)["choices"][0]["logprobs"] == [e.logprob for e in entries]


def test_n2(engine, proxy, traj_dir, session):
    client = agent(proxy, session)
    kwargs = dict(model=engine.model, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=7, n=2)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 10
    whole = client.chat.completions.create(**kwargs)
    streamed, plain = records(traj_dir, session, 2)
    for record in (streamed, plain):
        assert record.tokens.complete, record.tokens.problems
        assert [c["index"] for c in tokens(record)["choices"]] == [0, 1]
        assert all(len(c["completion_ids"]) == 5 for c in tokens(record)["choices"])
    assert whole.usage.completion_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call(engine, proxy, traj_dir, session, stream):
    client = agent(proxy, session)
    kwargs = dict(model=engine.model, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
                  extra_body={"structured_outputs": {"regex": TOOL_CALL}})  # fmt: skip
    if stream:
        with client.chat.completions.stream(**kwargs) as events:
            message = events.get_final_completion().choices[0].message
    else:
        message = client.chat.completions.create(**kwargs).choices[0].message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    (record,) = records(traj_dir, session, 1)
    assert record.tokens.complete, record.tokens.problems
    assert record.tokens.choices[0].finish_reason == "tool_calls"
    assert record.tokens.prompt_ids == engine.tokenize(messages=MESSAGES, tools=TOOLS)


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_completions(engine, proxy, traj_dir, session, stream):
    client = agent(proxy, session)
    result = client.completions.create(model=engine.model, prompt="def f(x):", max_tokens=4, temperature=0, stream=stream)
    text = "".join(c.choices[0].text for c in result) if stream else result.choices[0].text
    assert text
    (record,) = records(traj_dir, session, 1)
    assert record.tokens.complete, record.tokens.problems
    assert record.tokens.prompt_ids == engine.tokenize(prompt="def f(x):")
    assert len(record.tokens.choices[0].completion_ids) == 4


def test_a_multi_turn_session_continues_token_for_token_and_exports(engine, proxy, traj_dir, session, tmp_path):
    client = agent(proxy, session)
    messages = list(MESSAGES)
    for turn in range(3):
        reply = client.chat.completions.create(model=engine.model, messages=messages, max_tokens=10, temperature=0,
                                               stream=turn == 1, extra_body=NEWLINES)  # fmt: skip
        content = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if turn == 1 else reply.choices[0].message.content
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"and again {turn}"}]
    calls = records(traj_dir, session, 3)
    for before, after in zip(calls, calls[1:]):
        chain = before.tokens.prompt_ids + before.tokens.choices[0].completion_ids
        assert after.tokens.prompt_ids[: len(chain)] == chain
    path = str(traj_dir / f"{session}.jsonl")
    assert f"session {session}: continuity: 2 of 2 calls continue the call before" in cli("stats", path)
    out = tmp_path / "chains.parquet"
    cli("export", path, "--format", "tokens", "--granularity", "per_session", "-o", str(out))
    import pyarrow.parquet as pq

    (row,) = pq.read_table(out).to_pylist()
    assert row["calls"] == [1, 2, 3] and row["prompt_ids"] == calls[0].tokens.prompt_ids
    last = calls[-1].tokens
    assert row["prompt_ids"] + row["response_ids"] == last.prompt_ids + last.choices[0].completion_ids
    produced = [i for r in calls for i in r.tokens.choices[0].completion_ids]
    assert [i for i, m in zip(row["response_ids"], row["response_mask"]) if m] == produced
    assert len(row["response_logprobs"]) == len(row["response_ids"])
