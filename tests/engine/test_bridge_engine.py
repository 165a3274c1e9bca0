"""The bridge against the real vLLM CPU engine: the anthropic SDK (Messages)
and the openai SDK (Responses) on an engine that speaks only chat completions
for them, with token capture. Answers come in the agent's own API, streamed
event by event (the first before the engine's stream has ended), and the
records hold the engine's complete tokens.

The tiny random model writes nonsense; a tool call is forced (as in
test_capture_e2e) by the route's sampling control imposing a `structured_outputs`
regex, and parsed by `--tool-call-parser hermes`."""

from __future__ import annotations

import json
import statistics
import time

import pytest
from anthropic import Anthropic
from llmtraj.cli.proxy_process import ProxyProcess
from openai import OpenAI

from ..conftest import wait_records
from .test_capture_e2e import TOOL_CALL

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}
FORCED = "tiny-tool"  # the route that forces the tool call
# The first test here may be the one that starts the engine (a minute or more, longer on a busy machine).
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def bridge(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    config = root / "upstreams.toml"
    config.write_text(f"""
[providers.engine]
base_url = "{engine.url}/v1"
kind = "vllm"
upstream_api = "chat.completions"
capture_tokens = true

[models."{engine.model}"]
provider = "engine"

[models."{FORCED}"]
provider = "engine"
upstream_model = "{engine.model}"
sampling = {{fixed = {{structured_outputs = {{regex = {json.dumps(TOOL_CALL)}}}}}}}
""")
    with ProxyProcess(upstream="http://127.0.0.1:9", options={
        "llm_traj_mode": "record", "llm_traj_path": root / "traj", "llm_traj_config": config,
    }) as proxy:  # fmt: skip
        yield proxy, root / "traj"


def claude(proxy, session) -> Anthropic:
    return Anthropic(base_url=f"{proxy.url}/s/{session}", api_key="sk-ant-dummy", max_retries=0)


def codex(proxy, session) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="sk-dummy", max_retries=0)


def check_tokens(engine, record) -> None:
    assert record.bridge is not None and record.bridge.status == 200
    assert record.tokens is not None and record.tokens.complete, record.tokens and record.tokens.problems
    sent = record.bridge.request
    assert record.tokens.prompt_ids == engine.tokenize(messages=sent["messages"], **({"tools": sent["tools"]} if "tools" in sent else {}))
    usage = record.bridge.response["usage"]
    assert len(record.tokens.choices[0].completion_ids) == usage["completion_tokens"]


def test_messages_create(engine, bridge, session):
    proxy, traj = bridge
    message = claude(proxy, session).messages.create(
        model=engine.model, max_tokens=24, temperature=0, system="You are terse.",
        messages=[{"role": "user", "content": "Say something."}])  # fmt: skip
    assert message.type == "message" and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.api == "anthropic.messages" and record.response["content"] == message.model_dump(exclude_none=True)["content"]
    check_tokens(engine, record)


def test_messages_stream_with_tools(engine, bridge, session):
    proxy, traj = bridge
    arrivals = []
    with claude(proxy, session).messages.stream(
        model=FORCED, max_tokens=80, temperature=0, tools=[ANTHROPIC_TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:  # fmt: skip
        for event in stream:
            arrivals.append((time.time(), event.type))
        message = stream.get_final_message()
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"}) and message.stop_reason == "tool_use"
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    check_tokens(engine, record)
    assert record.tokens.choices[0].finish_reason == "tool_calls"
    assert record.bridge.request["structured_outputs"] == {"regex": TOOL_CALL}  # the route's sampling control
    assert "input_json" in {kind for _, kind in arrivals}  # the arguments streamed as they came


# Long enough an answer for "live" to be told from "relayed at the end": on a quiet machine the tiny model makes
# 200 tokens in ~20 ms, faster than the agent gets its first text through the bridge.
LONG = 1500
LAG = 1.0  # seconds: what the agent's text may trail the engine's events by (at 1500 tokens the engine takes 5 s or more)


def assert_live(deltas: list[tuple[float, str]], bridge) -> None:
    """Streamed live: the agent's text came as the engine's events came, not after
    its stream. Judged against when the engine's events reached the proxy (the
    record's `event_times`), not its stream's end: the engine on a busy CPU can
    send a run of tokens at once, and then so does the bridge. (CI once saw a
    Responses stream's text only after the engine's 6 s stream had ended: the
    openai SDK's first stream in the process, building its models; see `warm_up`.)"""
    engine = [bridge.first_byte_at + t for t in bridge.event_times]
    agent = [t for t, _ in deltas]
    first_lag = agent[0] - engine[1]  # (the engine's first event names the role; its text starts with the next)
    median_lag = statistics.median(agent) - statistics.median(engine)
    spread = engine[-1] - engine[0]
    assert len(agent) > 5 and first_lag < LAG and median_lag < LAG, (first_lag, median_lag, spread)


def warm_up(stream) -> None:
    """Runs one short stream of the SDK's before the timed one: an SDK's first
    stream in a process builds its event models first (seen: 1.7 s of the openai
    SDK's Responses helper on a busy machine, more in CI), while the events wait."""
    with stream as events:
        events.until_done()


def test_messages_stream_text_arrives_event_by_event(engine, bridge, session):
    proxy, traj = bridge
    deltas = []
    warm_up(claude(proxy, f"{session}-warm-up").messages.stream(
        model=engine.model, max_tokens=4, messages=[{"role": "user", "content": "Hi."}]))  # fmt: skip
    with claude(proxy, session).messages.stream(
        model=engine.model, max_tokens=LONG, temperature=0, messages=[{"role": "user", "content": "Tell a story."}]) as stream:  # fmt: skip
        for text in stream.text_stream:
            deltas.append((time.time(), text))
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    check_tokens(engine, record)
    assert_live(deltas, record.bridge)
    assert "".join(text for _, text in deltas) == record.bridge.response["choices"][0]["message"]["content"]


def test_responses_stream_text_arrives_event_by_event(engine, bridge, session):
    proxy, traj = bridge
    deltas, last = [], None
    warm_up(codex(proxy, f"{session}-warm-up").responses.stream(model=engine.model, input="Hi.", max_output_tokens=4))
    with codex(proxy, session).responses.stream(model=engine.model, input="Tell a story.", max_output_tokens=LONG,
                                                temperature=0) as stream:  # fmt: skip
        for event in stream:
            last = event
            if event.type == "response.output_text.delta":
                deltas.append((time.time(), event.delta))
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    check_tokens(engine, record)
    assert_live(deltas, record.bridge)
    assert "".join(delta for _, delta in deltas) == record.bridge.response["choices"][0]["message"]["content"]
    if record.bridge.response["choices"][0]["finish_reason"] == "length":  # the random model rarely stops by itself
        assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_responses_create(engine, bridge, session):
    proxy, traj = bridge
    response = codex(proxy, session).responses.create(model=engine.model, input="Say something.", instructions="Be terse.",
                                                      max_output_tokens=24, temperature=0)  # fmt: skip
    assert response.status in ("completed", "incomplete") and response.output_text
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.api == "responses"
    check_tokens(engine, record)


def test_responses_stream_with_function_tools(engine, bridge, session):
    proxy, traj = bridge
    with codex(proxy, session).responses.stream(model=FORCED, input="Weather in Paris?", tools=[RESPONSES_TOOL],
                                                max_output_tokens=80, temperature=0) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    [call] = [item for item in final.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.delta") >= 1  # the arguments streamed as they came
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    check_tokens(engine, record)
