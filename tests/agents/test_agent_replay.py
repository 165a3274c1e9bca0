"""Replay that survives real agents: Claude Code, Codex, Qwen Code and opencode (the real
CLIs from npm, installed by scripts/agents-setup) are driven through `llm-traj run
--mode anticall` by a scripted policy (a tool call that writes a file, then a
final answer; side calls such as titles get a short text), then replayed with
no upstream and no `position` rung:

  - in the same $HOME and working directory,
  - under another $HOME and working directory,
  - with the clock one day ahead (libfaketime; Codex, a statically linked
    binary, runs under qemu-user with libfaketime in qemu), checked in what the
    agent sent: the next day's date,
  - through HTTPS_PROXY (a recording made through HTTPS_PROXY: the agents send
    other requests to their own hosts than to a base URL).

Every replay must finish the task (the file is written again, by the agent's
own tool run) with every recorded call served and zero upstream connections:
none in the proxy's log, none at the reverse target (a tripwire port).

Run by scripts/test-agents, not by scripts/test.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest

from llmtraj.core.store import read_records

from .harness import CLAUDE, CODEX, FILE_TEXT, OPENCODE, QWEN, SESSION, Agent, Place, Tripwire, run_agent

AGENTS = {agent.name: agent for agent in (CLAUDE, CODEX, QWEN, OPENCODE)}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", params=sorted(AGENTS))
def agent(request) -> Agent:
    return AGENTS[request.param]


class Recording:
    def __init__(self, agent: Agent, root: Path, via: str) -> None:
        self.agent, self.via = agent, via
        self.place = Place.make(root / "rec")
        self.traj = root / "traj"
        self.run = run_agent(agent, self.place, self.traj, mode="anticall", via=via, scratch=root / "scratch")
        self.records = list(read_records(self.traj / f"{SESSION}.jsonl")) if self.traj.exists() else []


@pytest.fixture(scope="module")
def recordings(agent, tmp_path_factory) -> dict[str, Recording]:
    """The task recorded once per way of reaching the proxy."""
    return {via: Recording(agent, tmp_path_factory.mktemp(f"{agent.name}-{via}"), via)
            for via in ("base-url", "https-proxy")}  # fmt: skip


@pytest.mark.parametrize("via", ["base-url", "https-proxy"])
def test_the_recording_finishes_the_task(recordings, via):
    recording = recordings[via]
    run = recording.run
    assert run.code == 0, run.describe()
    assert run.out_file.read_text() == FILE_TEXT, run.describe()
    assert len(recording.records) >= 2, run.describe()  # the tool call and the final answer, at least
    assert all(r.complete and r.status == 200 for r in recording.records)
    # an anti-call record says where the agent meant to go, not the proxy's placeholder target
    assert not any(r.url.startswith("http://127.0.0.1:9/") for r in recording.records)


def replay(recording: Recording, tmp_path: Path, *, place: Place | None = None, faketime: str | None = None,
           via: str | None = None, sets: tuple[str, ...] = (), writes_file: bool = True):  # fmt: skip
    tripwire = Tripwire()
    try:
        run = run_agent(recording.agent, place or recording.place, recording.traj, mode="replay",
                        via=via or recording.via, faketime=faketime, scratch=tmp_path / "scratch", sets=sets,
                        upstream=f"http://127.0.0.1:{tripwire.port}" if (via or recording.via) == "base-url" else None)  # fmt: skip
    finally:
        tripwire.close()
    calls = len(recording.records)
    assert run.code == 0, run.describe()
    if writes_file:
        assert run.out_file.read_text() == FILE_TEXT, run.describe()
    assert f"replay report: {calls} of {calls} recorded calls served, 0 misses" in run.stderr, run.describe()
    assert "position" not in _rungs(run.stderr)
    assert run.upstream_connections() == [], run.proxy_log
    assert tripwire.connections == 0
    return run


def _rungs(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if "served (" in line), "")


def test_replay_in_the_same_home(recordings, tmp_path):
    replay(recordings["base-url"], tmp_path)


def test_replay_under_another_home_and_working_directory(recordings, tmp_path, agent):
    run = replay(recordings["base-url"], tmp_path, place=Place.make(tmp_path / "elsewhere"))
    assert "normalized" in _rungs(run.stderr), run.describe()
    # the report names the rules that made the calls match: the agent's preset's
    rules = dict(item.rsplit(" ", 1) for item in _rungs(run.stderr).partition("; rules: ")[2].split("; ")[0].split(", "))
    assert rules and all(name.startswith(f"{agent.name}:") for name in rules), run.describe()
    assert f"{agent.name}:abs-path" in rules, run.describe()


def _written(day: date) -> set[str]:
    """A day as agents write it into their prompts."""
    return {day.isoformat(), f"{day:%B} {day.day}, {day.year}", f"{day:%a %b %d %Y}"}


def test_replay_one_day_later(recordings, tmp_path, agent):
    recording = recordings["base-url"]
    # flow_detail=4: the proxy's log shows each request the agent sent in full
    run = replay(recording, tmp_path, faketime="+1d", sets=("flow_detail=4",))
    rungs = _rungs(run.stderr)
    assert "normalized" in rungs, run.describe()
    # The agent's clock really moved (for Codex, a static binary, under qemu-user):
    # it sent the next day's date, which the recording never holds, and a date
    # rule of its preset made the calls match.
    tomorrow = _written(date.today() + timedelta(days=1))
    recorded = json.dumps([r.request for r in recording.records], ensure_ascii=False)
    assert not any(form in recorded for form in tomorrow)
    assert any(form in run.proxy_log for form in tomorrow), run.proxy_log[-3000:]
    assert f"{agent.name}:iso-date" in rungs or f"{agent.name}:written-date" in rungs, rungs


def test_replay_through_https_proxy_under_another_home(recordings, tmp_path):
    run = replay(recordings["https-proxy"], tmp_path, place=Place.make(tmp_path / "elsewhere"))
    assert "normalized" in _rungs(run.stderr), run.describe()
