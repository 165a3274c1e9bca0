"""Claude Code and Codex on a chat-completions upstream through the bridge:
the real CLIs (scripts/agents-setup) run under `llm-traj run --mode record`
with a config whose route speaks chat completions (`upstream_api`), the
scripted policy as that upstream (chat_policy.py: a streamed tool call that
writes a file, then a final answer). Each agent must finish the task on the
bridged answers; its trajectory, in its own API, must then replay with no
upstream.

Run by scripts/test-agents, not by scripts/test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llmtraj.core.store import read_records

from .chat_policy import ChatPolicy
from .harness import CLAUDE, CODEX, FILE_TEXT, SESSION, Agent, Place, run_agent
from .test_agent_replay import replay

# Codex offers its built-in web search tool unless told not to: the bridge refuses it (a chat upstream has none)
CODEX_BRIDGED = dataclasses.replace(CODEX, env={**CODEX.env, "LLM_TRAJ_TEST_CODEX_CONFIG": 'web_search = "disabled"'})
AGENTS = {agent.name: agent for agent in (CLAUDE, CODEX_BRIDGED)}
API = {"claude-code": "anthropic.messages", "codex": "responses"}
pytestmark = pytest.mark.timeout(900)


class BridgedRecording:
    """A recording as `test_agent_replay.replay` takes it."""

    def __init__(self, agent: Agent, root: Path) -> None:
        self.agent, self.via = agent, "base-url"
        self.place = Place.make(root / "rec")
        self.traj = root / "traj"
        config = root / "bridge.toml"
        with ChatPolicy(root / "chat-policy.jsonl") as policy:
            config.write_text(f'default_route = "engine"\n[providers.engine]\nbase_url = "{policy.url}/v1"\n'
                              'upstream_api = "chat.completions"\n')  # fmt: skip
            self.run = run_agent(agent, self.place, self.traj, mode="record", config=config, scratch=root / "scratch")
            self.upstream_requests = policy.requests()
        self.records = list(read_records(self.traj / f"{SESSION}.jsonl")) if self.traj.exists() else []


@pytest.fixture(scope="module", params=sorted(AGENTS))
def recording(request, tmp_path_factory) -> BridgedRecording:
    agent = AGENTS[request.param]
    return BridgedRecording(agent, tmp_path_factory.mktemp(f"{agent.name}-bridge"))


def test_the_agent_finishes_the_task_on_bridged_answers(recording):
    run = recording.run
    assert run.code == 0, run.describe() + "\n--- proxy\n" + run.proxy_log[-3000:]
    assert run.out_file.read_text() == FILE_TEXT, run.describe()
    records = recording.records
    assert len(records) >= 2, run.describe()
    assert all(r.complete and r.status == 200 and r.bridge is not None for r in records), [r.error for r in records]
    assert {r.api for r in records} == {API[recording.agent.name]}
    # the tool call went to the agent in its own API, and its result came back to the upstream as a tool message
    tool_results = [m for req in recording.upstream_requests for m in req["request"]["messages"] if m["role"] == "tool"]
    assert tool_results, json.dumps(recording.upstream_requests[-1])[:2000]
    assert all(r.stream for r in records if r.request.get("stream"))


def test_the_bridged_trajectory_replays(recording, tmp_path):
    replay(recording, tmp_path)
