"""Exports of a really recorded trajectory: OpenAI chat fine-tuning JSONL, HAR
1.2 and ATIF, each checked by a validator that encodes the format's rules."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from llmtraj.cli.demo import TOOLS, scripted_agent
from llmtraj.core.record import CallError, CallRecord
from llmtraj.core.store import read_records
from llmtraj.inspect.export import export
from llmtraj.inspect.export.atif import atif_documents
from llmtraj.inspect.export.common import Skipped
from llmtraj.inspect.export.har import har
from llmtraj.inspect.export.openai_chat import openai_chat_samples
from llmtraj.testing.standin import ANSWER, REASONING, TEXT, TOOL_CALLS
from openai import APIStatusError, OpenAI

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "Say hello"}]


def flaky_agent(base_url: str, answer_headers: dict[str, str] | None = None, drop: bool = True) -> None:
    """A call the upstream fails (500), a streamed answer with reasoning, and
    (with `drop`) a stream the upstream cuts short."""
    client = OpenAI(base_url=base_url, api_key="sk-test-export-0123456789", max_retries=0)
    with pytest.raises(APIStatusError):
        client.chat.completions.create(model="standin-error500", messages=MESSAGES)
    list(client.chat.completions.create(
        model="standin-reasoning", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers=answer_headers,
    ))  # fmt: skip
    if drop:
        with pytest.raises(Exception):
            list(client.chat.completions.create(model="standin-drop", messages=MESSAGES, stream=True))


@pytest.fixture(scope="module")
def records(proxy, traj_dir) -> list[CallRecord]:
    """Recorded once for the module: `demo` (a streamed call asking for two
    tools, then a plain call with their results) and `flaky` (failed, ok with
    reasoning, incomplete)."""
    scripted_agent(f"{proxy.url}/s/demo/v1")
    flaky_agent(f"{proxy.url}/s/flaky/v1")
    wait_records(traj_dir / "demo.jsonl", 2)
    wait_records(traj_dir / "flaky.jsonl", 3)
    return list(read_records(traj_dir))


def record_of(records: list[CallRecord], session: str, index: int) -> CallRecord:
    return next(r for r in records if r.session == session and r.index == index)


# ------------------------------------------------------------ openai-chat

FT_FIELDS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "weight"},
    "tool": {"role", "content", "tool_call_id"},
}


def check_fine_tuning_sample(sample: dict) -> None:
    """OpenAI's chat fine-tuning format: roles system/user/assistant/tool with
    their fields only; an assistant message has content or tool calls; a tool
    result answers a tool call an earlier assistant message made; tools are
    function definitions with a name and parameters."""
    assert set(sample) <= {"messages", "tools", "parallel_tool_calls"}
    messages = sample["messages"]
    assert isinstance(messages, list) and messages
    call_ids: set[str] = set()
    for message in messages:
        role = message["role"]
        assert role in FT_FIELDS, message
        assert set(message) <= FT_FIELDS[role], message
        if role == "assistant":
            assert message.get("content") or message.get("tool_calls"), message
            assert isinstance(message.get("content", ""), str)
            for call in message.get("tool_calls", []):
                assert set(call) == {"id", "type", "function"} and call["type"] == "function"
                assert isinstance(call["id"], str) and set(call["function"]) == {"name", "arguments"}
                assert isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)
                call_ids.add(call["id"])
            assert message.get("weight", 1) in (0, 1)
        elif role == "tool":
            assert message["tool_call_id"] in call_ids, message
            assert isinstance(message["content"], str)
        else:
            assert isinstance(message["content"], str if role == "system" else (str, list))
    assert any(m["role"] == "assistant" for m in messages), "nothing to learn"
    for tool in sample.get("tools", []):
        assert set(tool) == {"type", "function"} and tool["type"] == "function"
        fn = tool["function"]
        assert set(fn) <= {"name", "description", "parameters"}
        assert isinstance(fn["name"], str) and isinstance(fn["parameters"], dict)
    assert isinstance(sample.get("parallel_tool_calls", True), bool)


def test_openai_chat_per_call(records):
    skipped: list[Skipped] = []
    samples = list(openai_chat_samples(records, "per_call", skipped))
    for sample in samples:
        check_fine_tuning_sample(sample)
    assert len(samples) == 3  # demo #1, demo #2, flaky #2
    assert sorted((s.session, s.index, s.reason.split(" ")[0]) for s in skipped) == [
        ("flaky", 1, "failed"), ("flaky", 3, "incomplete")]  # fmt: skip
    assert str(skipped[0]).startswith("flaky #")

    first, second, flaky = samples
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    calls = first["messages"][-1]["tool_calls"]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == TOOL_CALLS
    assert "content" not in first["messages"][-1]  # null content is left out next to tool calls
    assert [t["function"]["name"] for t in first["tools"]] == [t["function"]["name"] for t in TOOLS]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert second["messages"][-1] == {"role": "assistant", "content": TEXT}
    assert "tools" not in second  # the second request had none
    assert flaky["messages"][-1] == {"role": "assistant", "content": ANSWER}  # no reasoning_content


def test_openai_chat_per_session_is_the_final_conversation(records):
    per_call = list(openai_chat_samples(records, "per_call"))
    per_session = list(openai_chat_samples(records, "per_session"))
    assert per_session == [per_call[1], per_call[2]]


def test_openai_chat_keeps_only_what_fine_tuning_accepts(records):
    demo2 = record_of(records, "demo", 2)
    request = json.loads(json.dumps(demo2.request))
    request["messages"][0]["role"] = "developer"
    request["messages"][2].update(refusal=None, annotations=[], audio=None, reasoning_content="hmm")
    request["parallel_tool_calls"] = False
    request["tools"] = [{"type": "function", "function": {"name": "noargs", "strict": True}}]
    response = json.loads(json.dumps(demo2.response))
    response["choices"][0]["message"].update(refusal=None, annotations=[], reasoning_content="thinking")
    (sample,) = openai_chat_samples([demo2.model_copy(update={"request": request, "response": response})])
    check_fine_tuning_sample(sample)
    assert sample["messages"][0]["role"] == "system"
    assert sample["messages"][2] == {"role": "assistant", "tool_calls": sample["messages"][2]["tool_calls"]}
    assert sample["messages"][-1] == {"role": "assistant", "content": TEXT}
    assert sample["parallel_tool_calls"] is False
    no_parameters = {"type": "object", "properties": {}}
    assert sample["tools"] == [{"type": "function", "function": {"name": "noargs", "parameters": no_parameters}}]


def test_openai_chat_skips_calls_it_cannot_express(records):
    demo2 = record_of(records, "demo", 2)
    request = json.loads(json.dumps(demo2.request))
    del request["messages"][2]  # the assistant message that made the tool calls
    empty = json.loads(json.dumps(demo2.response))
    empty["choices"][0]["message"] = {"role": "assistant", "content": None}
    skipped: list[Skipped] = []
    samples = list(openai_chat_samples([
        demo2.model_copy(update={"request": request}),
        demo2.model_copy(update={"index": 3, "response": empty}),
    ], skipped=skipped))  # fmt: skip
    assert samples == []
    assert [s.reason for s in skipped] == [
        "a tool result answers call 'call_standin_0', which no earlier assistant message made",
        "an assistant message has neither content nor tool calls",
    ]


def test_export_openai_chat_lines(records):
    lines = list(export(records, "openai-chat", granularity="per_session"))
    assert [json.loads(line) for line in lines] == list(openai_chat_samples(records, "per_session"))
    assert all("\n" not in line for line in lines)
    with pytest.raises(ValueError, match="granularity"):
        export(records, "openai-chat", granularity="per_turn")
    with pytest.raises(ValueError, match="format"):
        export(records, "csv")


# -------------------------------------------------------------------- har


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_har(doc: dict) -> None:
    """HAR 1.2's required fields and their types."""
    log = doc["log"]
    assert log["version"] == "1.2"
    assert isinstance(log["creator"]["name"], str) and isinstance(log["creator"]["version"], str)
    for entry in log["entries"]:
        assert datetime.fromisoformat(entry["startedDateTime"]).tzinfo is not None
        assert _number(entry["time"]) and entry["time"] >= 0
        assert entry["cache"] == {}
        timings = entry["timings"]
        assert all(_number(timings[k]) and timings[k] >= 0 for k in ("send", "wait", "receive"))
        assert entry["time"] == pytest.approx(sum(v for v in timings.values() if v >= 0), abs=0.01)
        for part in ("request", "response"):
            message = entry[part]
            assert isinstance(message["httpVersion"], str)
            assert isinstance(message["cookies"], list)
            for h in message["headers"]:
                assert set(h) == {"name", "value"} and all(isinstance(v, str) for v in h.values())
            assert isinstance(message["headersSize"], int) and isinstance(message["bodySize"], int)
        request, response = entry["request"], entry["response"]
        assert isinstance(request["method"], str) and request["url"].startswith("http")
        assert isinstance(request["queryString"], list)
        if "postData" in request:
            assert isinstance(request["postData"]["mimeType"], str) and isinstance(request["postData"]["text"], str)
        assert isinstance(response["status"], int) and isinstance(response["statusText"], str)
        content = response["content"]
        assert isinstance(content["size"], int) and isinstance(content["mimeType"], str)
        assert content["size"] == len(content["text"].encode())
        assert response["redirectURL"] == ""


def test_har(records):
    doc = json.loads(export(records, "har"))
    check_har(doc)
    assert doc["log"]["creator"]["name"] == "llm-traj"
    entries = doc["log"]["entries"]
    assert len(entries) == len(records) == 5
    assert [e["startedDateTime"] for e in entries] == sorted(e["startedDateTime"] for e in entries)
    by_call = {(e["_llm_traj"]["session"], e["_llm_traj"]["index"]): e for e in entries}

    stream = by_call["demo", 1]
    record = record_of(records, "demo", 1)
    assert stream["response"]["content"]["text"] == "".join(e.raw for e in record.events)
    assert stream["response"]["content"]["mimeType"].startswith("text/event-stream")
    assert json.loads(stream["request"]["postData"]["text"]) == record.request
    assert {h["name"].lower(): h["value"] for h in stream["request"]["headers"]}["authorization"] == "[REDACTED]"
    assert stream["response"]["status"] == 200 and stream["response"]["statusText"] == "OK"

    plain = by_call["demo", 2]
    assert json.loads(plain["response"]["content"]["text"]) == record_of(records, "demo", 2).response

    failed = by_call["flaky", 1]
    assert failed["response"]["status"] == 500 and "_error" not in failed["response"]
    dropped = by_call["flaky", 3]
    assert dropped["response"]["status"] == 200
    assert dropped["response"]["_error"].startswith("upstream_disconnected: ")
    assert dropped["response"]["content"]["text"].startswith("data: ")


def test_har_call_without_response(records):
    record = record_of(records, "demo", 2).model_copy(update={
        "status": None, "response_headers": [], "response": None, "complete": False,
        "error": CallError(kind="upstream_unreachable", message="connection refused"),
    })  # fmt: skip
    record.timings = record.timings.model_copy(update={"response_headers_at": None, "first_byte_at": None})
    doc = har([record])
    check_har(doc)
    (entry,) = doc["log"]["entries"]
    response = entry["response"]
    assert response["status"] == 0 and response["statusText"] == ""
    assert response["content"] == {"size": 0, "mimeType": "", "text": ""}
    assert response["_error"] == "upstream_unreachable: connection refused"
    assert entry["timings"]["receive"] == 0


# ------------------------------------------------------------------- atif

STEP_FIELDS = {"step_id", "timestamp", "source", "model_name", "reasoning_effort", "message",
               "reasoning_content", "tool_calls", "observation", "metrics", "extra"}  # fmt: skip
AGENT_ONLY = {"model_name", "reasoning_effort", "reasoning_content", "tool_calls", "metrics"}
METRICS_FIELDS = {"prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "prompt_token_ids",
                  "completion_token_ids", "logprobs", "extra"}  # fmt: skip
FINAL_FIELDS = {"total_prompt_tokens", "total_completion_tokens", "total_cached_tokens", "total_cost_usd",
                "total_steps", "extra"}  # fmt: skip


def check_atif(doc: dict) -> None:
    """The structure ATIF (harbor's RFC 0001) requires: root, agent, steps with
    step_ids 1, 2, 3, ..., agent-only fields on agent steps only, tool calls
    with an id, a name and object arguments, observation results that point at
    a tool call of the same step (harbor's validator checks the same step)."""
    assert set(doc) <= {"schema_version", "session_id", "agent", "steps", "notes", "final_metrics", "extra"}
    assert doc["schema_version"].startswith("ATIF-v1.")
    assert isinstance(doc["session_id"], str) and doc["session_id"]
    agent = doc["agent"]
    assert set(agent) <= {"name", "version", "model_name", "extra"}
    assert isinstance(agent["name"], str) and isinstance(agent["version"], str)
    assert isinstance(agent.get("model_name", ""), str)
    seen_calls: set[str] = set()
    for number, step in enumerate(doc["steps"], start=1):
        assert set(step) <= STEP_FIELDS, step
        assert step["step_id"] == number
        assert step["source"] in ("system", "user", "agent")
        assert isinstance(step["message"], str)
        datetime.fromisoformat(step["timestamp"])
        if step["source"] != "agent":
            assert not AGENT_ONLY & set(step), step
        ids = set()
        for call in step.get("tool_calls", []):
            assert set(call) == {"tool_call_id", "function_name", "arguments"}
            assert isinstance(call["tool_call_id"], str) and isinstance(call["function_name"], str)
            assert isinstance(call["arguments"], dict)
            assert call["tool_call_id"] not in seen_calls
            ids.add(call["tool_call_id"])
        seen_calls |= ids
        if "observation" in step:
            assert step["observation"]["results"]
            for result in step["observation"]["results"]:
                assert set(result) <= {"source_call_id", "content", "subagent_trajectory_ref"}
                assert result.get("source_call_id", next(iter(ids), None)) in ids
                assert isinstance(result.get("content", ""), str)
        metrics = step.get("metrics", {})
        assert set(metrics) <= METRICS_FIELDS
        for key in {"prompt_tokens", "completion_tokens", "cached_tokens"} & set(metrics):
            assert isinstance(metrics[key], int)
        assert all(_number(v) for v in metrics.get("logprobs", []))
        assert isinstance(step.get("extra", {}), dict)
    final = doc.get("final_metrics", {})
    assert set(final) <= FINAL_FIELDS
    assert final.get("total_steps", len(doc["steps"])) == len(doc["steps"])


def test_atif(records):
    skipped: list[Skipped] = []
    docs = list(atif_documents(records, agent_name="scripted", agent_version="1", skipped=skipped))
    for doc in docs:
        check_atif(doc)
    assert [d["session_id"] for d in docs] == ["demo", "flaky"]
    assert [(s.session, s.index) for s in skipped] == [("flaky", 1), ("flaky", 3)]

    demo = docs[0]
    assert demo["agent"]["name"] == "scripted" and demo["agent"]["model_name"] == "standin-tools"
    assert demo["agent"]["extra"]["user_agent"] == "llm-traj-demo (scripted agent)"
    steps = demo["steps"]
    assert [s["source"] for s in steps] == ["system", "user", "agent", "agent"]
    assert steps[1]["message"] == "What's the weather and time in Paris?"
    asked = steps[2]
    assert asked["message"] == "" and asked["metrics"]["prompt_tokens"] == 20
    assert [(c["tool_call_id"], c["function_name"], c["arguments"]) for c in asked["tool_calls"]] == TOOL_CALLS
    results = asked["observation"]["results"]
    assert [r["source_call_id"] for r in results] == ["call_standin_0", "call_standin_1"]
    assert json.loads(results[0]["content"])["tool"] == "get_weather"
    answer = steps[3]
    assert answer["message"] == TEXT and answer["model_name"] == "standin-text"
    assert answer["extra"]["llm_traj"] == {"index": 2, "finish_reason": "stop"}
    assert "observation" not in answer
    metrics = [s["metrics"] for s in steps if "metrics" in s]
    assert demo["final_metrics"] == {
        "total_prompt_tokens": sum(m["prompt_tokens"] for m in metrics),
        "total_completion_tokens": sum(m["completion_tokens"] for m in metrics),
        "total_steps": 4,
    }

    flaky = docs[1]
    assert [s["source"] for s in flaky["steps"]] == ["user", "agent"]
    assert flaky["steps"][1]["reasoning_content"] == REASONING
    assert flaky["steps"][1]["message"] == ANSWER


def test_atif_compacted_history_restarts_where_it_differs(records):
    """An agent that replaced its history by a summary: the request's messages
    from the first one that differs become steps; malformed arguments are kept."""
    first, second = record_of(records, "demo", 1), record_of(records, "demo", 2)
    request = json.loads(json.dumps(second.request))
    request["messages"] = [request["messages"][0], {"role": "user", "content": "Summary: it is sunny. Answer."}]
    response = json.loads(json.dumps(second.response))
    response["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]
    (doc,) = atif_documents([first, second.model_copy(update={"request": request, "response": response})])
    check_atif(doc)
    assert [s["source"] for s in doc["steps"]] == ["system", "user", "agent", "user", "agent"]
    assert doc["steps"][3]["message"].startswith("Summary:")
    assert "observation" not in doc["steps"][2]  # the tool results were compacted away
    assert doc["steps"][4]["tool_calls"][0]["arguments"] == {"raw": "{not json"}


def test_export_atif_lines(records):
    lines = list(export(records, "atif"))
    assert [json.loads(line)["session_id"] for line in lines] == ["demo", "flaky"]
    assert json.loads(lines[0])["agent"]["name"] == "unknown"


def test_atif_re_serialised_arguments_and_side_calls_do_not_duplicate_steps(records):
    """An agent that sends a tool call back with its arguments re-serialised is
    still continuing its conversation; a side call with a prompt of its own (a
    title) is kept apart from the conversation, in extra.side_conversations."""
    first, second = record_of(records, "demo", 1), record_of(records, "demo", 2)
    (plain,) = atif_documents([first, second])
    request = json.loads(json.dumps(second.request))
    resent = [m for m in request["messages"] if m.get("tool_calls")]
    assert resent, "the demo's second call sends a tool call back"
    for message in resent:
        for call in message["tool_calls"]:
            call["function"]["arguments"] = json.dumps(json.loads(call["function"]["arguments"]), indent=2)
    title = first.model_copy(update={"index": 2, "request": {"model": "m", "messages": [
        {"role": "system", "content": "Write a short title."}, {"role": "user", "content": "the task"}]}})  # fmt: skip
    (doc,) = atif_documents([first, title, second.model_copy(update={"index": 3, "request": request})])
    check_atif(doc)
    assert [(s["source"], s["message"]) for s in doc["steps"]] == [(s["source"], s["message"]) for s in plain["steps"]]
    (side,) = doc["extra"]["side_conversations"]
    assert [s["source"] for s in side["steps"]] == ["system", "user", "agent"]


def test_atif_names_the_agent_from_its_calls(records):
    first = record_of(records, "demo", 1)
    claude = first.model_copy(update={"request_headers": [("User-Agent", "claude-cli/2.1.0 (external, cli)")]})
    (doc,) = atif_documents([claude])
    assert (doc["agent"]["name"], doc["agent"]["version"]) == ("Claude Code", "2.1.0")
    (doc,) = atif_documents([claude], agent_name="mine", agent_version="7")
    assert (doc["agent"]["name"], doc["agent"]["version"]) == ("mine", "7")
