"""The proxy's endpoints for readers and trainers, end to end (real mitmdump,
real openai SDK): the written barrier (`GET /llm-traj/written`), the weight
version every later record carries, and pausing calls while weights sync."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from llmtraj.anticall import AntiCallClient
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from openai import APIStatusError, OpenAI

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "hello"}]


def writer_pid(proxy: ProxyProcess) -> int:
    """The record writer: the proxy's child running llmtraj.recording.writer."""
    for child in Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split():
        if b"llmtraj.recording.writer" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError("no record writer process")


def test_written_barrier_waits_for_the_writer(proxy, traj_dir, session):
    client = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="k", max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    answer = httpx.get(f"{proxy.url}/llm-traj/written", params={"session": session, "timeout": 10})
    assert answer.status_code == 200 and answer.json() == {"session": session, "written": True}
    assert len(list(read_records(traj_dir / f"{session}.jsonl"))) == 1  # no wait needed after the barrier

    writer = writer_pid(proxy)
    os.kill(writer, signal.SIGSTOP)  # the writer cannot write: the barrier must not pass
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=False)
        stuck = httpx.get(f"{proxy.url}/llm-traj/written", params={"session": session, "timeout": 0.5})
        assert stuck.status_code == 504
        assert stuck.json()["error"]["code"] == "not_yet_written"
        other = httpx.get(f"{proxy.url}/llm-traj/written", params={"session": "never-seen", "timeout": 0.5})
        assert other.status_code == 200  # nothing of that session is waiting
    finally:
        os.kill(writer, signal.SIGCONT)
    answer = httpx.get(f"{proxy.url}/llm-traj/written", params={"session": session, "timeout": 10})
    assert answer.status_code == 200
    assert [r.index for r in read_records(traj_dir / f"{session}.jsonl")] == [1, 2]


@pytest.mark.parametrize("query", [{}, {"session": "bad session"}, {"session": "s", "timeout": "soon"},
                                   {"session": "s", "timeout": "-1"}, {"session": "s", "timeout": "9999"}])  # fmt: skip
def test_written_barrier_refuses_a_bad_query(proxy, query):
    answer = httpx.get(f"{proxy.url}/llm-traj/written", params=query)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "bad_written_query"
    assert "/llm-traj/written?session=S&timeout=T" in answer.json()["error"]["message"]


def test_weight_version_and_pause_in_record_mode(proxy, traj_dir, session):
    client = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="k", max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": 7}).json()["weight_version"] == 7
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    paused = httpx.post(f"{proxy.url}/llm-traj/pause", json={"retry_after": 2})
    assert paused.json() == {"weight_version": 7, "paused": True, "retry_after": 2.0}
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "2"
    assert refused.value.body["code"] == "paused"
    assert httpx.post(f"{proxy.url}/llm-traj/resume").json()["paused"] is False
    httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": "v8"})
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": None})
    records = wait_records(traj_dir / f"{session}.jsonl", 3)
    assert [r.weight_version for r in records] == [None, 7, "v8"]  # the refused call was not recorded


@pytest.mark.parametrize("body", [{}, {"version": 1.5}, {"version": True}, [1]])
def test_weight_version_refuses_a_bad_body(proxy, body):
    answer = httpx.put(f"{proxy.url}/llm-traj/weight-version", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_training_request"
    assert httpx.get(f"{proxy.url}/llm-traj/weight-version").json()["weight_version"] is None


def test_pause_holds_anticalls_until_resume(tmp_path):
    traj = tmp_path / "traj"
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "anticall", "llm_traj_path": traj}) as proxy:
        httpx.post(f"{proxy.url}/llm-traj/pause", json={})

        async def main():
            driver = AntiCallClient.from_control_file(traj / "control.json")
            agent = asyncio.ensure_future(asyncio.to_thread(
                OpenAI(base_url=f"{proxy.url}/s/p/v1", api_key="k", max_retries=0).chat.completions.create,
                model="m", messages=MESSAGES))  # fmt: skip
            assert await driver.get_request(timeout=1.0) is None  # held by the pause, not given to drivers
            started = time.monotonic()
            await asyncio.to_thread(httpx.post, f"{proxy.url}/llm-traj/resume")
            call = await driver.get_request(timeout=10.0)
            assert call is not None and call.type == "request" and time.monotonic() - started < 5
            await driver.send_response(call, "after the sync")
            assert (await agent).choices[0].message.content == "after the sync"
            await driver.aclose()

        asyncio.run(main())
