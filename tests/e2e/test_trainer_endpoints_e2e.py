"""The proxy's endpoints for readers and trainers, end to end (real mitmdump,
real openai SDK): the written barrier (`GET /llm-traj/written`), the weight
version every later record carries, and pausing calls while weights sync;
the ones that change the proxy's state need the control file's token."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from llmtraj.anticall import AntiCallClient
from llmtraj.anticall.control_file import read_control_file
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from openai import APIStatusError, OpenAI

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "hello"}]


def trainer(traj: Path) -> dict[str, str]:
    """The trainer's headers: the control file's token."""
    return {"Authorization": f"Bearer {read_control_file(traj / 'control.json').token}"}


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
    auth = trainer(traj_dir)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": 7}, headers=auth).json()["weight_version"] == 7
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    paused = httpx.post(f"{proxy.url}/llm-traj/pause", json={"retry_after": 2}, headers=auth)
    assert paused.json() == {"weight_version": 7, "paused": True, "retry_after": 2.0}
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "2"
    assert refused.value.body["code"] == "paused"
    assert httpx.post(f"{proxy.url}/llm-traj/resume", headers=auth).json()["paused"] is False
    httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": "v8"}, headers=auth)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    httpx.put(f"{proxy.url}/llm-traj/weight-version", json={"version": None}, headers=auth)
    records = wait_records(traj_dir / f"{session}.jsonl", 3)
    assert [r.weight_version for r in records] == [None, 7, "v8"]  # the refused call was not recorded


@pytest.mark.parametrize("body", [{}, {"version": 1.5}, {"version": True}, [1]])
def test_weight_version_refuses_a_bad_body(proxy, traj_dir, body):
    answer = httpx.put(f"{proxy.url}/llm-traj/weight-version", json=body, headers=trainer(traj_dir))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_training_request"
    assert httpx.get(f"{proxy.url}/llm-traj/weight-version").json()["weight_version"] is None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic eDp5"}],
                         ids=["none", "wrong", "basic"])  # fmt: skip
def test_an_agent_without_the_token_cannot_pause_or_stamp(proxy, traj_dir, session, headers):
    """An agent reaches the proxy's port, not its control file: 401, and nothing changes."""
    client = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="k", max_retries=0)
    before = httpx.get(f"{proxy.url}/llm-traj/weight-version").json()
    assert before["weight_version"] is None and before["paused"] is False
    for method, path, body in [("PUT", "weight-version", {"version": 666}), ("POST", "pause", {"retry_after": 60}),
                               ("POST", "resume", {})]:  # fmt: skip
        answer = httpx.request(method, f"{proxy.url}/llm-traj/{path}", json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        error = answer.json()["error"]
        assert error["code"] == "unauthorized" and "Authorization: Bearer" in error["message"]
    assert httpx.get(f"{proxy.url}/llm-traj/weight-version").json() == before
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # not paused
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.weight_version is None
    # the agent's own key is no token either (in reverse mode it is what the agent sends everywhere)
    assert httpx.post(f"{proxy.url}/llm-traj/pause", headers={"Authorization": "Bearer k"}).status_code == 401


def test_the_token_is_the_control_apis_in_anticall_mode(tmp_path):
    traj = tmp_path / "traj"
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "anticall", "llm_traj_path": traj}) as proxy:
        info = read_control_file(traj / "control.json")
        assert info.url is not None and (traj / "control.json").stat().st_mode & 0o777 == 0o600
        assert httpx.post(f"{proxy.url}/llm-traj/pause", json={}).status_code == 401
        assert httpx.get(f"{info.url}/v1/calls", headers=trainer(traj)).status_code == 200  # the same token
        assert httpx.post(f"{proxy.url}/llm-traj/pause", json={}, headers=trainer(traj)).json()["paused"] is True
    assert not (traj / "control.json").exists()


def test_record_mode_writes_a_control_file_without_a_control_api(proxy, traj_dir):
    info = read_control_file(traj_dir / "control.json")
    assert info.url is None and info.token and (traj_dir / "control.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception, match="not in anti-call mode"):
        AntiCallClient.from_control_file(traj_dir / "control.json")


def test_pause_holds_anticalls_until_resume(tmp_path):
    traj = tmp_path / "traj"
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "anticall", "llm_traj_path": traj}) as proxy:
        httpx.post(f"{proxy.url}/llm-traj/pause", json={}, headers=trainer(traj))

        async def main():
            driver = AntiCallClient.from_control_file(traj / "control.json")
            agent = asyncio.ensure_future(asyncio.to_thread(
                OpenAI(base_url=f"{proxy.url}/s/p/v1", api_key="k", max_retries=0).chat.completions.create,
                model="m", messages=MESSAGES))  # fmt: skip
            assert await driver.get_request(timeout=1.0) is None  # held by the pause, not given to drivers
            started = time.monotonic()
            await asyncio.to_thread(httpx.post, f"{proxy.url}/llm-traj/resume", headers=trainer(traj))
            call = await driver.get_request(timeout=10.0)
            assert call is not None and call.type == "request" and time.monotonic() - started < 5
            await driver.send_response(call, "after the sync")
            assert (await agent).choices[0].message.content == "after the sync"
            await driver.aclose()

        asyncio.run(main())
