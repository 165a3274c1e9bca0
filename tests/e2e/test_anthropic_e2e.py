"""Anthropic Messages end to end, in all three modes: a real mitmdump with the
addon, the real `anthropic` SDK as the agent, and the stand-in upstream
answering with the capture-shaped fixtures (text, tool use, thinking + tool use)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import anthropic
import pytest
from anthropic import Anthropic, AsyncAnthropic
from llmtraj.anticall import AntiCallClient, AntiCallError
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from llmtraj.testing.standin import FIXTURES

from ..conftest import wait_records

FIXTURES = FIXTURES / "anthropic"
SCENARIOS = ["text", "tool_use", "thinking_tool_use"]
API_KEY = "sk-ant-api03-test-SECRET-0123456789"
NOWHERE = "http://127.0.0.1:9"


def fixture(name: str) -> tuple[dict, dict, bytes]:
    """(the request, the final message, the stream bytes) of a fixture."""
    request = json.loads((FIXTURES / f"{name}.request.json").read_text())
    request.pop("stream", None)
    request["model"] = f"standin-{name}"
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    return request, expected, (FIXTURES / f"{name}.sse").read_bytes()


def agent(proxy: ProxyProcess, session: str) -> Anthropic:
    return Anthropic(base_url=f"{proxy.url}/s/{session}", api_key=API_KEY, max_retries=0)


def dumped(message) -> dict:
    data = message.model_dump(mode="json", exclude_unset=True)
    if data.get("stop_details", ...) is None:  # the SDK's stream accumulator sets it, the API does not send it
        del data["stop_details"]
    return data


def calls(client: Anthropic, name: str) -> tuple[dict, dict, dict]:
    """The fixture's call made three ways: create, create(stream=True) folded
    by the SDK, and the `messages.stream` helper."""
    request, _, _ = fixture(name)
    plain = client.messages.create(**request)
    events = list(client.messages.create(**request, stream=True))
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    return dumped(plain), events, dumped(final)


@pytest.fixture(scope="module")
def recorded(upstream, tmp_path_factory):
    """Every scenario recorded through a real proxy; (trajectory dir, what the agent got)."""
    traj = tmp_path_factory.mktemp("anthropic")
    got = {}
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": traj}) as proxy:
        client = agent(proxy, "rec")
        for name in SCENARIOS:
            got[name] = calls(client, name)
    return traj, got


@pytest.mark.parametrize("name", SCENARIOS)
def test_record_passes_through_and_aggregates_like_the_sdk(recorded, name):
    traj, got = recorded
    _, expected, sse = fixture(name)
    plain, events, final = got[name]
    assert plain == expected and final == expected
    assert [e.type for e in events][0] == "message_start" and events[-1].type == "message_stop"
    records = [r for r in read_records(traj / "rec.jsonl") if r.request["model"] == f"standin-{name}"]
    assert [r.stream for r in records] == [False, True, True]
    api_version = Anthropic(api_key=API_KEY).default_headers["anthropic-version"]  # as this SDK version sends it
    for record in records:
        assert record.api == "anthropic.messages" and record.status == 200 and record.complete and not record.problems
        assert record.response == expected
        headers = {k.lower(): v for k, v in record.request_headers}
        # the key goes as x-api-key (anthropic 0.x) or as a bearer token (anthropic 2.x)
        auth = headers.get("x-api-key") or headers["authorization"]
        assert auth == "[REDACTED]" and headers["anthropic-version"] == api_version
    assert "".join(e.raw for e in records[1].events).encode() == sse  # every event kept as it went by
    assert API_KEY not in (traj / "rec.jsonl").read_text()


def test_record_bytes_are_passed_through_exactly(upstream, tmp_path):
    request, _, sse = fixture("thinking_tool_use")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}) as proxy:
        out = subprocess.run(
            ["curl", "-sS", "--no-buffer", f"{proxy.url}/v1/messages", "-H", "content-type: application/json",
             "-H", f"x-api-key: {API_KEY}", "-H", "anthropic-version: 2023-06-01",
             "--data-binary", json.dumps({**request, "stream": True})],
            capture_output=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 0 and out.stdout == sse


def test_replay_answers_every_call_with_no_upstream(recorded, tmp_path):
    traj, got = recorded
    with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "replay", "llm_traj_path": traj}) as proxy:
        client = agent(proxy, "rec")
        for name in SCENARIOS:
            plain, events, final = calls(client, name)
            assert plain == got[name][0] and final == got[name][2]
            assert [e.model_dump() for e in events] == [e.model_dump() for e in got[name][1]]
        with pytest.raises(anthropic.BadRequestError) as exc:  # diverged: the API's own error shape
            client.messages.create(**{**fixture("text")[0], "max_tokens": 1})
        assert exc.value.body["type"] == "error" and exc.value.body["error"]["code"].startswith("replay_")


def test_replay_streams_a_call_recorded_without_a_stream(upstream, tmp_path):
    """A non-stream recording, asked for as a stream: synthesised into the
    Messages event sequence, which the SDK folds back into the same message."""
    request, expected, _ = fixture("thinking_tool_use")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}) as proxy:
        assert dumped(agent(proxy, "s").messages.create(**request)) == expected
    wait_records(tmp_path / "s.jsonl", 1)
    with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "replay", "llm_traj_path": tmp_path}) as proxy:
        with agent(proxy, "s").messages.stream(**request) as stream:
            types = [event.type for event in stream]
            final = stream.get_final_message()
    assert dumped(final) == expected
    assert types.count("content_block_start") == 3 and types[-1] == "message_stop"


def test_anticall_driver_sees_the_api_and_answers_in_deltas_or_whole(tmp_path):
    request, expected, _ = fixture("thinking_tool_use")

    async def main():
        with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "anticall", "llm_traj_path": tmp_path}) as proxy:
            client = AsyncAnthropic(base_url=f"{proxy.url}/s/ac", api_key=API_KEY, max_retries=0)
            async with AntiCallClient.from_control_file(tmp_path / "control.json") as driver:

                async def streamed():
                    async with client.messages.stream(**request) as stream:
                        return await stream.get_final_message()

                agent_call = asyncio.ensure_future(streamed())
                event = await driver.get_request("ac", 10)
                assert event.api == "anthropic.messages" and event.stream is True
                assert event.request["tools"] == request["tools"] and event.request["system"] == request["system"]
                await driver.send_delta(event, delta={"reasoning_content": "Need the price. "})
                await driver.send_delta(event, delta={"reasoning_content": "Call the tool."})
                await driver.send_delta(event, "Checking AAPL.")
                await driver.send_delta(event, delta={"tool_calls": [{"index": 0, "id": "toolu_1", "function": {
                    "name": "get_stock_price", "arguments": '{"ticker": '}}]})  # fmt: skip
                await driver.send_delta(event, delta={"tool_calls": [{"index": 0, "function": {"arguments": '"AAPL"}'}}]})
                await driver.finish(event, usage={"prompt_tokens": 30, "completion_tokens": 12})
                deltas = await agent_call

                whole = asyncio.ensure_future(client.messages.create(**request))  # the driver answers in Anthropic's shape
                event = await driver.get_request("ac", 10)
                await driver.send_response(event, expected)
                whole = await whole

                text = asyncio.ensure_future(client.messages.create(**request))  # plain text is converted
                event = await driver.get_request("ac", 10)
                await driver.send_response(event, text="Just text.")
                text = await text

                later = asyncio.ensure_future(client.messages.create(**request))
                event = await driver.get_request("ac", 10)
                with pytest.raises(AntiCallError) as exc:  # a delta Messages cannot carry: refused to the driver
                    await driver.send_delta(event, "second choice", index=1)
                assert exc.value.status == 400 and exc.value.code == "bad_delta" and "index" in exc.value.message
                await driver.send_delta(event, "First choice.")  # the call is unharmed
                await driver.finish(event)
                later = await later
            await client.close()
        return deltas, whole, text, later

    deltas, whole, text, later = asyncio.run(asyncio.wait_for(main(), 60))
    assert [block.type for block in deltas.content] == ["thinking", "text", "tool_use"]
    assert deltas.content[0].thinking == "Need the price. Call the tool."
    assert deltas.content[2].input == {"ticker": "AAPL"} and deltas.content[2].id == "toolu_1"
    assert deltas.stop_reason == "tool_use" and deltas.usage.output_tokens == 12
    assert dumped(whole) == expected
    assert text.content[0].text == "Just text." and text.stop_reason == "end_turn"
    records = wait_records(tmp_path / "ac.jsonl", 4)
    assert records[0].api == "anthropic.messages" and records[0].response == dumped(deltas)
    assert records[1].response == expected
    assert later.content[0].text == "First choice." and records[3].response == dumped(later)
