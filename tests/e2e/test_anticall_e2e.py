"""Anti-call mode end to end: real mitmdump with the addon, the real openai SDK
as the agent, and each driver channel (Python client, `llm-traj anti-call` /
`watch-agent`, the ROCK log file, `llm-traj run`) as the trainer."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmtraj.anticall import AntiCallClient, AntiCallError
from llmtraj.cli.proxy_process import ProxyProcess, ProxyStartError
from mitmproxy.options import Options
from openai import APIError, APIStatusError, AsyncOpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from ..conftest import wait_records

API_KEY = "sk-test-anticall-SECRET-0123456789"
NOWHERE = "http://127.0.0.1:9"  # anti-call never connects upstream for LLM calls
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_CALLS = [{"id": "call_w", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
LLM_TRAJ = str(Path(sys.executable).with_name("llm-traj"))
NEWLINES = "line 1\nline 2\r\n\n  indented\tLLM_RESPONSE_END{\"index\": 1}\nSESSION_END\n\u2028end"


def start_proxy(traj: Path, extra_args=(), **options) -> ProxyProcess:
    options = {"llm_traj_mode": "anticall", "llm_traj_path": traj, **options}
    return ProxyProcess(upstream=NOWHERE, options=options, extra_args=extra_args).start()


@pytest.fixture(scope="module")
def traj(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("anticall")


@pytest.fixture(scope="module")
def proxy(traj):
    p = start_proxy(traj, llm_traj_rock_file=traj / "rock" / "{session}.log")
    try:
        yield p
    finally:
        p.stop()


def agent(proxy: ProxyProcess, session: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=API_KEY, max_retries=0)


def driver(traj: Path) -> AntiCallClient:
    return AntiCallClient.from_control_file(traj / "control.json")


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(stream) -> list:
    return [chunk async for chunk in await stream]


def aggregate(chunks) -> dict:
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.current_completion_snapshot.model_dump(exclude_unset=True)


def test_control_file_is_private(proxy, traj):
    info = json.loads((traj / "control.json").read_text())
    assert info["url"].startswith("http://127.0.0.1:") and len(info["token"]) > 30
    assert (traj / "control.json").stat().st_mode & 0o777 == 0o600


def test_tool_call_replies_and_what_the_trajectory_keeps(proxy, traj, session):
    async def main():
        a = agent(proxy, session)
        async with driver(traj) as d:
            plain = asyncio.ensure_future(a.chat.completions.create(model="policy", messages=MESSAGES, tools=TOOLS))
            event = await d.get_request(session, 10)
            assert event.type == "request" and event.id == f"{session}:1" and event.stream is False
            assert event.request["tools"] == TOOLS and event.request["messages"] == MESSAGES
            training = {"token_ids": [101, 102], "logprobs": [-0.5, -0.25], "policy_version": 7}
            await d.send_response(event, text="Let me look.", tool_calls=TOOL_CALLS,
                                  usage={"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}, extra=training)  # fmt: skip
            reply = await plain

            streamed = asyncio.ensure_future(collect(a.chat.completions.create(
                model="policy", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": True})))  # fmt: skip
            event = await d.get_request(session, 10)
            assert event.stream is True
            await d.send_response(event, reply.model_dump(exclude_unset=True))  # a full completion, made into chunks
            chunks = await streamed
        await a.close()
        return reply, chunks, training

    reply, chunks, training = run(main())
    message = reply.choices[0].message
    assert message.content == "Let me look." and reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert reply.usage.total_tokens == 14 and "token_ids" not in reply.model_dump_json()
    streamed = aggregate(chunks)
    assert streamed["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert streamed["usage"]["total_tokens"] == 14

    first, second = wait_records(traj / f"{session}.jsonl", 2)
    assert first.mode == "anticall" and first.status == 200 and first.complete
    # where the agent meant to go: its base URL (the proxy's), not the placeholder target
    assert first.url == f"{proxy.url}/v1/chat/completions"
    assert first.response == reply.model_dump(exclude_unset=True)
    assert first.extra == training  # for training, never sent to the agent
    assert first.tokens.source == "anticall" and first.tokens.choices[0].completion_ids == [101, 102]
    assert first.tokens.choices[0].logprobs == [-0.5, -0.25] and first.tokens.problems == ["no prompt ids"]
    assert second.stream and second.events and second.extra == {}
    assert second.response["choices"][0]["message"]["tool_calls"] == first.response["choices"][0]["message"]["tool_calls"]
    assert API_KEY not in (traj / f"{session}.jsonl").read_text()


def test_streamed_deltas_keep_their_pace(proxy, traj, session):
    async def main():
        a = agent(proxy, session)
        arrivals = []

        async def stream_agent():
            async for chunk in await a.chat.completions.create(model="m", messages=MESSAGES, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append((time.monotonic(), chunk.choices[0].delta.content))

        async with driver(traj) as d:
            task = asyncio.ensure_future(stream_agent())
            event = await d.get_request(session, 10)
            for piece in ("Hel", "lo", "!"):
                await d.send_delta(event, piece)
                await asyncio.sleep(0.3)
            await d.finish(event, extra={"token_ids": [1, 2, 3]})
            await task
            # deltas to an agent that did not ask for a stream: it gets JSON
            plain = asyncio.ensure_future(a.chat.completions.create(model="m", messages=MESSAGES))
            event = await d.get_request(session, 10)
            await d.send_delta(event, "a")
            await d.send_delta(event, delta={"reasoning_content": "thinking"})
            await d.send_delta(event, "b", finish_reason="length")
            await d.finish(event)
            reply = await plain
        await a.close()
        return arrivals, reply

    arrivals, reply = run(main())
    assert [text for _, text in arrivals] == ["Hel", "lo", "!"]
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert all(0.2 < gap < 0.6 for gap in gaps), gaps  # each delta as it was pushed
    assert reply.choices[0].message.content == "ab" and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.model_extra["reasoning_content"] == "thinking"
    streamed, _ = wait_records(traj / f"{session}.jsonl", 2)
    assert streamed.response["choices"][0]["message"]["content"] == "Hello!"
    assert streamed.extra == {"token_ids": [1, 2, 3]}
    times = [e.t for e in streamed.events if "content" in e.raw]
    assert times[-1] - times[0] > 0.5


def test_driver_errors_reach_the_agent(proxy, traj, session):
    async def main():
        a = agent(proxy, session)
        async with driver(traj) as d:
            plain = asyncio.ensure_future(a.chat.completions.create(model="m", messages=MESSAGES))
            await d.send_error(await d.get_request(session, 10), "the trainer is busy", 429, type="rate_limit", code="busy")
            with pytest.raises(APIStatusError) as err:
                await plain
            assert err.value.status_code == 429 and err.value.body["message"] == "the trainer is busy"
            streamed = asyncio.ensure_future(collect(a.chat.completions.create(model="m", messages=MESSAGES, stream=True)))
            event = await d.get_request(session, 10)
            await d.send_delta(event, "partial")
            await d.send_error(event, "the policy crashed")
            with pytest.raises(APIError, match="the policy crashed"):
                await streamed
        await a.close()

    run(main())
    errored, cut = wait_records(traj / f"{session}.jsonl", 2)
    assert errored.status == 429 and errored.response["error"]["code"] == "busy"
    assert cut.status == 200 and any("policy crashed" in p for p in cut.problems)


def test_cli_driver_with_rock_semantics_and_watch_agent(proxy, traj, session, tmp_path):
    control = ["--control-file", str(traj / "control.json"), "--session", session]

    def cli(*args: str) -> str:
        out = subprocess.run([LLM_TRAJ, *args, *control], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    big = "x" * 2_000_000 + "\n" + NEWLINES
    big_response = {"id": "chatcmpl-big", "object": "chat.completion", "created": 1, "model": "policy",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": big}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    response_file = tmp_path / "response.json"
    response_file.write_text(json.dumps(big_response, indent=2))  # pretty-printed: raw newlines

    async def main():
        a = agent(proxy, session)
        pretend_agent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        watcher = subprocess.Popen([LLM_TRAJ, "watch-agent", "--pid", str(pretend_agent.pid), *control],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            first = asyncio.ensure_future(a.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}]))
            printed = await asyncio.to_thread(cli, "anti-call", "--index", "0")
            assert json.loads(printed)["messages"][0]["content"] == "one"

            async def second_call():
                reply = await first
                stream = await a.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "two"}, {"role": "assistant", "content": reply.choices[0].message.content}],
                    stream=True)  # fmt: skip
                return reply, [chunk async for chunk in stream]

            second = asyncio.ensure_future(second_call())
            printed = await asyncio.to_thread(cli, "anti-call", "--index", "1", "--response", json.dumps(NEWLINES))
            assert json.loads(printed)["messages"][1]["content"] == NEWLINES  # call 2 carries answer 1
            again = await asyncio.to_thread(cli, "anti-call", "--index", "1", "--response", '"ignored"')
            assert again == printed  # a repeated push of the same index is ignored
            last = asyncio.ensure_future(asyncio.to_thread(cli, "anti-call", "--index", "2", "--response-file", str(response_file)))
            reply, chunks = await second
            assert reply.choices[0].message.content == NEWLINES
            assert aggregate(chunks)["choices"][0]["message"]["content"] == big
            exited = time.time()
            pretend_agent.communicate(b"", timeout=10)  # the agent's process exits
            assert await last == "SESSION_END"
            out, err = watcher.communicate(timeout=20)
            assert watcher.returncode == 0, err
            async with driver(traj) as d:
                (info,) = [s for s in await d.sessions() if s.id == session]
            assert info.state == "ended" and info.ended_at - exited < 0.5, info  # no polling delay
            with pytest.raises(APIStatusError) as late:  # a later call of the ended session: an error, no hang
                await a.chat.completions.create(model="m", messages=MESSAGES)
            assert late.value.status_code == 410 and late.value.body["code"] == "session_ended"
            with pytest.raises(APIStatusError):  # it can be told it is late to answer
                await asyncio.wait_for(a.chat.completions.create(model="m", messages=MESSAGES), 5)
            fresh = agent(proxy, f"{session}-next")  # a new session on the same proxy
            new_call = asyncio.ensure_future(fresh.chat.completions.create(model="m", messages=MESSAGES))
            printed = await asyncio.to_thread(
                lambda: subprocess.run([LLM_TRAJ, "anti-call", "--index", "0", "--session", f"{session}-next",
                                        "--control-file", str(traj / "control.json")],
                                       capture_output=True, text=True, timeout=60).stdout)  # fmt: skip
            assert json.loads(printed)["messages"] == MESSAGES
            async with driver(traj) as d:
                await d.send_response(f"{session}-next:1", "hi")
            assert (await new_call).choices[0].message.content == "hi"
            await fresh.close()
        finally:
            for process in (pretend_agent, watcher):
                if process.poll() is None:
                    process.kill()
                process.communicate()
        await a.close()

    run(main(), timeout=90)
    records = wait_records(traj / f"{session}.jsonl", 4)
    assert [r.status for r in records] == [200, 200, 410, 410]
    assert len(records[1].response["choices"][0]["message"]["content"]) == len(big)


def rock_driver_step(log: Path, index: int, response_text: str | None, timeout: float = 20) -> str:
    """ROCK's ModelClient.anti_call_llm, reduced: append the response line for
    `index`, then read the last request line until it is call index + 1 or
    SESSION_END (line-based, split on the markers, as ROCK does)."""
    if response_text is not None:
        meta = json.dumps({"timestamp": int(time.time() * 1000), "index": index})
        with open(log, "a") as fh:
            fh.write(f"LLM_RESPONSE_START{response_text}LLM_RESPONSE_END{meta}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: the proxy may be mid-write
        last = next((line for line in reversed(lines) if "LLM_REQUEST_START" in line or "SESSION_END" in line), None)
        if last is not None:
            if "SESSION_END" in last:
                return "SESSION_END"
            request_json = last.split("LLM_REQUEST_END")[0].split("LLM_REQUEST_START")[1]
            if json.loads(last.split("LLM_REQUEST_END")[1])["index"] == index + 1:
                return request_json
        time.sleep(0.02)
    raise TimeoutError(f"no request {index + 1} in {log}")


def test_rock_file_driver(proxy, traj, session):
    log = traj / "rock" / f"{session}.log"
    # newlines and a marker in the answer (not SESSION_END: ROCK's own reader would take the driver's line for the end)
    text = 'line 1\nline 2\r\n\tLLM_RESPONSE_END{"index": 1}\n end'
    answer = {"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "policy",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}  # fmt: skip

    async def main():
        a = agent(proxy, session)
        nasty = [{"role": "user", "content": NEWLINES + " LLM_REQUEST_START é" + "x" * 2_000_000}]  # 2 MB
        first = asyncio.ensure_future(a.chat.completions.create(model="m", messages=nasty))
        request = json.loads(await asyncio.to_thread(rock_driver_step, log, 0, None))
        assert request["messages"] == nasty

        async def then_stream():
            reply = await first
            return reply, await collect(a.chat.completions.create(model="m", messages=MESSAGES, stream=True))

        second = asyncio.ensure_future(then_stream())
        # the driver's response, pretty-printed (raw newlines), markers inside its strings
        request = json.loads(await asyncio.to_thread(rock_driver_step, log, 1, json.dumps(answer, indent=2)))
        assert request["messages"] == MESSAGES and request["stream"] is True
        ended = asyncio.ensure_future(asyncio.to_thread(rock_driver_step, log, 2, json.dumps("plain text answer")))
        reply, chunks = await second
        async with driver(traj) as d:
            await d.end_session(session, "agent exited")
        assert await ended == "SESSION_END"
        await a.close()
        return reply, chunks

    reply, chunks = run(main())
    assert reply.choices[0].message.content == text
    assert aggregate(chunks)["choices"][0]["message"]["content"] == "plain text answer"
    lines = log.read_text().splitlines()
    assert sum("LLM_REQUEST_START" in line for line in lines) == 2 and lines[-1] == "SESSION_END"


def test_agent_hang_up_releases_the_call(proxy, traj, session):
    def post(stream: bool) -> socket.socket:
        body = json.dumps({"model": "m", "messages": MESSAGES, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(f"POST /s/{session}/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        return sock

    async def main():
        async with driver(traj) as d:
            sock = post(stream=False)
            event = await d.get_request(session, 10)
            sock.close()  # before any answer
            cancelled = await d.get_request(session, 10)
            assert cancelled.type == "cancelled" and cancelled.id == event.id and "hung up" in cancelled.reason
            with pytest.raises(AntiCallError) as err:
                await d.send_response(event, "too late")
            assert err.value.status == 410 and "hung up" in err.value.message

            sock = post(stream=True)
            event = await d.get_request(session, 10)
            await d.send_delta(event, "first")
            received = b""
            while b"first" not in received:  # the head may come alone
                received += await asyncio.to_thread(sock.recv, 65536)
            sock.close()  # mid-stream
            cancelled = await d.get_request(session, 10)
            assert cancelled.type == "cancelled" and cancelled.id == event.id
            with pytest.raises(AntiCallError) as err:
                await d.send_delta(event, "second")
            assert err.value.status == 410

    run(main())
    before, during = wait_records(traj / f"{session}.jsonl", 2)
    assert before.complete is False and before.error.kind == "client_disconnected"
    assert during.complete is False and during.error.kind == "client_disconnected" and len(during.events) == 1


def test_200_concurrent_held_calls_across_20_sessions(proxy, traj, session):
    sessions = [f"{session}-{i}" for i in range(20)]

    async def main():
        agents = {s: agent(proxy, s) for s in sessions}

        async def one(s: str, k: int) -> tuple[str, str]:
            kwargs = dict(model="m", messages=[{"role": "user", "content": f"{s}/{k}"}])
            if k % 2:
                chunks = await collect(agents[s].chat.completions.create(**kwargs, stream=True))
                return f"{s}/{k}", aggregate(chunks)["choices"][0]["message"]["content"]
            reply = await agents[s].chat.completions.create(**kwargs)
            return f"{s}/{k}", reply.choices[0].message.content

        calls = [asyncio.ensure_future(one(s, k)) for s in sessions for k in range(10)]
        async with driver(traj) as d:
            events = []
            while len(events) < 200:
                event = await d.get_request(timeout=10)  # of any session
                assert event is not None
                if event.type == "request":  # (earlier tests' sessions ended on this proxy)
                    events.append(event)
            random.Random(4).shuffle(events)  # answered out of order
            await asyncio.gather(*(d.send_response(e, f"answer to {e.request['messages'][0]['content']}") for e in events))
            results = await asyncio.gather(*calls)
        for a in agents.values():
            await a.close()
        return results

    start = time.monotonic()
    results = run(main())
    assert len(results) == 200 and all(got == f"answer to {asked}" for asked, got in results)
    assert time.monotonic() - start < 30
    for s in sessions:
        assert len(wait_records(traj / f"{s}.jsonl", 10)) == 10


def test_hold_timeout_answers_504(tmp_path):
    p = start_proxy(tmp_path, llm_traj_hold_timeout="0.5")
    try:
        async def main():
            a = agent(p, "t")
            async with driver(tmp_path) as d:
                plain = asyncio.ensure_future(a.chat.completions.create(model="m", messages=MESSAGES))
                event = await d.get_request("t", 10)
                with pytest.raises(APIStatusError) as err:
                    await plain
                assert err.value.status_code == 504 and err.value.body["code"] == "hold_timeout"
                cancelled = await d.get_request("t", 5)
                assert cancelled.type == "cancelled" and "timed out" in cancelled.reason
                with pytest.raises(AntiCallError) as refused:
                    await d.send_response(event, "late")
                assert refused.value.status == 410
                streamed = asyncio.ensure_future(collect(a.chat.completions.create(model="m", messages=MESSAGES, stream=True)))
                event = await d.get_request("t", 10)
                await d.send_delta(event, "a")  # then silence: the timeout also limits the wait between deltas
                with pytest.raises(APIError, match="hold timeout"):
                    await streamed
            await a.close()

        run(main())
    finally:
        p.stop()
    first, second = wait_records(tmp_path / "t.jsonl", 2)
    assert first.status == 504 and second.stream


def idle_limit_of_1s() -> list[str]:
    """mitmdump's arguments that cut mitmproxy's idle connection limit from 600 s to 1 s:
    the `tcp_timeout` option since mitmproxy 12, a script changing a constant before."""
    if "tcp_timeout" in Options():
        return ["--set", "tcp_timeout=1"]
    return ["-s", str(Path(__file__).with_name("short_idle_timeout.py"))]


def test_idle_timeout_does_not_cut_held_calls(tmp_path):
    p = start_proxy(tmp_path, extra_args=idle_limit_of_1s())
    try:
        idle = socket.create_connection(("127.0.0.1", p.port))
        idle.settimeout(5)
        start = time.monotonic()
        assert idle.recv(1) == b"" and time.monotonic() - start < 3  # the limit is in force
        idle.close()

        async def main():
            a = agent(p, "idle")
            async with driver(tmp_path) as d:
                plain = asyncio.ensure_future(a.chat.completions.create(model="m", messages=MESSAGES))
                streamed = asyncio.ensure_future(collect(a.chat.completions.create(model="m", messages=MESSAGES, stream=True)))
                events = [await d.get_request("idle", 10) for _ in range(2)]
                await asyncio.sleep(2.5)  # held well past the idle limit
                for event in events:
                    await d.send_response(event, "still here")
                reply, chunks = await plain, await streamed
            await a.close()
            return reply, chunks

        reply, chunks = run(main())
    finally:
        p.stop()
    assert reply.choices[0].message.content == "still here"
    assert aggregate(chunks)["choices"][0]["message"]["content"] == "still here"


def test_shutdown_answers_held_calls_with_503(tmp_path):
    p = start_proxy(tmp_path)

    async def main():
        a = agent(p, "down")
        async with driver(tmp_path) as d:
            plain = asyncio.ensure_future(a.chat.completions.create(model="m", messages=MESSAGES))
            await d.get_request("down", 10)
        os.kill(p.pid, signal.SIGTERM)
        with pytest.raises(APIStatusError) as err:
            await plain
        await a.close()
        return err.value

    try:
        err = run(main())
    finally:
        p.stop()
    assert err.status_code == 503 and err.body["code"] == "shutting_down"
    (record,) = wait_records(tmp_path / "down.jsonl", 1)
    assert record.status == 503
    assert not (tmp_path / "control.json").exists()


def test_run_wrapper_ends_the_session(tmp_path):
    """`llm-traj run --mode anticall`: a driver on the ROCK log answers; when the
    agent exits the wrapper ends the session at once (SESSION_END in the log)."""
    log = tmp_path / "rock.log"
    agent_code = (
        "from openai import OpenAI\n"
        "c = OpenAI(max_retries=0)\n"
        "print(c.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)\n"
    )

    async def main():
        run_cmd = asyncio.create_subprocess_exec(
            LLM_TRAJ, "run", "--mode", "anticall", "--traj", str(tmp_path / "traj"), "--session", "wrapped",
            "--set", f"llm_traj_rock_file={log}", "--", sys.executable, "-c", agent_code,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OPENAI_API_KEY": "sk-x"},
        )  # fmt: skip
        wrapper = await run_cmd
        try:
            request = json.loads(await asyncio.to_thread(rock_driver_step, log, 0, None, 30))
            assert request["messages"][0]["content"] == "hi"
            ended = asyncio.to_thread(rock_driver_step, log, 1, json.dumps("hello from the trainer"))
            assert await ended == "SESSION_END"
            out, err = await asyncio.wait_for(wrapper.communicate(), 30)
        finally:
            if wrapper.returncode is None:
                wrapper.kill()
                await wrapper.wait()
        return wrapper.returncode, out.decode(), err.decode()

    code, out, err = run(main())
    assert code == 0, err
    assert out.strip() == "hello from the trainer"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"llm_traj_hold_timeout": "soon"}, "llm_traj_hold_timeout='soon' is not a number"),
        ({"llm_traj_control_port": "70000"}, "llm_traj_control_port=70000 is not a port"),
        ({"llm_traj_control_port": "x"}, "--set llm_traj_control_port=x: "),  # then mitmproxy's words (they vary)
        ({"llm_traj_mode": "record", "llm_traj_rock_file": "x.log"}, "llm_traj_rock_file is only used with llm_traj_mode=anticall"),
    ],
)
def test_bad_options_stop_startup_with_one_line(tmp_path, options, message):
    log = tmp_path / "proxy.log"
    proxy = ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "anticall", "llm_traj_path": tmp_path, **options}, log=log)
    with pytest.raises(ProxyStartError):
        proxy.start()
    assert f"llm-traj: {message}" in log.read_text()
