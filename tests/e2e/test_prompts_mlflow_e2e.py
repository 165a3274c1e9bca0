"""MLflow's prompt registry read live (`llm_traj_prompts=mlflow:TRACKING_URI`)
end to end: a local MLflow store (SQLite, no server) and a real mitmdump with
the addon. Calls are tagged with MLflow's versions; an A/B split between two
MLflow aliases assigns each session its arm by the same stable hash in record,
replay and anti-call modes; a version registered or an alias moved in MLflow
while the proxy runs reaches the sessions that start after it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import mlflow
import pytest
from llmtraj.anticall.control_file import read_control_file
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.prompts.override import parse_assignment
from llmtraj.prompts.registry import text_hash
from openai import OpenAI

from ..conftest import wait_records
from .test_prompts_e2e import AGENT_PROMPT, assert_replayed_exactly, drive_one, put

KEY = "sk-test-mlflow-0123456789"
HELPFUL = "You are a helpful assistant for {{company}}. Today is {{date}}."
TERSE = "You are terse. You work for {{company}} and today is {{date}}."
SENT = {1: AGENT_PROMPT, 2: "You are terse. You work for ACME and today is Monday."}
USER = [{"role": "user", "content": "hi"}]
AB = "prompts:/greet@production=1,prompts:/greet@staging=1"
SESSIONS = [f"ab-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local MLflow store: greet/1 (production), greet/2 (staging)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.register_prompt(name="greet", template=HELPFUL, commit_message="first")
    client.register_prompt(name="greet", template=TERSE, commit_message="terser", tags={"team": "rl"})
    client.set_prompt_alias("greet", alias="production", version=1)
    client.set_prompt_alias("greet", alias="staging", version=2)
    return uri, client


def proxy_for(upstream_url: str, traj: Path, uri: str, **options) -> ProxyProcess:
    proxy = ProxyProcess(upstream=upstream_url, options={"llm_traj_path": traj, "llm_traj_prompts": f"mlflow:{uri}", **options})
    return proxy.start(timeout=120)  # (importing MLflow takes a while)


def chat(proxy: ProxyProcess, session: str, system: str):
    client = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=KEY, max_retries=0)
    return client.chat.completions.with_raw_response.create(model="standin", messages=[{"role": "system", "content": system}, *USER])


def arm_version(session: str) -> int:
    return 1 if str(parse_assignment(AB).arm_for(session).ref) == "greet@production" else 2


def test_ab_split_from_mlflow_in_record_replay_and_anticall(upstream, store, tmp_path):
    uri, _ = store
    assert {arm_version(s) for s in SESSIONS} == {1, 2}  # both arms used (fixed ids: deterministic)
    recorded = tmp_path / "rec"

    # record: each session's calls go upstream with its arm's version, tagged with MLflow's numbers
    proxy = proxy_for(upstream.url, recorded, uri, llm_traj_prompt_override=AB)
    try:
        for session in SESSIONS:
            for _ in range(2):
                before = len(upstream.requests)
                chat(proxy, session, AGENT_PROMPT)
                sent = json.loads(upstream.requests[before].body)["messages"][0]["content"]
                assert sent == SENT[arm_version(session)], session
    finally:
        proxy.stop()
    for session in SESSIONS:
        want = arm_version(session)
        records = wait_records(recorded / f"{session}.jsonl", 2)
        assert [(r.prompt.name, r.prompt.version, r.prompt.match) for r in records] == [("greet", want, "template")] * 2
        assert {r.prompt.label for r in records} == {"production" if want == 1 else "staging"}
        assert all(r.prompt.override == f"{parse_assignment(AB).arm_for(session).ref} (A/B {parse_assignment(AB)})" for r in records)
        assert all(r.prompt.original_hash == text_hash(AGENT_PROMPT) for r in records)
        assert records[0].prompt.variables == {"company": "ACME", "date": "Monday"}

    # replay: the same split rewrites each session's calls as recorded, so every call is an exact match
    proxy = proxy_for("http://127.0.0.1:9", recorded, uri, llm_traj_mode="replay", llm_traj_prompt_override=AB)
    try:
        assert_replayed_exactly(proxy, SESSIONS, calls=2)
    finally:
        proxy.stop()

    # anti-call: the driver is handed each session's request with its arm's version
    held = tmp_path / "held"
    proxy = proxy_for("http://127.0.0.1:9", held, uri, llm_traj_mode="anticall", llm_traj_prompt_override=AB)

    async def drive() -> dict[str, str]:
        return {session: (await drive_one(proxy, held / "control.json", session))[0] for session in SESSIONS[:4]}

    try:
        seen = asyncio.run(asyncio.wait_for(drive(), 120))
    finally:
        proxy.stop()
    for session in SESSIONS[:4]:
        want = arm_version(session)
        assert seen[session] == SENT[want]
        [record] = wait_records(held / f"{session}.jsonl", 1)
        assert (record.mode, record.prompt.name, record.prompt.version) == ("anticall", "greet", want)


def test_mlflow_changes_reach_new_sessions_while_the_proxy_runs(upstream, store, tmp_path):
    uri, client = store
    proxy = proxy_for(upstream.url, tmp_path, uri, llm_traj_prompt_override="prompts:/greet@production")
    kind = "You are kind. You help {{company}}."

    def until(what: str, attempt_passes) -> int:
        deadline = time.monotonic() + 90
        for attempt in range(1, 1000):
            if attempt_passes(attempt):
                return attempt
            assert time.monotonic() < deadline, f"{what} never reached the proxy"
            time.sleep(1)

    def sent_v3(attempt: int) -> bool:
        before = len(upstream.requests)
        chat(proxy, f"after-{attempt}", AGENT_PROMPT)
        return json.loads(upstream.requests[before].body)["messages"][0]["content"] == "You are kind. You help ACME."

    def tagged_late(attempt: int) -> bool:
        session = f"late-{attempt}"
        token = read_control_file(tmp_path / "control.json").token
        assert put(f"{proxy.url}/llm-traj/prompt", {"session": session, "prompt": "none"}, token)[0] == 200  # the agent's own
        chat(proxy, session, "You arrived late.")
        [record] = wait_records(tmp_path / f"{session}.jsonl", 1)
        return record.prompt.name == "late"

    try:
        chat(proxy, "before", AGENT_PROMPT)
        # in MLflow, while the proxy runs: a new version, production moved to it, and a new prompt
        client.register_prompt(name="greet", template=kind, commit_message="kind")
        client.set_prompt_alias("greet", alias="production", version=3)
        client.register_prompt(name="late", template="You arrived late.")
        # the proxy copies MLflow again within seconds: sessions that start after that get greet/3 ...
        after = until("the alias moved in MLflow", sent_v3)
        # ... and the record writer tags with the new prompt
        late = until("the prompt registered in MLflow", tagged_late)
        # a session keeps the version it started with
        before = len(upstream.requests)
        chat(proxy, "before", AGENT_PROMPT)
        assert json.loads(upstream.requests[before].body)["messages"][0]["content"] == AGENT_PROMPT
    finally:
        proxy.stop()
    assert [r.prompt.version for r in wait_records(tmp_path / "before.jsonl", 2)] == [1, 1]
    [record] = wait_records(tmp_path / f"after-{after}.jsonl", 1)
    assert (record.prompt.name, record.prompt.version, record.prompt.label, record.prompt.override) == (
        "greet", 3, "production", "greet@production")
    [record] = wait_records(tmp_path / f"late-{late}.jsonl", 1)
    assert (record.prompt.name, record.prompt.version, record.prompt.match, record.prompt.override) == ("late", 1, "exact", None)
