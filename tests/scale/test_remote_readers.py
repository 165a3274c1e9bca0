"""The readers take a URL: a trajectory recorded to S3 (moto's server on
127.0.0.1) through a real mitmdump is replayed from S3 by another with no
upstream, and `llm-traj stats`, `export` and `diff` read it as subprocesses;
`memory://` (one process's store) in-process."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import fsspec
import httpx
import openai
import pytest

from llmtraj import read_records
from llmtraj.anticall.control_file import read_control_file
from llmtraj.cli.proxy_process import ProxyProcess, ProxyStartError
from llmtraj.core.record import CallRecord, Timings
from llmtraj.core.remote import RemoteError, Uploader
from llmtraj.core.store import TrajectoryReader, TrajectoryWriter

from .conftest import BUCKET, LLM_TRAJ, wait_object

MESSAGES = [{"role": "user", "content": "hello"}]


def agent_calls(proxy: ProxyProcess, session: str) -> list[str]:
    """The texts a scripted agent gets: a plain call and a streamed one."""
    agent = openai.OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="k", max_retries=0)
    plain = agent.chat.completions.create(model="standin-tools", messages=MESSAGES)
    stream = agent.chat.completions.create(model="standin-text", messages=MESSAGES + [{"role": "user", "content": "more"}],
                                           stream=True)  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return [json.dumps(plain.choices[0].message.model_dump(exclude_none=True), sort_keys=True), streamed]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLM_TRAJ, *args], capture_output=True, text=True, env=os.environ, timeout=120)


def objects(client, prefix: str) -> dict[str, str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: f"{o['ETag']} {o['LastModified']}" for o in listing}


def test_record_to_s3_then_replay_and_read_from_s3(s3, upstream, tmp_path):
    url = f"s3://{BUCKET}/rec"
    stage = tmp_path / "stage"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": url,
                                                      "llm_traj_stage": stage}) as recorder:  # fmt: skip
        recorded = {session: agent_calls(recorder, session) for session in ("first", "second")}
        assert httpx.post(f"{recorder.url}/llm-traj/upload", params={"session": "first"}).status_code == 401  # no token
        token = read_control_file(stage / "control.json").token
        ended = httpx.post(f"{recorder.url}/llm-traj/upload", params={"session": "first"},
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert ended.status_code == 202, ended.text
        wait_object(s3["client"], "rec/first.jsonl")
    # "second" went up at shutdown
    assert set(objects(s3["client"], "rec/")) == {"rec/first.jsonl", "rec/second.jsonl"}
    before = objects(s3["client"], "rec/")

    copies = set(Path(tempfile.gettempdir()).glob("llm-traj-remote-*"))  # the readers' local copies

    # replay from the URL, nothing listening upstream
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "replay", "llm_traj_path": url}) as replayer:
        replayed = {session: agent_calls(replayer, session) for session in ("second", "first")}
        report = httpx.get(f"{replayer.url}/llm-traj/replay-report").json()
    assert replayed == recorded
    assert {name: (s["served"], s["misses"]) for name, s in report["sessions"].items()} == {"first": (2, 0), "second": (2, 0)}
    assert objects(s3["client"], "rec/") == before  # replay reads the recording, never writes it back

    # the commands read the URL
    stats = cli("stats", url, "--json", "--by", "session")
    assert stats.returncode == 0, stats.stderr
    rows = [r for r in json.loads(stats.stdout) if r["kind"] == "session"]
    assert {r["name"]: (r["calls"], r["ok"]) for r in rows} == {"first": (2, 2), "second": (2, 2)}

    export = cli("export", url, "--format", "openai-chat")
    assert export.returncode == 0, export.stderr
    assert len(export.stdout.splitlines()) == 4 and "tool_calls" in export.stdout

    local = tmp_path / "local"
    local.mkdir()
    for key in before:
        (local / key.rpartition("/")[2]).write_bytes(wait_object(s3["client"], key))
    same = cli("diff", url, str(local))
    assert same.returncode == 0, same.stdout + same.stderr
    for name in ("first", "second"):  # the same, but the second session's second request says otherwise
        body = (local / f"{name}.jsonl").read_bytes()
        s3["client"].put_object(Bucket=BUCKET, Key=f"other/{name}.jsonl",
                                Body=body.replace(b'"more"', b'"less"') if name == "second" else body)  # fmt: skip
    differ = cli("diff", url, f"s3://{BUCKET}/other")
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert "session first: 2 calls, identical" in differ.stdout and "session second" in differ.stdout

    for command in (["stats", f"s3://{BUCKET}/nothing-here"], ["export", f"s3://{BUCKET}/nothing-here", "--format", "har"],
                    ["diff", url, f"s3://{BUCKET}/nothing-here"]):  # fmt: skip
        missing = cli(*command)
        assert missing.returncode != 0 and "nothing-here does not exist" in missing.stderr, (command, missing.stderr)
        assert "Traceback" not in missing.stderr
    assert set(Path(tempfile.gettempdir()).glob("llm-traj-remote-*")) == copies  # each removed when its reader exited


def test_replay_from_a_missing_url_refuses_to_start(s3):
    with pytest.raises(ProxyStartError, match="does not exist"):
        ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "replay",
                                                             "llm_traj_path": f"s3://{BUCKET}/never"}).start()  # fmt: skip


def test_memory_urls_in_one_process(tmp_path):
    """`memory://` is fsspec's store of this process: what goes up there is read back here."""
    stage = tmp_path / "stage"
    writer = TrajectoryWriter(stage)
    for session in ("a", "b"):
        for _ in range(2):
            writer.append(CallRecord(session=session, index=writer.next_index(session), api="chat.completions",
                                     mode="record", method="POST", url="http://127.0.0.1:9/v1/chat/completions", request_headers=[],
                                     request={"model": "m", "messages": MESSAGES}, status=200,
                                     response={"object": "chat.completion", "choices": []},
                                     timings=Timings(started_at=1.0, ended_at=2.0)))  # fmt: skip
    writer.close()
    uploader = Uploader("memory://run", stage)
    assert uploader.pending() == ["a", "b"]
    for session in uploader.pending():
        uploader.upload(session)
    assert uploader.pending() == []
    assert sorted(fsspec.filesystem("memory").ls("/run", detail=False)) == ["/run/a.jsonl", "/run/b.jsonl"]
    assert [(r.session, r.index) for r in read_records("memory://run")] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert [len(calls) for calls in TrajectoryReader("memory://run/").sessions.values()] == [2, 2]
    with pytest.raises(RemoteError, match="does not exist"):
        list(read_records("memory://nothing-here"))
