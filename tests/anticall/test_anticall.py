"""Anti-call without mitmproxy: broker, answers, control API + client, ROCK
file channel, driver commands, and the chat-completions pieces they use."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from llmtraj.anticall.broker import (
    Broker,
    CallConflict,
    CallGone,
    Delta,
    Failure,
    Final,
    Finish,
    SessionEnded,
    ShuttingDown,
    UnknownCall,
)
from llmtraj.anticall.client import AntiCallClient, AntiCallError
from llmtraj.anticall.control import ControlServer
from llmtraj.anticall.control_file import control_file_for
from llmtraj.anticall.driver import (
    SESSION_END,
    UsageError,
    anti_call,
    parse_response,
    wait_for_exit,
)
from llmtraj.anticall.respond import answer
from llmtraj.anticall.rockfile import (
    RESPONSE_END,
    RESPONSE_START,
    ResponseReader,
    RockFileChannel,
    encode_payload,
    request_line,
)
from llmtraj.apis import API_BY_NAME
from llmtraj.core.sse import SSEParser

CHAT = API_BY_NAME["chat.completions"]
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM_REQUEST = {**REQUEST, "stream": True, "stream_options": {"include_usage": True}}
TOOL_CALLS = [{"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def aggregate(sse: bytes) -> dict:
    agg = CHAT.new_aggregator()
    parser = SSEParser()
    for block in parser.feed(sse) + parser.finish():
        agg.add(block)
    assert agg.done
    return agg.result()


async def body_bytes(result) -> bytes:
    if isinstance(result.body, bytes):
        return result.body
    return b"".join([chunk async for chunk in result.body])


# --- chat completions pieces ------------------------------------------------------


def test_completion_from_text_with_tool_calls():
    c = CHAT.completion_from_text(REQUEST, None, tool_calls=TOOL_CALLS, usage={"prompt_tokens": 1})
    choice = c["choices"][0]
    assert c["object"] == "chat.completion" and c["model"] == "m" and c["usage"] == {"prompt_tokens": 1}
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call == {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    plain = CHAT.completion_from_text(REQUEST, "hello")
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["total_tokens"] == 0
    with pytest.raises(ValueError, match=r"tool_calls\[0\]"):
        CHAT.completion_from_text(REQUEST, None, tool_calls=[{"name": "x"}])


def test_stream_builder_chunks_aggregate_and_usage_only_when_asked():
    stream = CHAT.new_stream(STREAM_REQUEST)
    sse = stream.delta({"content": "Hel"}) + stream.delta({"content": "lo"})
    sse += stream.delta({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    sse += stream.finish(usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    got = aggregate(sse)
    assert got["choices"][0]["message"]["content"] == "Hello"
    assert got["choices"][0]["finish_reason"] == "tool_calls"
    assert got["usage"]["total_tokens"] == 5
    assert stream.completion()["choices"][0]["message"] == got["choices"][0]["message"]
    first = json.loads(sse.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant" and first["usage"] is None
    plain = CHAT.new_stream(REQUEST)  # no include_usage: no usage chunk, no usage fields
    sse = plain.finish(finish_reason="length")
    assert b"usage" not in sse and sse.endswith(b"data: [DONE]\n\n")
    assert aggregate(sse)["choices"][0]["finish_reason"] == "length"
    assert plain.completion()["usage"]["total_tokens"] == 0


# --- broker -------------------------------------------------------------------


def test_broker_request_answer_duplicate_and_unknown():
    async def main():
        broker = Broker()
        call = broker.open_call("s1", CHAT, REQUEST, False)
        assert call.id == "s1:1" and broker.open_call("s1", CHAT, REQUEST, False).index == 2
        event = await broker.next_event("s1", 1)
        assert event.type == "request" and event.id == "s1:1" and event.request == REQUEST
        assert broker.held("s1")[0].state == "delivered"
        assert broker.respond("s1:1", {"id": "x"}, {"token_ids": [1]}) is True
        assert broker.respond("s1:1", {"id": "y"}) is False  # a repeated push is ignored
        assert await broker.next_piece(call) == Final({"id": "x"}) and call.extra == {"token_ids": [1]}
        with pytest.raises(CallConflict):
            broker.delta("s1:1", Delta({"content": "late"}))
        with pytest.raises(UnknownCall):
            broker.respond("s1:9", {})
        with pytest.raises(UnknownCall):
            broker.respond("nope", {})
        assert (await broker.next_event(None, 0)).id == "s1:2"  # any session
        assert await broker.next_event(None, 0.05) is None

    run(main())


def test_broker_streaming_rules():
    async def main():
        broker = Broker()
        call = broker.open_call("s", CHAT, REQUEST, True)
        broker.delta(call.id, Delta({"content": "a"}))
        with pytest.raises(CallConflict, match="streaming"):
            broker.respond(call.id, {"id": "x"})
        assert broker.finish(call.id, Finish("stop")) is True
        assert broker.finish(call.id, Finish("stop")) is False
        first, second = [await broker.next_piece(call) for _ in range(2)]
        assert first.delta == {"content": "a"} and b'"content":"a"' in first.data and second == Finish("stop")

    run(main())


def test_broker_release_tells_drivers_that_had_the_call():
    async def main():
        broker = Broker()
        quiet = broker.open_call("s", CHAT, REQUEST, False)
        seen = broker.open_call("s", CHAT, REQUEST, False)
        broker.release(quiet.id)  # never delivered: drivers just never see it
        assert (await broker.next_event("s", 0)).id == seen.id
        broker.release(seen.id)
        event = await broker.next_event("s", 0)
        assert event.type == "cancelled" and event.id == seen.id and "hung up" in event.reason
        with pytest.raises(CallGone, match="hung up"):
            broker.respond(seen.id, {})
        assert (await broker.next_piece(seen)).status == 499

    run(main())


def test_broker_hold_timeout():
    async def main():
        broker = Broker(hold_timeout=0.1)
        call = broker.open_call("s", CHAT, REQUEST, False)
        await broker.next_event("s", 0)
        start = time.monotonic()
        piece = await broker.next_piece(call)
        assert isinstance(piece, Failure) and piece.status == 504 and piece.code == "hold_timeout"
        assert 0.09 < time.monotonic() - start < 1
        assert (await broker.next_event("s", 0)).type == "cancelled"
        with pytest.raises(CallGone, match="timed out"):
            broker.fail(call.id, Failure(500, "x"))

    run(main())


def test_broker_session_end():
    async def main():
        broker = Broker()
        held = broker.open_call("s", CHAT, REQUEST, False)
        waiting = asyncio.ensure_future(broker.wait_call("s", 2, 5))
        await asyncio.sleep(0.01)
        info = broker.end_session("s", "agent exited")
        assert info.state == "ended" and info.end_reason == "agent exited"
        assert (await waiting).session_end
        piece = await broker.next_piece(held)
        assert piece.status == 410 and piece.code == "session_ended"
        for _ in range(2):  # the released call's request is not handed out; session_end, as often as asked
            assert (await broker.next_event("s", 0)).session_end
        assert (await broker.next_event(None, 0)).session_end  # once for "any"
        assert await broker.next_event(None, 0) is None
        with pytest.raises(SessionEnded, match="use a new session id"):
            broker.open_call("s", CHAT, REQUEST, False)
        assert broker.open_call("s2", CHAT, REQUEST, False).id == "s2:1"  # a new session on the same proxy
        assert broker.end_session("never-seen").state == "ended"  # a driver waiting for call 1 gets SESSION_END
        assert (await broker.wait_call("never-seen", 1, 0)).session_end

    run(main())


def test_broker_wait_call_by_index():
    async def main():
        broker = Broker()
        waiting = asyncio.ensure_future(broker.wait_call("s", 1, 5))
        await asyncio.sleep(0.01)
        call = broker.open_call("s", CHAT, REQUEST, False)
        assert (await waiting).id == call.id
        assert await broker.next_event("s", 0) is None  # delivered by index: not again in the queue
        assert (await broker.wait_call("s", 1, 0)).id == call.id  # asking again is fine while held
        broker.respond(call.id, {})
        with pytest.raises(CallGone):
            await broker.wait_call("s", 1, 0)
        assert await broker.wait_call("s", 2, 0.01) is None

    run(main())


def test_broker_shutdown_and_queues_without_pollers_stay_small():
    async def main():
        broker = Broker()
        for _ in range(1000):  # a driver that never polls (the ROCK file): answered calls leave nothing behind
            call = broker.open_call("s", CHAT, REQUEST, False)
            broker.respond(call.id, {})
        assert len(broker._all_events) <= 1 and len(broker._sessions["s"].events) <= 1
        held = broker.open_call("s", CHAT, REQUEST, False)
        broker.shutdown()
        assert (await broker.next_piece(held)).status == 503
        with pytest.raises(ShuttingDown):
            broker.open_call("s", CHAT, REQUEST, False)

    run(main())


# --- answers --------------------------------------------------------------------


def test_answer_shapes():
    async def main():
        broker = Broker()
        final = CHAT.completion_from_text(REQUEST, "hi", tool_calls=TOOL_CALLS)
        for stream in (False, True):
            call = broker.open_call("s", CHAT, STREAM_REQUEST if stream else REQUEST, stream)
            broker.respond(call.id, final)
            result = await answer(broker, call)
            body = await body_bytes(result)
            assert result.status == 200
            got = aggregate(body) if stream else json.loads(body)
            assert got["choices"][0]["message"]["tool_calls"] == final["choices"][0]["message"]["tool_calls"]
        # deltas to an agent that wants JSON: one completion
        call = broker.open_call("s", CHAT, REQUEST, False)
        broker.delta(call.id, Delta({"content": "a"}))
        broker.delta(call.id, Delta({"content": "b"}))
        broker.finish(call.id, Finish(usage={"total_tokens": 7}))
        got = json.loads(await body_bytes(await answer(broker, call)))
        assert got["choices"][0]["message"]["content"] == "ab" and got["usage"] == {"total_tokens": 7}
        # an error first: its status; an error mid-stream: an error event
        call = broker.open_call("s", CHAT, REQUEST, False)
        broker.fail(call.id, Failure(429, "slow down", "rate_limit", "rate"))
        result = await answer(broker, call)
        assert result.status == 429 and json.loads(result.body)["error"]["message"] == "slow down"
        call = broker.open_call("s", CHAT, STREAM_REQUEST, True)
        broker.delta(call.id, Delta({"content": "a"}))
        broker.fail(call.id, Failure(500, "driver crashed"))
        body = await body_bytes(await answer(broker, call))
        assert body.endswith(b'data: {"error":{"message":"driver crashed","type":"server_error","param":null,"code":null}}\n\n')
        # a "response" that is no completion cannot be streamed: 502, not a crash
        call = broker.open_call("s", CHAT, STREAM_REQUEST, True)
        broker.respond(call.id, {"choices": "nope"})
        assert (await answer(broker, call)).status == 502

    run(main())


def test_streamed_deltas_go_out_as_pushed():
    async def main():
        broker = Broker()
        call = broker.open_call("s", CHAT, STREAM_REQUEST, True)
        broker.delta(call.id, Delta({"content": "first"}))
        result = await answer(broker, call)
        chunks = result.body.__aiter__()
        assert b"first" in await chunks.__anext__()  # before anything else was pushed
        broker.delta(call.id, Delta({"content": "second"}))
        assert b"second" in await chunks.__anext__()
        broker.finish(call.id, Finish())
        assert (await chunks.__anext__()).endswith(b"data: [DONE]\n\n")

    run(main())


# --- control API and client ----------------------------------------------------------


class Control:
    """A broker and its control server on this loop, and a client of it."""

    async def __aenter__(self):
        self.broker = Broker()
        self.server = ControlServer(self.broker)
        self.server.bind(0)
        await self.server.start()
        self.client = AntiCallClient(self.server.url, self.server.token)
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()
        self.server.close()


def test_control_needs_the_token_and_describes_itself():
    async def main():
        async with Control() as c:
            async with httpx.AsyncClient(base_url=c.server.url) as http:
                for headers in ({}, {"authorization": "Bearer wrong"}):
                    r = await http.get("/openapi.json", headers=headers)
                    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                auth = {"authorization": f"Bearer {c.server.token}"}
                spec = (await http.get("/openapi.json", headers=auth)).json()
                assert spec["openapi"].startswith("3.1")
                assert "/v1/calls/{id}/response" in spec["paths"] and "ResponsePush" in spec["components"]["schemas"]
                assert (await http.get("/nope", headers=auth)).status_code == 404
                assert (await http.delete("/v1/sessions", headers=auth)).status_code == 405
                r = await http.post("/v1/calls/s:1/response", headers=auth, content=b'{"text": "x", "response": {}}')
                assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
                r = await http.get("/v1/requests/next?timeout=0.05", headers=auth)
                assert r.status_code == 204 and r.content == b""
                assert (await http.get("/v1/requests/next?timeout=x", headers=auth)).status_code == 400
                assert (await http.get("/v1/requests/next?session=..&timeout=0", headers=auth)).status_code == 400

    run(main())


def test_client_round_trips():
    async def main():
        async with Control() as c:
            broker, client = c.broker, c.client
            calls = [broker.open_call("s", CHAT, REQUEST, False) for _ in range(4)]
            events = [await client.get_request("s", 1) for _ in range(4)]
            assert [e.id for e in events] == [call.id for call in calls] and events[0].request == REQUEST
            assert (await client.send_response(events[0], "hello", extra={"logprobs": [-0.1]})).duplicate is False
            assert (await client.send_response(events[0], "again")).duplicate is True
            await client.send_response(events[1], tool_calls=TOOL_CALLS, usage={"total_tokens": 3})
            await client.send_delta(events[2], "x")
            await client.send_delta(events[2], delta={"reasoning_content": "hm"})
            with pytest.raises(AntiCallError) as err:
                await client.send_response(events[2], {"id": "x"})
            assert err.value.status == 409 and "streaming" in err.value.message
            await client.finish(events[2], finish_reason="length")
            await client.send_error(events[3], "no", 503, code="busy")
            pieces = [await broker.next_piece(call) for call in calls]
            assert pieces[0].response["choices"][0]["message"]["content"] == "hello" and calls[0].extra == {"logprobs": [-0.1]}
            assert pieces[1].response["choices"][0]["finish_reason"] == "tool_calls"
            assert pieces[2].delta == {"content": "x"} and b'"content":"x"' in pieces[2].data
            assert pieces[3] == Failure(503, "no", "server_error", "busy")
            with pytest.raises(AntiCallError) as err:
                await client.send_response("s:99", "x")
            assert err.value.status == 404
            with pytest.raises(AntiCallError) as err:
                await client.send_delta(events[0], "late")
            assert err.value.status == 409
            held = broker.open_call("s", CHAT, REQUEST, False)
            assert [info.id for info in await client.calls()] == [held.id]
            assert (await client.get_call(held.id)).request == REQUEST
            (session,) = await client.sessions()
            assert session.calls == 5 and session.held == 1
            assert (await client.end_session("s", "done")).state == "ended"
            assert (await client.get_request("s", 1)).session_end
            with pytest.raises(AntiCallError) as err:
                await client.send_delta(held.id, "x")
            assert err.value.status == 410 and "session ended" in err.value.message

    run(main())


def test_a_driver_that_hangs_up_during_a_long_poll_takes_nothing():
    async def main():
        async with Control() as c:
            async with httpx.AsyncClient(base_url=c.server.url, headers={"authorization": f"Bearer {c.server.token}"}) as http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.get("/v1/requests/next?timeout=5", timeout=0.2)
            await asyncio.sleep(0.05)
            call = c.broker.open_call("s", CHAT, REQUEST, False)
            assert (await c.client.get_request(timeout=1)).id == call.id  # not lost to the gone poller

    run(main())


def test_a_request_pipelined_behind_a_long_poll_is_answered_whole():
    """The hang-up watch on a long poll must not eat the next request's bytes."""

    async def main():
        async with Control() as c:
            reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
            auth = f"authorization: Bearer {c.server.token}\r\n"
            writer.write(f"GET /v1/requests/next?timeout=0.2 HTTP/1.1\r\nhost: x\r\n{auth}\r\n"
                         f"GET /v1/sessions HTTP/1.1\r\nhost: x\r\n{auth}\r\n".encode())  # fmt: skip
            first = await reader.readuntil(b"\r\n\r\n")
            second = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line for line in second.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
            body = await reader.readexactly(length)
            writer.close()
            return first, second, body

    first, second, body = run(main())
    assert first.startswith(b"HTTP/1.1 204 ") and second.startswith(b"HTTP/1.1 200 ") and json.loads(body) == []


def test_control_error_shapes():
    async def main():
        async with Control() as c:
            async with httpx.AsyncClient(base_url=c.server.url) as http:
                unauthorized = await http.get("/v1/calls")
                auth = {"authorization": f"Bearer {c.server.token}"}
                head = await http.head("/v1/calls", headers=auth)
                wrong = await http.put("/v1/calls/s:1/response", headers=auth, content=b"{}")
                return unauthorized, head, wrong

    unauthorized, head, wrong = run(main())
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    assert head.status_code == 405 and head.content == b""
    assert wrong.status_code == 405 and wrong.json()["error"] == {
        "message": "PUT is not allowed here; use POST", "type": "control_error", "code": "method_not_allowed"}


def test_control_file_location(tmp_path):
    assert control_file_for(tmp_path / "traj") == tmp_path / "traj" / "control.json"
    assert control_file_for(tmp_path / "all.jsonl") == tmp_path / "all.jsonl.control.json"


# --- ROCK file channel ---------------------------------------------------------------


def rock_parse_request_line(line: str) -> tuple[str, dict]:
    """ROCK's own ModelClient.parse_request_line, as naive as it is."""
    if "SESSION_END" in line:
        return "SESSION_END", {}
    meta_json = line.split("LLM_REQUEST_END")[1]
    request_json = line.split("LLM_REQUEST_END")[0].split("LLM_REQUEST_START")[1]
    return request_json, json.loads(meta_json)


NASTY = {
    "model": "m",
    "messages": [{"role": "user", "content": "a\nb\r\nc\u2028d\u0085e LLM_REQUEST_END{} LLM_RESPONSE_START SESSION_END é ✓"}],
}


def test_request_lines_survive_rocks_naive_reader():
    line = request_line(NASTY, 3).decode()
    assert line.count("\n") == 1 and line.endswith("\n") and line.isascii()
    (only,) = line.splitlines()  # also no Unicode line separator
    request_json, meta = rock_parse_request_line(only)
    assert json.loads(request_json) == NASTY and meta["index"] == 3
    assert b"LLM_" not in encode_payload(NASTY)


def test_response_reader_by_markers():
    pretty = json.dumps({"choices": [{"message": {"content": "x\nLLM_RESPONSE_END{\"index\": 9}\ny"}}]}, indent=2)
    data = (
        request_line(REQUEST, 1)
        + RESPONSE_START + pretty.encode() + RESPONSE_END + b'{"timestamp": 1, "index": 1}\n'
        + b"SESSION_END\n"
        + RESPONSE_START + b"{not json" + RESPONSE_END + b'{"index": 2}\n'
        + RESPONSE_START + b'"just text"' + RESPONSE_END + b'{"index": 3}\r\n'
    )  # fmt: skip
    reader = ResponseReader()
    found = []
    for i in range(len(data)):  # byte by byte: records split anywhere
        found += reader.feed(data[i : i + 1])
    assert [(p.index, p.problem is None) for p in found] == [(1, True), (2, False), (3, True)]
    assert found[0].response == json.loads(pretty) and found[2].response == "just text"
    assert ResponseReader().feed(data) == found


def test_rock_file_channel(tmp_path):
    async def main():
        broker = Broker()
        channel = RockFileChannel(broker, str(tmp_path / "{session}.log"), "default")
        channel.start()
        try:
            call = broker.open_call("agent-1", CHAT, NASTY, False)
            log = tmp_path / "agent-1.log"
            (line,) = log.read_text().splitlines()
            assert json.loads(rock_parse_request_line(line)[0]) == NASTY
            response = CHAT.completion_from_text(NASTY, "multi\nline\nanswer")
            with open(log, "a") as fh:  # as ROCK's driver appends it: raw JSON, pretty-printed
                fh.write(f"LLM_RESPONSE_START{json.dumps(response, indent=2)}LLM_RESPONSE_END{{\"index\": 1}}\n")
            assert await asyncio.wait_for(broker.next_piece(call), 2) == Final(response)
            broker.end_session("agent-1")
            assert log.read_text().endswith("SESSION_END\n")
        finally:
            channel.close()
        single = RockFileChannel(broker, str(tmp_path / "LLMService.log"), "default")
        assert single.path_for("default") == tmp_path / "LLMService.log" and single.path_for("other") is None

    run(main())


# --- driver commands -------------------------------------------------------------------


def test_parse_response():
    assert parse_response('{"id": "x"}') == {"id": "x"}
    assert parse_response('"text"') == "text"
    for bad in ("text", "[1]", "3"):
        with pytest.raises(UsageError):
            parse_response(bad)


def test_anti_call_steps_like_rock():
    async def main():
        async with Control() as c:
            broker, client = c.broker, c.client
            waiting = asyncio.ensure_future(anti_call(client, "s", 0, None))
            await asyncio.sleep(0.05)
            first = broker.open_call("s", CHAT, {"n": 1}, False)
            assert json.loads(await waiting) == {"n": 1}
            waiting = asyncio.ensure_future(anti_call(client, "s", 1, "one"))
            assert (await broker.next_piece(first)).response["choices"][0]["message"]["content"] == "one"
            broker.open_call("s", CHAT, {"n": 2}, False)
            assert json.loads(await waiting) == {"n": 2}
            assert json.loads(await anti_call(client, "s", 1, "one")) == {"n": 2}  # a repeated push: ignored
            broker.end_session("s")
            warnings = []
            assert await anti_call(client, "s", 2, "two", warn=warnings.append) == SESSION_END
            assert "not answered" in warnings[0]
            with pytest.raises(AntiCallError, match="no call 1"):
                await anti_call(client, "t", 0, None, timeout=0.1)

    run(main())


def test_wait_for_exit_returns_when_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.4)"])
    start = time.monotonic()
    wait_for_exit(proc.pid)
    waited = time.monotonic() - start
    proc.wait()
    assert 0.3 < waited < 1.5
    start = time.monotonic()
    wait_for_exit(proc.pid)  # gone (reaped): at once
    assert time.monotonic() - start < 0.1
