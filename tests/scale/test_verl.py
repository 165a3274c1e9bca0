"""verl's SWE-agent recipe loop, as its README shows it, against the llm-traj
drop-in (`llmtraj.compat.verl.ModelProxy`), with a real openai-SDK agent."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from llmtraj.compat.verl import ModelProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def generate_response(messages) -> str:
    return f"step {len(messages)}: seen {messages[-1]['content']!r}"


def run_agent(base_url: str) -> list[str]:
    """A scripted agent: three turns, the second streamed."""
    client = openai.OpenAI(base_url=base_url, api_key="dummy_key", max_retries=0)
    messages, got = [{"role": "user", "content": "fix the bug"}], []
    for turn in range(3):
        if turn == 1:
            stream = client.chat.completions.create(model="policy", messages=messages, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        else:
            text = client.chat.completions.create(model="policy", messages=messages, temperature=0.7,
                                                  max_tokens=64).choices[0].message.content  # fmt: skip
        got.append(text)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"observation {turn}"}]
    return got


def test_the_recipe_loop_runs_unchanged(tmp_path):
    async def main():
        proxy = ModelProxy(port=free_port(), path=tmp_path / "traj")
        agent_done = None
        try:
            await proxy.start_server()
            agent = asyncio.ensure_future(asyncio.to_thread(run_agent, f"http://localhost:{proxy.port}/v1"))

            async def end_when_the_agent_exits():
                await asyncio.wait([agent])
                await proxy.end_session()

            agent_done = asyncio.ensure_future(end_when_the_agent_exits())
            seen = []
            # --- the recipe's README loop, unchanged ---
            while True:
                request = await proxy.get_request()
                if request.is_session_end():
                    break
                seen.append(request)
                response_text = await generate_response(request.messages)
                await proxy.send_response(response_text)
            # ---
            got = await agent
            assert got == [
                "step 1: seen 'fix the bug'",
                "step 3: seen 'observation 0'",
                "step 5: seen 'observation 1'",
            ]
            assert [r.stream for r in seen] == [False, True, False]
            assert (seen[0].model, seen[0].temperature, seen[0].max_tokens) == ("policy", 0.7, 64)
            assert seen[1].temperature is None and "stream" not in seen[1].extra_params
            records = await proxy.records()
            assert [(r.index, r.stream, r.status) for r in records] == [(1, False, 200), (2, True, 200), (3, False, 200)]
            assert records[1].response["choices"][0]["message"]["content"] == got[1]
        finally:
            if agent_done is not None:
                await agent_done
            await proxy.stop_server()

    asyncio.run(main())


def test_tool_calls_errors_and_sessions(tmp_path):
    async def main():
        proxy = ModelProxy(port=free_port(), path=tmp_path / "traj")
        await proxy.start_server()
        try:
            def agent():
                client = openai.OpenAI(base_url=proxy.session_url("task-7"), api_key="k", max_retries=0)
                first = client.chat.completions.create(
                    model="policy", messages=[{"role": "user", "content": "list files"}],
                    tools=[{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}],
                )  # fmt: skip
                with pytest.raises(openai.InternalServerError) as failed:
                    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "again"}])
                return first, failed.value

            running = asyncio.ensure_future(asyncio.to_thread(agent))
            request = await proxy.get_request()
            assert request.session == "task-7" and request.extra_params["tools"][0]["function"]["name"] == "ls"
            await proxy.send_response("", request=request, tool_calls=[{"id": "c1", "function": {"name": "ls", "arguments": {}}}])
            second = await proxy.get_request()
            await proxy.send_error_response(second.request_id, "policy crashed")
            first, error = await running
            assert first.choices[0].finish_reason == "tool_calls"
            assert first.choices[0].message.tool_calls[0].function.name == "ls"
            assert error.status_code == 500 and "policy crashed" in str(error)
            records = await proxy.records("task-7")
            assert [r.status for r in records] == [200, 500]
        finally:
            await proxy.stop_server()

    asyncio.run(main())


def test_a_taken_port_falls_back_to_a_free_one(tmp_path):
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proxy = ModelProxy(port=port, path=tmp_path / "traj")
            await proxy.start_server()
            try:
                assert proxy.port != port
            finally:
                await proxy.stop_server()

    asyncio.run(main())


def test_a_port_taken_after_its_check_is_given_up_for_one_the_system_picks(tmp_path, monkeypatch):
    # The race a check cannot close: another process listens on the port before the proxy does.
    import llmtraj.compat.verl as verl

    monkeypatch.setattr(verl, "_free", lambda host, port: True)  # (free when checked)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            proxy = ModelProxy(port=port, path=tmp_path / "traj")
            await proxy.start_server()
            try:
                assert proxy.port not in (port, 0)
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5):
                    pass
            finally:
                await proxy.stop_server()

        asyncio.run(main())
