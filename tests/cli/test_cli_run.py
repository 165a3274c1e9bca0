"""The `llm-traj` command driven for real in a subprocess: run (both --via
modes), exit codes, signals, the background service, and user-facing errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llmtraj.core.store import read_records
from llmtraj.testing.standin import StandinUpstream, make_self_signed_cert

LLM_TRAJ = str(Path(sys.executable).with_name("llm-traj"))

AGENT = textwrap.dedent(
    """
    import os, sys, time
    from openai import OpenAI
    client = OpenAI(max_retries=0, api_key="sk-dummy-agent-key-0123456789")
    for step in range(2):
        chunks = client.chat.completions.create(
            model="standin-text", messages=[{"role": "user", "content": f"step {step}"}], stream=step == 1)
        if step == 1:
            list(chunks)
    print("agent done", flush=True)
    if sys.argv[1] == "hang":
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agent") / "agent.py"
    path.write_text(AGENT)
    return path


def llm_traj(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([LLM_TRAJ, *args], capture_output=True, text=True, timeout=timeout, **kw)


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_run_base_url_records_and_returns_the_agent_exit_code(upstream, agent, tmp_path):
    traj = tmp_path / "traj"
    r = llm_traj("run", "--upstream", upstream.url, "--traj", str(traj), "--session", "s1",
                 "--proxy-log", str(tmp_path / "proxy.log"), "--", sys.executable, str(agent), "3")
    assert r.returncode == 3, r.stderr
    # the proxy's log, kept where asked (the agent's conversation may be quoted there: the owner's only)
    assert "listening at" in (tmp_path / "proxy.log").read_text()
    assert stat.S_IMODE((tmp_path / "proxy.log").stat().st_mode) == 0o600
    assert "agent done" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("llm-traj: agent exited 3; session s1: 2 calls, 0 failed")
    records = list(read_records(traj / "s1.jsonl"))
    assert [(x.index, x.stream) for x in records] == [(1, False), (2, True)]
    assert "sk-dummy-agent-key" not in (traj / "s1.jsonl").read_text()
    assert processes_mentioning(str(traj)) == []


def test_run_records_a_dead_upstream_as_a_502(tmp_path):
    """The command's proxy connects lazily: an upstream that is down answers the
    agent with a 502 in its API's shape and leaves a record (mitmproxy's eager
    default would drop the connection unrecorded)."""
    agent = tmp_path / "agent.py"
    agent.write_text(textwrap.dedent("""
        import openai
        client = openai.OpenAI(max_retries=0, api_key="sk-dummy-agent-key-0123456789")
        try:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as exc:
            print("status", exc.status_code, flush=True)
    """))
    traj = tmp_path / "traj"
    r = llm_traj("run", "--upstream", "http://127.0.0.1:9", "--traj", str(traj), "--session", "s1", "--",
                 sys.executable, str(agent))
    assert "status 502" in r.stdout, (r.stdout, r.stderr)
    [record] = read_records(traj / "s1.jsonl")
    assert record.status is None and not record.complete and record.error is not None


def test_run_https_proxy_mode_against_https_upstream(agent, tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    traj = tmp_path / "traj"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with StandinUpstream(tls=(cert, key)) as up:
        env = {**os.environ, "OPENAI_BASE_URL": f"{up.url}/v1", "TMPDIR": str(scratch)}
        r = llm_traj("run", "--via", "https-proxy", "--traj", str(traj), "--session", "tls",
                     "--set", "ssl_insecure=true", "--", sys.executable, str(agent), "0", env=env)
    assert r.returncode == 0, r.stderr
    assert list(scratch.iterdir()) == []  # the run's proxy log, CA and bundle are gone with it
    records = list(read_records(traj / "tls.jsonl"))
    assert len(records) == 2 and records[0].url.startswith(up.url)
    assert records[1].response["choices"][0]["message"]["content"]


KEYLESS_AGENT = textwrap.dedent(
    """
    import os
    from openai import OpenAI
    assert "LLM_TRAJ_TEST_REAL_KEY" not in os.environ, "the real key reached the agent"
    reply = OpenAI(max_retries=0).chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    print("agent got:", reply.choices[0].message.content)
    """
)


def test_run_with_config_injects_the_key_the_agent_never_sees(upstream, tmp_path):
    """`--config` routes by model (no --upstream needed); the agent runs with no
    key of its own and without the proxy's key variable in its environment."""
    agent = tmp_path / "keyless.py"
    agent.write_text(KEYLESS_AGENT)
    config = tmp_path / "upstreams.yaml"
    config.write_text(
        f"providers:\n  local: {{base_url: '{upstream.url}/v1', api_key_env: LLM_TRAJ_TEST_REAL_KEY}}\n"
        "models:\n  fast: {provider: local, upstream_model: standin-text}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["LLM_TRAJ_TEST_REAL_KEY"] = "sk-real-key-for-the-proxy-only"
    r = llm_traj("run", "--config", str(config), "--traj", str(tmp_path / "traj"), "--session", "keys", "--",
                 sys.executable, str(agent), env=env)
    assert r.returncode == 0, r.stderr
    assert "agent got: Hello! I am the standin upstream" in r.stdout
    assert upstream.requests[-1].header("authorization") == "Bearer sk-real-key-for-the-proxy-only"
    text = (tmp_path / "traj" / "keys.jsonl").read_text()
    assert "sk-real-key" not in text and json.loads(text)["upstream"]["model"] == "standin-text"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_forwards_signals_and_leaves_nothing_behind(upstream, agent, tmp_path, signum):
    traj = tmp_path / "traj"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        [LLM_TRAJ, "run", "--upstream", upstream.url, "--traj", str(traj), "--", sys.executable, str(agent), "hang"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.stdout.readline().strip() == "agent done"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert len(list(read_records(traj / "default.jsonl"))) == 2
    assert processes_mentioning(str(traj)) == []
    assert processes_mentioning(str(agent)) == []
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--upstream", "http://127.0.0.1:1", "--", "no-such-agent-xyz"], "llm-traj: agent command not found: no-such-agent-xyz"),
        (["--upstream", "ftp://example", "--", "true"], "llm-traj: --upstream 'ftp://example' is not an http(s) URL"),
        (["--", "true"], "llm-traj: --upstream (or --config) is required to record in base-url mode"),
        (["--upstream", "http://127.0.0.1:1"], "llm-traj: no agent command: put it after --"),
        (["--upstream", "http://127.0.0.1:1", "--session", "../x", "--", "true"], "llm-traj: --session: invalid session id"),
        (["--upstream", "http://127.0.0.1:1", "--mode", "bogus", "--", "true"], "llm-traj: llm_traj_mode='bogus' is not a mode"),
    ],
)
def test_run_user_errors_are_one_line(tmp_path, args, message):
    r = llm_traj("run", "--traj", str(tmp_path / "t"), *args)
    assert r.returncode == 2
    assert r.stderr.startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_background_service_start_status_stop(upstream, tmp_path):
    state = ["--state-dir", str(tmp_path / "state")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = llm_traj("start", "--upstream", upstream.url, "--traj", str(tmp_path / "traj"), "--port", str(port), *state)
    assert r.returncode == 0, r.stderr
    try:
        assert llm_traj("status", *state).returncode == 0
        from openai import OpenAI

        OpenAI(base_url=f"http://127.0.0.1:{port}/s/svc/v1", api_key="x").chat.completions.create(
            model="standin-text", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 5
        while not (tmp_path / "traj" / "svc.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(read_records(tmp_path / "traj" / "svc.jsonl"))) == 1

        again = llm_traj("start", "--upstream", upstream.url, "--port", str(port), *state)
        assert again.returncode == 2 and "already runs" in again.stderr
        busy = llm_traj("start", "--upstream", upstream.url, "--port", str(port), "--name", "other", *state)
        assert busy.returncode == 2 and busy.stderr.strip() == f"llm-traj: port {port} on 127.0.0.1 is busy; choose another with --port"
    finally:
        stopped = llm_traj("stop", *state)
    assert stopped.returncode == 0, stopped.stderr
    status = llm_traj("status", *state)
    assert status.returncode == 3 and status.stderr.strip() == "llm-traj: default: not running"
    assert processes_mentioning(str(tmp_path / "traj")) == []


def test_show_missing_file_is_one_line(tmp_path):
    r = llm_traj("show", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and r.stderr.strip() == f"llm-traj: {tmp_path / 'nope.jsonl'} does not exist"


@pytest.fixture(scope="module")
def demo_traj(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    r = llm_traj("demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out / "demo.jsonl"


def test_stats_diff_export_commands(demo_traj, tmp_path):
    r = llm_traj("stats", str(demo_traj))
    assert r.returncode == 0 and "demo" in r.stdout
    rows = json.loads(llm_traj("stats", str(demo_traj), "--json").stdout)
    assert any(row.get("calls") == len(list(read_records(demo_traj))) for row in rows)

    assert llm_traj("diff", str(demo_traj), str(demo_traj)).returncode == 0
    changed = tmp_path / "changed.jsonl"
    lines = demo_traj.read_text().splitlines()
    first = json.loads(lines[0])
    first["request"]["messages"][-1]["content"] = "something else entirely"
    changed.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    r = llm_traj("diff", str(demo_traj), str(changed))
    assert r.returncode == 1 and "something else entirely" in r.stdout
    r = llm_traj("diff", str(demo_traj), str(tmp_path / "missing"))  # trouble is not a difference
    assert r.returncode == 2 and r.stderr.strip() == f"llm-traj: {tmp_path / 'missing'} does not exist"

    for fmt in ("openai-chat", "har", "atif"):
        out = tmp_path / f"out.{fmt}"
        r = llm_traj("export", str(demo_traj), "--format", fmt, "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600  # conversations: the owner's only
        text = out.read_text()
        if fmt == "har":
            assert json.loads(text)["log"]["version"] == "1.2"
        else:
            assert all(json.loads(line) for line in text.splitlines())


def test_inspect_commands_errors_are_one_line(tmp_path, demo_traj):
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(demo_traj.read_text().splitlines()[0] + "\n{not json\n" + demo_traj.read_text().splitlines()[0] + "\n")
    for args in (["stats", str(corrupt)], ["show", str(corrupt)], ["export", str(corrupt), "--format", "har"]):
        r = llm_traj(*args)  # the bad line is skipped with a warning, the rest read
        assert r.returncode == 0 and r.stderr.startswith(f"llm-traj: warning: {corrupt}:2: not valid JSON"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout
    r = llm_traj("compact", str(corrupt))  # would drop it: refused
    assert r.returncode == 2 and r.stderr.startswith(f"llm-traj: {corrupt}:2: not valid JSON"), r.stderr
    r = llm_traj("export", str(demo_traj), "--format", "csv")
    assert r.returncode == 2 and r.stderr.strip() == "llm-traj: --format 'csv': use one of openai-chat, har, atif, tokens"
    r = llm_traj("stats", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip() == f"llm-traj: {tmp_path / 'missing'} does not exist"


def test_web_shows_annotated_llm_flows(upstream, tmp_path):
    import httpx
    from openai import OpenAI

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = subprocess.Popen(
        [LLM_TRAJ, "web", "--upstream", upstream.url, "--traj", str(tmp_path / "traj"),
         "--port", str(ports[0]), "--web-port", str(ports[1])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"llm-traj: proxy http://127.0.0.1:{ports[0]}, web UI http://127.0.0.1:{ports[1]}/")
        OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/s/web/v1", api_key="x").chat.completions.create(
            model="standin-tools", messages=[{"role": "user", "content": "hi"}], stream=True).close()
        web = f"http://127.0.0.1:{ports[1]}"
        browser = httpx.Client(base_url=web)
        assert browser.get(line.split(" web UI ")[1].split()[0]).status_code == 200  # with mitmweb 12's token: logged in
        deadline = time.monotonic() + 10
        while True:
            flows = [f for f in browser.get("/flows").json() if "web #1" in (f.get("comment") or "")]
            if flows and flows[0].get("response") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        (flow,) = flows
        assert flow["marked"]
        while True:  # the body is kept once the stream has ended, a moment after the headers show
            view = browser.get(f"/flows/{flow['id']}/response/content/auto.json").json()
            text = view["text"] if "text" in view else json.dumps(view["lines"])  # mitmweb 12: text; 11: styled lines
            if "get_weather" in text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "get_weather" in text and view.get("view_name", view["description"]) == "LLM chat"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    assert processes_mentioning(str(tmp_path / "traj")) == []


ANTHROPIC_AGENT = textwrap.dedent(
    """
    from anthropic import Anthropic
    message = Anthropic(max_retries=0).messages.create(
        model="standin-tool_use", max_tokens=256, messages=[{"role": "user", "content": "weather?"}])
    print("agent got:", [block.type for block in message.content])
    """
)


def test_run_records_an_anthropic_sdk_agent_unchanged(upstream, tmp_path):
    """The Anthropic SDK finds the proxy by ANTHROPIC_BASE_URL and, with no key
    of its own, runs on the dummy ANTHROPIC_AUTH_TOKEN (Claude Code's variable)."""
    agent = tmp_path / "claude_agent.py"
    agent.write_text(ANTHROPIC_AGENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    r = llm_traj("run", "--upstream", upstream.url, "--traj", str(tmp_path / "traj"), "--session", "claude", "--",
                 sys.executable, str(agent), env=env)
    assert r.returncode == 0, r.stderr
    assert "agent got: ['text', 'tool_use']" in r.stdout
    [record] = read_records(tmp_path / "traj" / "claude.jsonl")
    assert record.api == "anthropic.messages" and record.response["stop_reason"] == "tool_use"
    assert dict((k.lower(), v) for k, v in record.request_headers)["authorization"] == "[REDACTED]"


TOLERANT_AGENT = textwrap.dedent(
    """
    import os
    from openai import OpenAI, APIStatusError
    client = OpenAI(max_retries=0, api_key="sk-dummy")
    models = [m.id for m in client.models.list().data]
    try:
        reply = client.chat.completions.create(model="standin-text", messages=[{"role": "user", "content": os.environ["ASK"]}])
        print("agent got:", reply.choices[0].message.content, models)
    except APIStatusError as exc:
        print("agent saw", exc.status_code)
    """
)


@pytest.mark.parametrize("via", ["base-url", "https-proxy"])
def test_run_replay_prints_the_report_and_exits_1_on_a_miss(upstream, tmp_path, via):
    """A replay needs no upstream (the model list too); its report is in the
    summary, and a missed call fails the run even when the agent shrugs it off."""
    agent = tmp_path / "agent.py"
    agent.write_text(TOLERANT_AGENT)
    traj = tmp_path / "traj"
    recorded = llm_traj("run", "--upstream", upstream.url, "--traj", str(traj), "--session", "rp", "--",
                        sys.executable, str(agent), env={**os.environ, "ASK": "hello"})  # fmt: skip
    assert recorded.returncode == 0 and "agent got:" in recorded.stdout, recorded.stderr
    if via == "https-proxy":  # the recording's host, as the agent names it through HTTPS_PROXY
        (traj / "rp.jsonl").write_text((traj / "rp.jsonl").read_text().replace(upstream.url, "http://api.example.test"))
    env = {**os.environ, "OPENAI_BASE_URL": "http://api.example.test/v1"} if via == "https-proxy" else dict(os.environ)
    same = llm_traj("run", "--mode", "replay", "--via", via, "--traj", str(traj), "--session", "rp", "--",
                    sys.executable, str(agent), env={**env, "ASK": "hello"})  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert same.stdout == recorded.stdout
    assert "llm-traj: replay report: 1 of 1 recorded calls served, 0 misses, 1 sessions" in same.stderr
    assert "llm-traj:   rp: 1/1 served (exact 1), 0 misses" in same.stderr
    missed = llm_traj("run", "--mode", "replay", "--via", via, "--traj", str(traj), "--session", "rp", "--",
                      sys.executable, str(agent), env={**env, "ASK": "goodbye"})  # fmt: skip
    assert "agent saw 400" in missed.stdout
    assert missed.returncode == 1
    assert ("rp: 0/1 served, 1 misses; first: the request diverges from the recording of session 'rp' at step 1 "
            '(of 1): messages[0].content: recorded "hello", request "goodbye"') in missed.stderr
