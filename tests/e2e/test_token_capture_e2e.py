"""Token capture through a real mitmdump against the stand-in, which answers
`return_token_ids` and `logprobs` as vLLM does (the real engine: tests/engine/):
what goes upstream, what the agent gets, what the record keeps, and sampling
control from the config."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from llmtraj.cli.proxy_process import ProxyProcess

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def capturing(upstream, tmp_path_factory):
    traj = tmp_path_factory.mktemp("traj")
    options = {"llm_traj_path": traj, "llm_traj_capture_tokens": "true"}
    with ProxyProcess(upstream=upstream.url, options=options) as proxy:
        yield proxy, traj


def agent(proxy, session: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="sk-x", max_retries=0)


@pytest.mark.parametrize("stream", [True, False])
def test_the_engine_is_asked_and_the_agent_gets_only_what_it_asked_for(capturing, upstream, session, stream):
    proxy, traj = capturing
    create = agent(proxy, session).chat.completions.with_raw_response.create
    raw = create(model="standin-text", messages=MESSAGES, stream=stream).http_response
    got = raw.read()
    sent = json.loads(upstream.requests[-1].body)
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    assert (sent.get("stream_options") == {"include_usage": True}) is stream
    assert b'token_ids":[' not in got and b'"logprobs":{' not in got  # vLLM's nulls, as unasked
    (record,) = wait_records(traj / f"{session}.jsonl", 1)
    assert record.request == {"model": "standin-text", "messages": MESSAGES, "stream": stream}
    assert record.tokens.complete, record.tokens.problems
    assert record.tokens.prompt_ids == list(range(10)) and record.tokens.source == "vllm"
    if stream:
        assert b"".join(e.raw.encode() for e in record.events) == got and record.capture.dropped == 1
    else:
        assert json.loads(got) == record.response and record.capture.rewritten == [0]
        assert "content-length" not in raw.headers or int(raw.headers["content-length"]) == len(got)


def test_the_config_switches_capture_on_per_model_and_controls_sampling(upstream, tmp_path, session):
    config = tmp_path / "upstreams.toml"
    config.write_text(f"""
[models."standin-text"]
base_url = "{upstream.url}/v1"
kind = "vllm"
capture_tokens = true
sampling = {{allow = ["max_tokens"], fixed = {{temperature = 0.5, seed = 3}}}}
[models."standin-n"]
base_url = "{upstream.url}/v1"
""")
    options = {"llm_traj_path": tmp_path / "traj", "llm_traj_config": config}
    with ProxyProcess(upstream="http://127.0.0.1:9", options=options) as proxy:
        client = agent(proxy, session)
        client.chat.completions.create(model="standin-text", messages=MESSAGES, temperature=1.0, top_p=0.3, max_tokens=5)
        sent = json.loads(upstream.requests[-1].body)
        client.chat.completions.create(model="standin-n", messages=MESSAGES, temperature=1.0)
        untouched = json.loads(upstream.requests[-1].body)
    assert sent["temperature"] == 0.5 and sent["seed"] == 3 and sent["max_tokens"] == 5 and "top_p" not in sent
    assert sent["return_token_ids"] is True
    assert untouched == {"model": "standin-n", "messages": MESSAGES, "temperature": 1.0}
    routed, other = wait_records(tmp_path / "traj" / f"{session}.jsonl", 2)
    assert routed.upstream.sampling == {"removed": {"top_p": 0.3}, "fixed": {"temperature": 0.5, "seed": 3}}
    assert routed.request["temperature"] == 1.0  # as the agent sent it
    assert routed.tokens.complete and other.tokens is None and other.capture is None
