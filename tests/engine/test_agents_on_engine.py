"""Claude Code and Codex on the real engine through the bridge: the real CLIs
(scripts/agents-setup) run under `llm-traj run --mode record` with a route to
the vLLM CPU engine, which speaks only chat completions, so their Messages and
Responses calls are bridged, with token capture. The tiny random model's answer
is pinned by the route's sampling control (a `structured_outputs` regex; the
grammar then ends the turn), so each agent gets a well-formed, streamed, final
answer from the engine itself. Each must exit cleanly on it and print it, every
record must hold the engine's complete tokens, and the trajectory must replay
with no upstream.

Needs the engine and the agents: scripts/test-engine sets up both."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from llmtraj.core.store import read_records

from ..agents.harness import CLAUDE, CODEX, SESSION, Agent, Place, run_agent
from ..agents.test_agent_replay import replay
from .conftest import MODEL_NAME

ANSWER = "Done."
ASK = "Reply with the single word Done."
# Codex asks for the model its config names (harness: run-codex); the route renames it for the engine.
CODEX_MODEL = "gpt-5.1-codex"
AGENTS = {
    "claude-code": dataclasses.replace(
        CLAUDE, command=("claude", "-p", ASK, "--dangerously-skip-permissions", "--model", MODEL_NAME),
        env={**CLAUDE.env, "ANTHROPIC_SMALL_FAST_MODEL": MODEL_NAME, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL_NAME}),
    # (the bridge refuses Codex's built-in web search: a chat upstream has none)
    "codex": dataclasses.replace(CODEX, command=(CODEX.command[0], ASK),
                                 env={**CODEX.env, "LLM_TRAJ_TEST_CODEX_CONFIG": 'web_search = "disabled"'}),
}  # fmt: skip
API = {"claude-code": "anthropic.messages", "codex": "responses"}
# Prefill of an agent's whole prompt (tens of thousands of tokens) on the CPU takes a while per call.
pytestmark = pytest.mark.timeout(1200)


class EngineRecording:
    """A recording as `test_agent_replay.replay` takes it."""

    def __init__(self, agent: Agent, root: Path, engine) -> None:
        self.agent, self.via = agent, "base-url"
        self.place = Place.make(root / "rec")
        self.traj = root / "traj"
        config = root / "engine.toml"
        config.write_text(f"""
default_route = "engine"
[providers.engine]
base_url = "{engine.url}/v1"
kind = "vllm"
upstream_api = "chat.completions"
capture_tokens = true
sampling = {{fixed = {{max_tokens = 16, structured_outputs = {{regex = {json.dumps(ANSWER.replace(".", "[.]"))}}}}}}}

[models."{CODEX_MODEL}"]
provider = "engine"
upstream_model = "{MODEL_NAME}"
""")
        self.run = run_agent(agent, self.place, self.traj, mode="record", config=config, scratch=root / "scratch",
                             timeout=900)  # fmt: skip
        self.records = list(read_records(self.traj / f"{SESSION}.jsonl")) if self.traj.exists() else []


@pytest.fixture(scope="module", params=sorted(AGENTS))
def recording(request, engine, tmp_path_factory) -> EngineRecording:
    if shutil.which("claude") is None or shutil.which("codex") is None:
        pytest.fail("the agent CLIs are not on PATH: run scripts/test-engine (it runs scripts/agents-setup)")
    return EngineRecording(AGENTS[request.param], tmp_path_factory.mktemp(f"{request.param}-engine"), engine)


def test_the_agent_accepts_the_engines_answer(recording, engine):
    run = recording.run
    assert run.code == 0, run.describe() + "\n--- proxy\n" + run.proxy_log[-3000:]
    assert ANSWER in run.stdout, run.describe()
    records = recording.records
    answered = [record for record in records if not _own_format(record)]
    assert answered, run.describe()
    for record in answered:
        assert record.api == API[recording.agent.name] and record.complete and record.status == 200, (
            record.index, record.response)
        assert record.bridge is not None and record.bridge.status == 200, record.bridge
        assert record.bridge.request["model"] == engine.model
        # the engine's own tokens, complete: the answer the agent got is what the engine generated
        assert record.tokens is not None and record.tokens.complete, record.tokens and record.tokens.problems
        usage = record.bridge.response["usage"]
        assert len(record.tokens.choices[0].completion_ids) == usage["completion_tokens"] > 0
        assert record.bridge.response["choices"][0]["message"]["content"] == ANSWER
    # A side call with its own JSON schema (Claude Code's title) cannot also take the route's regex: the
    # engine refuses the pair, and the agent gets that 400 in its own API's error shape (and carries on).
    for record in records:
        if _own_format(record):
            assert record.status == 400 and record.bridge.status == 400, record.response
            assert "structured" in record.response["error"]["message"]  # (the error object of either API)
    assert any(record.stream for record in records)  # the agents stream their calls


def _own_format(record) -> bool:
    """Whether the agent asked for a JSON schema of its own (Anthropic `output_config.format`, Responses `text.format`)."""
    request = record.request
    own = (request.get("output_config") or {}).get("format") or (request.get("text") or {}).get("format") or {}
    return own.get("type") == "json_schema"


def test_the_trajectory_replays(recording, tmp_path):
    run = replay(recording, tmp_path, writes_file=False)
    assert ANSWER in run.stdout, run.describe()
