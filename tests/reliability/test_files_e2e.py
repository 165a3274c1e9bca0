"""Trajectory files end to end through a real mitmdump (issue 15): a file
deleted, moved away or replaced while the proxy records is noticed and the
next calls go to a new file at its path, which reads back and replays (its
first line whole, not a reference to a line of the old file); a bad line in
the middle of a trajectory costs only its own session, from that line on, in
replay and in the commands, and is reported with its file and line; and an
empty session in the path (`/s//v1/...`) is refused, not recorded elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records

from ..cli.test_cli_run import llm_traj
from ..conftest import wait_records
from ..e2e.test_replay_e2e import dead_address, wait_output


def conversation(n: int, label: str = "") -> list[dict]:
    """An agent's requests, each repeating the conversation so far (stored as references to the previous call)."""
    steps, messages = [], [{"role": "system", "content": "You are an agent. " * 8}]
    for k in range(1, n + 1):
        messages = [*messages, {"role": "user", "content": f"{label} observation {k}"}]
        steps.append({"model": "standin-echo", "messages": messages})
        messages = [*messages, {"role": "assistant", "content": f"action {k}"}]
    return steps


def call(proxy: ProxyProcess, session: str, request: dict) -> httpx.Response:
    r = httpx.post(f"{proxy.url}/s/{session}/v1/chat/completions", json=request, timeout=30)
    assert r.status_code == 200, r.text
    return r


def lines(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_bytes().splitlines() if line.strip()]


def rotate(file: Path, how: str) -> None:
    if how == "rm":
        file.unlink()
    elif how == "mv":
        file.rename(file.with_name(file.name + ".1"))
    else:  # replaced by another file, as a rotation that moves the file away and creates an empty one does
        fresh = file.with_name(".fresh")
        fresh.write_bytes(b"")
        os.chmod(fresh, 0o600)
        os.replace(fresh, file)


@pytest.mark.parametrize("how,what", [("rm", "deleted"), ("mv", "moved away"), ("replace", "replaced")])
def test_a_session_file_rotated_while_recording_goes_on_in_a_new_file_that_replays(upstream, tmp_path, how, what):
    path = tmp_path / "traj"
    steps = conversation(6)
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        got = [call(p, "rot", step).json() for step in steps[:3]]
        file = path / "rot.jsonl"
        wait_records(file, 3)
        assert [line.get("request_base", {}).get("index") for line in lines(file)] == [None, 1, 2]
        rotate(file, how)
        got += [call(p, "rot", step).json() for step in steps[3:]]
        records = wait_records(file, 3)
        output = wait_output(p, f"{file} was {what}")
    assert f"llm-traj: {file} was {what} while recording; the next calls go to a new file there" in output
    assert [r.index for r in records] == [4, 5, 6]  # the session's numbering goes on
    assert [r.request for r in records] == steps[3:]
    stored = lines(file)
    assert "request_base" not in stored[0]  # whole: the line it would refer to is in the old file
    assert [line.get("request_base", {}).get("index") for line in stored[1:]] == [4, 5]  # and chained again after it
    assert os.stat(file).st_mode & 0o777 == 0o600
    if how == "mv":
        assert [r.index for r in read_records(_as_trajectory(file.with_name("rot.jsonl.1"), tmp_path))] == [1, 2, 3]

    with ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": path}) as p:
        replayed = [call(p, "rot", step) for step in steps[3:]]
    assert [r.headers["x-llm-traj-step"] for r in replayed] == ["rot#4", "rot#5", "rot#6"]
    assert [r.json() for r in replayed] == got[3:]


def _as_trajectory(file: Path, tmp_path: Path) -> Path:
    """A rotated-away file (`x.jsonl.1`) under a name the reader takes for a trajectory."""
    copy = tmp_path / "rotated.jsonl"
    shutil.copyfile(file, copy)
    return copy


def test_a_single_file_of_sessions_moved_away_while_recording_goes_on_in_a_new_one(upstream, tmp_path):
    path = tmp_path / "all.jsonl"
    a, b = conversation(4, "a"), conversation(4, "b")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        for k in range(2):
            call(p, "a", a[k])
            call(p, "b", b[k])
        wait_records(path, 4)
        path.rename(tmp_path / "all.jsonl.1")
        for k in range(2, 4):
            call(p, "a", a[k])
            call(p, "b", b[k])
        records = wait_records(path, 4)
        output = wait_output(p, f"{path} was moved away")
    assert f"llm-traj: {path} was moved away while recording" in output
    assert [(r.session, r.index) for r in records] == [("a", 3), ("b", 3), ("a", 4), ("b", 4)]
    assert [r.request for r in records] == [a[2], b[2], a[3], b[3]]
    assert [line.get("request_base", {}).get("index") for line in lines(path)] == [None, None, 3, 3]


def test_a_trajectory_directory_removed_while_recording_is_made_again(upstream, tmp_path):
    path = tmp_path / "traj"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        call(p, "gone", conversation(1)[0])
        wait_records(path / "gone.jsonl", 1)
        shutil.rmtree(path)
        call(p, "gone", conversation(2)[1])
        (record,) = wait_records(path / "gone.jsonl", 1)
    assert record.index == 2 and os.stat(path).st_mode & 0o777 == 0o700


def test_an_empty_session_in_the_path_is_refused_and_nothing_is_recorded(upstream, tmp_path):
    path = tmp_path / "traj"
    hello = [{"role": "user", "content": "hi"}]
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        chat = httpx.post(f"{p.url}/s//v1/chat/completions", json={"model": "standin-text", "messages": hello}, timeout=30)
        anthropic = httpx.post(f"{p.url}/s//v1/messages", headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
                               json={"model": "standin-text", "max_tokens": 5, "messages": hello}, timeout=30)
        ok = httpx.post(f"{p.url}/s/later/v1/chat/completions", json={"model": "standin-text", "messages": hello}, timeout=30)
        assert ok.status_code == 200
        wait_records(path / "later.jsonl", 1)  # written after anything sent before it
    assert chat.status_code == 400  # in OpenAI's shape
    assert chat.json()["error"]["code"] == "invalid_session" and "invalid session id ''" in chat.json()["error"]["message"]
    assert anthropic.status_code == 400 and anthropic.json()["type"] == "error"  # in Anthropic's
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert sorted(f.name for f in path.iterdir()) == ["later.jsonl"]  # nothing in the default session


def damaged(line: bytes) -> bytes:
    """The line made invalid JSON (a control character inside a string) while its start still says whose it is."""
    at = line.index(b'"messages"')
    return line[:at] + b'"\x01' + line[at + 1 :]


@pytest.fixture
def recorded_pair(upstream, tmp_path) -> tuple[Path, list[dict], list[dict], dict]:
    """Sessions a and b recorded through mitmdump into one file, their calls interleaved: a file and the answers."""
    path = tmp_path / "all.jsonl"
    a, b = conversation(4, "a"), conversation(4, "b")
    got = {}
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        for k in range(4):
            got["a", k + 1] = call(p, "a", a[k]).json()
            got["b", k + 1] = call(p, "b", b[k]).json()
        wait_records(path, 8)
    return path, a, b, got


@pytest.mark.parametrize("layout", ["single file", "directory"])
def test_a_bad_line_cuts_only_its_session_in_replay_and_says_where(recorded_pair, tmp_path, layout):
    path, a, b, got = recorded_pair
    stored = path.read_bytes().splitlines(keepends=True)
    assert json.loads(stored[4])["session"] == "a" and json.loads(stored[4])["index"] == 3
    stored[4] = damaged(stored[4])  # a#3: a#4 refers to it
    if layout == "single file":
        path.write_bytes(b"".join(stored))
        bad = f"{path}:5"
    else:  # a file per session
        path = tmp_path / "traj"
        path.mkdir()
        for session in ("a", "b"):
            (path / f"{session}.jsonl").write_bytes(b"".join(line for line in stored if f'"session":"{session}"'.encode() in line))
        bad = f"{path / 'a.jsonl'}:3"
    why = f"{bad}: not valid JSON (control character (\\u0000-\\u001F) found while parsing a string at line 1 column"
    with ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": path}) as p:
        if layout == "single file":  # scanned at startup: reported then
            assert why in wait_output(p, why)
        for k in range(4):  # every call of b
            r = call(p, "b", b[k])
            assert r.json() == got["b", k + 1] and r.headers["x-llm-traj-step"] == f"b#{k + 1}"
        assert [call(p, "a", a[k]).json() for k in range(2)] == [got["a", 1], got["a", 2]]  # a up to the bad line
        r = httpx.post(f"{p.url}/s/a/v1/chat/completions", json=a[2], timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "replay_unreadable"
        assert why in r.json()["error"]["message"]
        assert "session 'a' is unreadable past it (1 later calls left out)" in r.json()["error"]["message"]
        report = httpx.get(f"{p.url}/llm-traj/replay-report", timeout=30).json()
        output = wait_output(p, why)
    assert report["sessions"]["a"]["unreadable"].startswith(why) and report["sessions"]["b"]["unreadable"] is None
    assert len(report["skipped_lines"]) == 1 and report["skipped_lines"][0].startswith(why)
    logged = [line for line in output.splitlines() if why in line and "replay:" not in line]
    assert len(logged) == 1 and logged[0].endswith("skipped; session 'a' is unreadable past it (1 later calls left out)")


def test_the_commands_read_past_a_bad_line_with_a_one_line_warning(recorded_pair):
    path, a, b, got = recorded_pair
    stored = path.read_bytes().splitlines(keepends=True)
    stored[2] = damaged(stored[2])  # a#2
    path.write_bytes(b"".join(stored))
    warning = f"llm-traj: warning: {path}:3: not valid JSON"
    cut = "skipped; session 'a' is unreadable past it (2 later calls left out)"
    for args in (["show", str(path)], ["stats", str(path), "--json"], ["export", str(path), "--format", "openai-chat"],
                 ["cat", str(path)]):  # fmt: skip
        r = llm_traj(*args)
        assert r.returncode == 0, r.stderr
        (line,) = r.stderr.splitlines()
        assert line.startswith(warning) and line.endswith(cut), line
        if args[0] == "stats":
            calls = {row["name"]: row["calls"] for row in json.loads(r.stdout) if row["kind"] == "session"}
            assert calls == {"a": 1, "b": 4}
        if args[0] == "cat":
            assert [(json.loads(x)["session"], json.loads(x)["index"]) for x in r.stdout.splitlines()] == [
                ("a", 1), ("b", 1), ("b", 2), ("b", 3), ("b", 4)]
    skipped = []
    assert [(r.session, r.index) for r in read_records(path, tolerate_corrupt=True, skipped=skipped)] == [
        ("a", 1), ("b", 1), ("b", 2), ("b", 3), ("b", 4)]
    assert [str(s).endswith(cut) for s in skipped] == [True]
