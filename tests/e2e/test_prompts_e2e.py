"""The prompt registry end to end: a real mitmdump with the addon, the openai and
anthropic SDKs as agents, the stand-in upstream. Calls are tagged (exact,
template with its variables, no match) in every API; an override and an A/B
split change what the upstream receives and are recorded, replayed and sent to
an anti-call driver as the version sent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from anthropic import Anthropic
from llmtraj.anticall import AntiCallClient
from llmtraj.anticall.control_file import read_control_file
from llmtraj.cli.proxy_process import ProxyProcess, ProxyStartError
from llmtraj.core.record import PromptTag
from llmtraj.prompts.override import parse_assignment
from llmtraj.prompts.registry import PromptRegistry, text_hash
from openai import AsyncOpenAI, BadRequestError, OpenAI

from ..conftest import wait_records

KEY = "sk-test-prompts-0123456789"
HELPFUL = "You are a helpful assistant for {{company}}. Today is {{date}}."
TERSE = "You are terse. You work for {{company}} and today is {{date}}."
CODER = "You write Python. Be exact."
AGENT_PROMPT = "You are a helpful assistant for ACME. Today is Monday."
SENT_TERSE = "You are terse. You work for ACME and today is Monday."
USER = [{"role": "user", "content": "hi"}]
LLM_TRAJ = str(Path(sys.executable).with_name("llm-traj"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "prompts.sqlite"
    with PromptRegistry(path) as reg:
        reg.add("greet", HELPFUL, message="first", labels=["production"])
        reg.add("greet", TERSE, message="terser", labels=["staging"])
        reg.add("coder", CODER)
    return path


def proxy_for(upstream_url: str, traj: Path, registry: Path, **options) -> ProxyProcess:
    return ProxyProcess(upstream=upstream_url,
                        options={"llm_traj_path": traj, "llm_traj_prompts": registry, **options}).start()  # fmt: skip


def chat(proxy: ProxyProcess, session: str, system: str | None, role: str = "system", **kw):
    client = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=KEY, max_retries=0)
    messages = ([{"role": role, "content": system}] if system is not None else []) + USER
    return client.chat.completions.with_raw_response.create(model="standin", messages=messages, **kw)


def sent_body(upstream, before: int) -> dict:
    """The last request body the upstream received after the first `before` ones."""
    assert len(upstream.requests) > before
    return json.loads(upstream.requests[-1].body)


def test_tagging_in_every_api(upstream, registry, tmp_path):
    proxy = proxy_for(upstream.url, tmp_path, registry)
    try:
        chat(proxy, "s", CODER)
        chat(proxy, "s", AGENT_PROMPT, role="developer", stream=True, stream_options={"include_usage": True})
        chat(proxy, "s", "You are someone else.")
        chat(proxy, "s", None)
        Anthropic(base_url=f"{proxy.url}/s/claude", api_key=KEY, max_retries=0).messages.create(
            model="standin-text", max_tokens=50, messages=USER,
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1"},
                    {"type": "text", "text": "You are terse. You work for Initech and today is Friday.",
                     "cache_control": {"type": "ephemeral"}}])  # fmt: skip
        OpenAI(base_url=f"{proxy.url}/s/codex/v1", api_key=KEY, max_retries=0).responses.create(
            model="standin-text", instructions=CODER, input="hi")
    finally:
        proxy.stop()
    records = {(r.session, r.index): r for r in wait_records(tmp_path / "s.jsonl", 4)}
    exact, template, none, without = (records["s", i].prompt for i in (1, 2, 3, 4))
    assert (exact.name, exact.version, exact.label, exact.match, exact.hash) == ("coder", 1, "latest", "exact", text_hash(CODER))
    assert (template.name, template.version, template.label, template.match) == ("greet", 1, "production", "template")
    assert template.variables == {"company": "ACME", "date": "Monday"} and template.override is None
    assert (none.name, none.match, none.hash) == (None, "none", text_hash("You are someone else."))
    assert (without.match, without.hash) == ("none", None)
    [claude] = wait_records(tmp_path / "claude.jsonl", 1)
    assert (claude.prompt.name, claude.prompt.version, claude.prompt.label, claude.prompt.match) == ("greet", 2, "staging", "template")
    assert claude.prompt.variables == {"company": "Initech", "date": "Friday"}
    [codex] = wait_records(tmp_path / "codex.jsonl", 1)
    assert (codex.api, codex.prompt.name, codex.prompt.match) == ("responses", "coder", "exact")

    # stats --by prompt, the command as a subprocess
    out = subprocess.run([LLM_TRAJ, "stats", str(tmp_path), "--by", "prompt", "--json"], capture_output=True, text=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert sorted(rows) == ["(no system prompt)", f"(unregistered {text_hash('You are someone else.')})", "all",
                            "coder/1", "greet/1", "greet/2"]  # fmt: skip
    assert (rows["coder/1"]["calls"], rows["coder/1"]["ok"], rows["all"]["calls"]) == (2, 2, 6)
    assert rows["greet/1"]["streamed"] == 1 and rows["greet/1"]["total_tokens"] > 0 and rows["greet/1"]["mean_latency"] > 0
    table = subprocess.run([LLM_TRAJ, "stats", str(tmp_path), "--by", "prompt"], capture_output=True, text=True).stdout
    assert "prompt coder/1" in table and "mean latency" in table
    shown = subprocess.run([LLM_TRAJ, "show", str(tmp_path / "s.jsonl")], capture_output=True, text=True).stdout
    assert "    prompt: coder/1 (exact)" in shown and "    prompt: greet/1 (template; company=ACME; date=Monday)" in shown
    # exports carry the tag: openai-chat samples and ATIF steps
    samples = [json.loads(line) for line in subprocess.run(
        [LLM_TRAJ, "export", str(tmp_path / "s.jsonl"), "--format", "openai-chat"], capture_output=True, text=True).stdout.splitlines()]
    assert [s["prompt"].get("name") for s in samples] == ["coder", "greet", None, None]
    assert samples[1]["prompt"] == {"name": "greet", "version": 1, "label": "production", "match": "template",
                                    "variables": {"company": "ACME", "date": "Monday"}, "hash": text_hash(AGENT_PROMPT)}
    [document] = [json.loads(line) for line in subprocess.run(
        [LLM_TRAJ, "export", str(tmp_path / "claude.jsonl"), "--format", "atif"], capture_output=True, text=True).stdout.splitlines()]
    assert document["agent"]["extra"]["prompt"]["name"] == "greet"
    assert [s["extra"]["prompt"]["version"] for s in document["steps"] if s["source"] == "agent"] == [2]
    bad = subprocess.run([LLM_TRAJ, "stats", str(tmp_path), "--by", "colour"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "llm-traj: --by 'colour': use one or more of session, model, prompt, comma-separated"


def test_override_record_replay_and_ab(upstream, registry, tmp_path):
    recorded = tmp_path / "rec"
    ab = "greet@production=1,greet/2=1"
    proxy = proxy_for(upstream.url, recorded, registry, llm_traj_prompt_override="greet@staging")
    try:
        before = len(upstream.requests)
        chat(proxy, "over", AGENT_PROMPT)
        assert sent_body(upstream, before)["messages"][0] == {"role": "system", "content": SENT_TERSE}
        before = len(upstream.requests)
        Anthropic(base_url=f"{proxy.url}/s/over-claude", api_key=KEY, max_retries=0).messages.create(
            model="standin-text", max_tokens=50, messages=USER, system=AGENT_PROMPT)
        assert sent_body(upstream, before)["system"] == SENT_TERSE
        before = len(upstream.requests)
        list(OpenAI(base_url=f"{proxy.url}/s/over-codex/v1", api_key=KEY, max_retries=0).responses.create(
            model="standin-text", instructions=AGENT_PROMPT, input="hi", stream=True))
        assert sent_body(upstream, before)["instructions"] == SENT_TERSE
        # legacy completions have no system prompt: sent as the agent made them
        before = len(upstream.requests)
        legacy = b'{"model": "standin-text", "prompt": "Say hi"}'
        OpenAI(base_url=f"{proxy.url}/s/over-legacy/v1", api_key=KEY, max_retries=0).completions.create(
            model="standin-text", prompt="Say hi")
        assert json.loads(upstream.requests[-1].body) == json.loads(legacy) and len(upstream.requests) == before + 1
        # a session's own override, set through the proxy before its first call, then fixed
        control = f"{proxy.url}/llm-traj/prompt"
        # an agent reaches the proxy's port, not its control file: it cannot pick its own prompt
        assert put(control, {"session": "pinned", "prompt": "greet/1"}, token=None)[0] == 401
        assert put(control, {"session": "pinned", "prompt": "greet/1"}, token="not-the-token")[0] == 401
        assert get_json(f"{control}?session=pinned")["assignment"] == "greet@staging"  # unchanged
        token = read_control_file(recorded / "control.json").token
        assert put(control, {"session": "pinned", "prompt": "coder/1"}, token) == (200, {"session": "pinned", "assignment": "coder/1"})
        chat(proxy, "pinned", AGENT_PROMPT)
        assert put(control, {"session": "pinned", "prompt": "greet/1"}, token)[0] == 409
        assert put(control, {"session": "x", "prompt": "greet@canary"}, token) == (400, {"error": "prompt 'greet' has no label 'canary'; its labels: latest, production, staging"})
    finally:
        proxy.stop()
    [over] = wait_records(recorded / "over.jsonl", 1)
    assert over.request["messages"][0]["content"] == SENT_TERSE
    assert (over.prompt.name, over.prompt.version, over.prompt.label, over.prompt.match) == ("greet", 2, "staging", "template")
    assert over.prompt.override == "greet@staging" and over.prompt.original_hash == text_hash(AGENT_PROMPT)
    assert over.prompt.variables == {"company": "ACME", "date": "Monday"}
    [pinned] = wait_records(recorded / "pinned.jsonl", 1)
    assert (pinned.prompt.name, pinned.prompt.match, pinned.prompt.override) == ("coder", "exact", "coder/1")
    assert wait_records(recorded / "over-claude.jsonl", 1)[0].prompt.override == "greet@staging"
    [legacy_record] = wait_records(recorded / "over-legacy.jsonl", 1)
    assert legacy_record.prompt == PromptTag(match="none")
    [codex] = wait_records(recorded / "over-codex.jsonl", 1)
    assert codex.complete and codex.stream and codex.request["instructions"] == SENT_TERSE
    assert (codex.prompt.version, codex.prompt.override, codex.prompt.original_hash) == (2, "greet@staging", text_hash(AGENT_PROMPT))

    # replay with the same override: the agent's own prompt is rewritten before matching
    proxy = proxy_for("http://127.0.0.1:9", recorded, registry, llm_traj_mode="replay",
                      llm_traj_prompt_override="greet@staging")  # fmt: skip
    try:
        reply = chat(proxy, "over", AGENT_PROMPT)
        assert reply.status_code == 200 and reply.headers["x-llm-traj-match"] == "exact"
    finally:
        proxy.stop()
    # without it the recording does not have the agent's own prompt
    proxy = proxy_for("http://127.0.0.1:9", recorded, registry, llm_traj_mode="replay")
    try:
        with pytest.raises(BadRequestError, match="replay"):
            chat(proxy, "over", AGENT_PROMPT)
    finally:
        proxy.stop()

    # A/B: each session gets its arm by a stable hash of its id, for all its calls
    proxy = proxy_for(upstream.url, tmp_path / "ab", registry, llm_traj_prompt_override=ab)
    sessions = [f"ab-{i}" for i in range(8)]
    try:
        for session in sessions:
            for _ in range(2):
                chat(proxy, session, AGENT_PROMPT)
    finally:
        proxy.stop()
    assignment = parse_assignment(ab)
    versions = set()
    for session in sessions:
        arm = assignment.arm_for(session)
        want = 1 if str(arm.ref) == "greet@production" else 2
        records = wait_records(tmp_path / "ab" / f"{session}.jsonl", 2)
        assert [(r.prompt.name, r.prompt.version) for r in records] == [("greet", want)] * 2
        assert all(r.prompt.override == f"{arm.ref} (A/B {ab})" for r in records)
        versions.add(want)
    assert versions == {1, 2}  # 8 sessions, both arms used (fixed ids: deterministic)
    # replay with the same split: each session gets its arm again, so its calls match as recorded
    proxy = proxy_for("http://127.0.0.1:9", tmp_path / "ab", registry, llm_traj_mode="replay", llm_traj_prompt_override=ab)
    try:
        assert_replayed_exactly(proxy, sessions, calls=2)
    finally:
        proxy.stop()


def assert_replayed_exactly(proxy: ProxyProcess, sessions: list[str], calls: int) -> None:
    """Each session's calls, made with the agent's own prompt, are served from the recording by an exact match."""
    for session in sessions:
        for _ in range(calls):
            reply = chat(proxy, session, AGENT_PROMPT)
            assert reply.status_code == 200 and reply.headers["x-llm-traj-match"] == "exact", session


def put(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    """PUT /llm-traj/prompt with the control file's token (None: without one)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


async def drive_one(proxy: ProxyProcess, control_file: Path, session: str) -> tuple[str, object]:
    """One anti-call chat call of `session` with the agent's prompt: (the system prompt the driver saw, the reply)."""
    agent = AsyncOpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=KEY, max_retries=0)
    call = asyncio.create_task(agent.chat.completions.create(
        model="m", messages=[{"role": "system", "content": AGENT_PROMPT}, *USER]))  # fmt: skip
    async with AntiCallClient.from_control_file(control_file) as driver:
        event = await driver.get_request(session, 10)
        seen = event.request["messages"][0]["content"]
        await driver.send_response(event, text="ok")
    reply = await call
    await agent.close()
    return seen, reply


def test_override_in_anticall(registry, tmp_path):
    proxy = proxy_for("http://127.0.0.1:9", tmp_path, registry, llm_traj_mode="anticall",
                      llm_traj_prompt_override="greet/2")  # fmt: skip
    try:
        seen, reply = asyncio.run(asyncio.wait_for(drive_one(proxy, tmp_path / "control.json", "held"), 60))
    finally:
        proxy.stop()
    assert seen == SENT_TERSE and reply.choices[0].message.content == "ok"
    [record] = wait_records(tmp_path / "held.jsonl", 1)
    assert (record.mode, record.prompt.name, record.prompt.version, record.prompt.override) == ("anticall", "greet", 2, "greet/2")
    assert record.prompt.original_hash == text_hash(AGENT_PROMPT)


def test_ab_split_in_anticall(registry, tmp_path):
    """The driver is handed each session's calls with its arm's version, by the same hash as in record and replay."""
    ab = "greet@production=1,greet/2=1"
    sessions = [f"ab-{i}" for i in range(8)]  # both arms among them (fixed ids: deterministic)
    proxy = proxy_for("http://127.0.0.1:9", tmp_path, registry, llm_traj_mode="anticall", llm_traj_prompt_override=ab)

    async def drive_all():
        return [await drive_one(proxy, tmp_path / "control.json", session) for session in sessions]

    try:
        seen = [text for text, _ in asyncio.run(asyncio.wait_for(drive_all(), 120))]
    finally:
        proxy.stop()
    assignment = parse_assignment(ab)
    wanted = [1 if str(assignment.arm_for(s).ref) == "greet@production" else 2 for s in sessions]
    assert set(wanted) == {1, 2}
    assert seen == [AGENT_PROMPT if want == 1 else SENT_TERSE for want in wanted]
    for session, want in zip(sessions, wanted):
        [record] = wait_records(tmp_path / f"{session}.jsonl", 1)
        assert (record.prompt.name, record.prompt.version, record.prompt.override) == ("greet", want, f"{assignment.arm_for(session).ref} (A/B {ab})")


@pytest.mark.parametrize("options, message", [
    ({"llm_traj_prompt_override": "greet@canary"}, "llm_traj_prompt_override: prompt 'greet' has no label 'canary'"),
    ({"llm_traj_prompt_override": "greet/9"}, "has no version 9"),
    ({"llm_traj_prompt_override": "greet/1=x,coder/1=1"}, "the weight must be a number above 0"),
])  # fmt: skip
def test_bad_override_stops_startup_with_one_line(registry, tmp_path, options, message):
    with pytest.raises(ProxyStartError, match=message):
        proxy_for("http://127.0.0.1:9", tmp_path, registry, **options)


def test_override_needs_an_existing_registry(tmp_path):
    with pytest.raises(ProxyStartError, match="no prompt registry at"):
        proxy_for("http://127.0.0.1:9", tmp_path, tmp_path / "missing.sqlite", llm_traj_prompt_override="greet/1")


AGENT = """
from openai import OpenAI
client = OpenAI(max_retries=0, api_key="sk-dummy")
for step in range(2):
    client.chat.completions.create(model="standin-text", stream=step == 1,
        messages=[{"role": "system", "content": %r}, {"role": "user", "content": f"step {step}"}])
""" % AGENT_PROMPT


def test_llm_traj_run_with_a_prompt(upstream, registry, tmp_path):
    (tmp_path / "agent.py").write_text(AGENT)
    run = [LLM_TRAJ, "run", "--upstream", upstream.url, "--traj", str(tmp_path / "t"), "--session", "task-1",
           "--prompts", str(registry)]  # fmt: skip
    before = len(upstream.requests)
    out = subprocess.run([*run, "--prompt", "greet@staging", "--", sys.executable, str(tmp_path / "agent.py")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [json.loads(r.body)["messages"][0]["content"] for r in upstream.requests[before:]] == [SENT_TERSE] * 2
    records = wait_records(tmp_path / "t" / "task-1.jsonl", 2)
    assert [(r.prompt.name, r.prompt.version, r.prompt.override) for r in records] == [("greet", 2, "greet@staging")] * 2
    bad = subprocess.run([*run, "--prompt", "greet@nope", "--", sys.executable, str(tmp_path / "agent.py")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "llm_traj_prompt_override: prompt 'greet' has no label 'nope'" in bad.stderr
