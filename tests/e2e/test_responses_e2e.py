"""OpenAI Responses and legacy completions end to end, in all three modes: a
real mitmdump with the addon, the real `openai` SDK (`client.responses.create`
/ `.stream`, `client.completions.create`), and the stand-in upstream answering
with the capture-shaped fixtures."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from llmtraj.anticall import AntiCallClient
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from llmtraj.testing.standin import FIXTURES
from openai import AsyncOpenAI, OpenAI

from ..conftest import wait_records

STREAMS = FIXTURES
RESPONSES = ["text", "function_call", "reasoning_function_call"]
COMPLETIONS = ["text", "logprobs"]
API_KEY = "sk-test-responses-SECRET-0123456789"
NOWHERE = "http://127.0.0.1:9"


def fixture(folder: str, name: str) -> tuple[dict, dict, bytes]:
    """(the request without `stream`, the final object, the stream bytes)."""
    request = json.loads((STREAMS / folder / f"{name}.request.json").read_text())
    request.pop("stream", None)
    request["model"] = f"standin-{name}"
    expected = json.loads((STREAMS / folder / f"{name}.expected.json").read_text())
    return request, expected, (STREAMS / folder / f"{name}.sse").read_bytes()


def agent(proxy: ProxyProcess, session: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=API_KEY, max_retries=0)


def dumped(obj) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


def helper_final(response) -> dict:
    """The stream helper's final response, less the `parsed` / `parsed_arguments`
    it adds for structured outputs and strict tools (not part of the API's response)."""
    data = dumped(response)
    for item in data["output"]:
        for part in [item, *(item.get("content") or [])]:
            part.pop("parsed", None)
            part.pop("parsed_arguments", None)
    return data


def response_calls(client: OpenAI, name: str) -> tuple[dict, list[dict], dict]:
    """create, create(stream=True) as events, and the `responses.stream` helper's final response."""
    request, _, _ = fixture("responses", name)
    plain = client.responses.create(**request)
    events = [dumped(e) for e in client.responses.create(**request, stream=True)]
    with client.responses.stream(**request) as stream:
        final = stream.get_final_response()
    return dumped(plain), events, helper_final(final)


def completion_calls(client: OpenAI, name: str) -> tuple[dict, list[dict]]:
    request, _, _ = fixture("completions", name)
    plain = client.completions.create(**request)
    chunks = [dumped(c) for c in client.completions.create(**request, stream=True)]
    return dumped(plain), chunks


def joined_text(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


@pytest.fixture(scope="module")
def recorded(upstream, tmp_path_factory):
    traj = tmp_path_factory.mktemp("responses")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": traj}) as proxy:
        client = agent(proxy, "rec")
        got = {("responses", n): response_calls(client, n) for n in RESPONSES}
        got.update({("completions", n): completion_calls(client, n) for n in COMPLETIONS})
    return traj, got


@pytest.mark.parametrize("name", RESPONSES)
def test_responses_record_aggregates_to_the_final_response(recorded, name):
    traj, got = recorded
    _, expected, sse = fixture("responses", name)
    plain, events, final = got[("responses", name)]
    assert plain == expected and final == expected
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    records = [r for r in read_records(traj / "rec.jsonl") if r.request["model"] == f"standin-{name}" and r.api == "responses"]
    assert [r.stream for r in records] == [False, True, True]
    for record in records:
        assert record.response == expected and record.complete and not record.problems
    assert "".join(e.raw for e in records[1].events).encode() == sse
    assert API_KEY not in (traj / "rec.jsonl").read_text()


@pytest.mark.parametrize("name", COMPLETIONS)
def test_legacy_completions_record(recorded, name):
    traj, got = recorded
    _, expected, _ = fixture("completions", name)
    plain, chunks = got[("completions", name)]
    assert plain == expected
    assert joined_text(chunks) == {c["index"]: c["text"] for c in expected["choices"]}
    records = [r for r in read_records(traj / "rec.jsonl") if r.request["model"] == f"standin-{name}" and r.api == "completions"]
    assert [r.stream for r in records] == [False, True]
    assert all(r.response == expected for r in records)


def test_replay_answers_responses_and_completions_with_no_upstream(recorded):
    traj, got = recorded
    with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "replay", "llm_traj_path": traj}) as proxy:
        client = agent(proxy, "rec")
        for name in RESPONSES:
            assert response_calls(client, name) == got[("responses", name)]
        for name in COMPLETIONS:
            assert completion_calls(client, name) == got[("completions", name)]
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(**{**fixture("responses", "text")[0], "instructions": "different"})
        assert exc.value.body["code"].startswith("replay_")


def test_replay_streams_a_response_recorded_without_a_stream(upstream, tmp_path):
    request, expected, _ = fixture("responses", "reasoning_function_call")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}) as proxy:
        assert dumped(agent(proxy, "s").responses.create(**request)) == expected
    wait_records(tmp_path / "s.jsonl", 1)
    with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "replay", "llm_traj_path": tmp_path}) as proxy:
        with agent(proxy, "s").responses.stream(**request) as stream:
            types = [event.type for event in stream]
            final = stream.get_final_response()
    assert helper_final(final) == expected
    assert types[0] == "response.created" and types.count("response.output_item.done") == 3


def test_anticall_responses_and_completions(tmp_path):
    request, expected, _ = fixture("responses", "function_call")
    legacy, _, _ = fixture("completions", "text")

    async def main():
        with ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "anticall", "llm_traj_path": tmp_path}) as proxy:
            client = AsyncOpenAI(base_url=f"{proxy.url}/s/ac/v1", api_key=API_KEY, max_retries=0)
            async with AntiCallClient.from_control_file(tmp_path / "control.json") as driver:

                async def streamed():
                    async with client.responses.stream(**request) as stream:
                        return await stream.get_final_response()

                agent_call = asyncio.ensure_future(streamed())
                event = await driver.get_request("ac", 10)
                assert event.api == "responses" and event.stream is True and event.request["input"] == request["input"]
                await driver.send_delta(event, delta={"reasoning_content": "Weather needs the tool."})
                await driver.send_delta(event, "Let me check.")
                await driver.send_delta(event, delta={"tool_calls": [{"index": 0, "id": "call_9", "function": {
                    "name": "get_weather", "arguments": '{"location": "Paris, France"}'}}]})  # fmt: skip
                await driver.finish(event, usage={"prompt_tokens": 20, "completion_tokens": 9})
                deltas = await agent_call

                whole = asyncio.ensure_future(client.responses.create(**request))
                event = await driver.get_request("ac", 10)
                await driver.send_response(event, expected)  # in the Responses shape, as is
                whole = await whole

                text = asyncio.ensure_future(client.completions.create(**legacy))
                event = await driver.get_request("ac", 10)
                assert event.api == "completions"
                await driver.send_response(event, text="plain text, converted")
                text = await text
            await client.close()
        return deltas, whole, text

    deltas, whole, text = asyncio.run(asyncio.wait_for(main(), 60))
    assert [item.type for item in deltas.output] == ["reasoning", "message", "function_call"]
    assert deltas.output_text == "Let me check."
    call = deltas.output[2]
    assert call.name == "get_weather" and call.call_id == "call_9" and json.loads(call.arguments) == {"location": "Paris, France"}
    assert deltas.usage.input_tokens == 20 and deltas.usage.output_tokens == 9
    assert dumped(whole) == expected
    assert text.choices[0].text == "plain text, converted" and text.object == "text_completion"
    records = wait_records(tmp_path / "ac.jsonl", 3)
    assert [r.api for r in records] == ["responses", "responses", "completions"]
    assert records[0].response == helper_final(deltas) and records[1].response == expected
