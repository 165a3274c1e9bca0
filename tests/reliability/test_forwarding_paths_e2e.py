"""One truthful failure shape for both forwarding paths (issue 15), through a
real mitmdump: each upstream fault is run once with mitmproxy forwarding the
call itself (no config) and once through llm-traj's own client (a route of
`llm_traj_config` with a timeout, behind the loopback server); the agent gets
the same status and error (its API's shape: 502 unreachable or disconnected,
504 timed out) and the record has the same `complete`, `error.kind` and
`status` (null when no response came). The idle limit is the default one,
`llm_traj_upstream_idle_timeout`, cut short by the test."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from llmtraj.cli.proxy_process import ProxyProcess

from ..conftest import wait_records
from .scripted_upstream import ScriptedUpstream, blackholed_url, http_response, refused_url

IDLE = 0.6  # seconds: llm_traj_upstream_idle_timeout in these tests
EVENT = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
SSE_HEAD = http_response(b"", {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
TWO_EVENTS = SSE_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(EVENT), EVENT) for _ in range(2))

FAULTS = {  # name: (the upstream's answer, what it does then; None: nothing listens; "blackholed": no connection is made)
    "refused": None,
    "silent_while_connecting": "blackholed",
    "hangs_up_before_answering": (b"", "close"),
    "reset_mid_stream": (TWO_EVENTS, "reset"),
    "silent_before_answering": (b"", "hang"),
    "silent_mid_stream": (TWO_EVENTS, "hang"),
}
EXPECTED = {  # name: (agent's status (None: its connection was cut mid-stream), record's error kind, record's status)
    "refused": (502, "upstream_unreachable", None),
    "silent_while_connecting": (504, "upstream_timeout", None),
    "hangs_up_before_answering": (502, "upstream_disconnected", None),
    "reset_mid_stream": (None, "upstream_disconnected", 200),
    "silent_before_answering": (504, "upstream_timeout", None),
    "silent_mid_stream": (None, "upstream_timeout", 200),
}
CALLS = {
    "chat": ("/v1/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}),
    "anthropic": ("/v1/messages", {"model": "m", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}),
}


@contextmanager
def proxy_for(path: str, upstream: str, tmp_path):
    """A recording mitmdump whose calls to `upstream` are forwarded by mitmproxy
    (`mitmproxy`) or by llm-traj's client (`client`)."""
    options = {"llm_traj_path": tmp_path / "traj", "llm_traj_upstream_idle_timeout": IDLE, "connection_strategy": "lazy"}
    if path == "client":
        tmp_path.mkdir(parents=True, exist_ok=True)
        config = tmp_path / "upstreams.toml"
        config.write_text(f'default_route = "up"\n[providers.up]\nbase_url = "{upstream}/v1"\ntimeouts = {{connect = 30}}\n')
        options["llm_traj_config"] = config
    with ProxyProcess(upstream=upstream, options=options) as proxy:
        yield proxy


def outcome(fault: str, path: str, call: str, tmp_path) -> dict:
    """What the agent saw and what was recorded, for one fault on one path."""
    with ExitStack() as stack:
        scripted = FAULTS[fault]
        if scripted == "blackholed":
            url = stack.enter_context(blackholed_url())
            if url is None:
                pytest.skip("this system sets up connections to a listener whose backlog is full")
        else:
            url = refused_url() if scripted is None else stack.enter_context(ScriptedUpstream(*scripted)).url
        proxy = stack.enter_context(proxy_for(path, url, tmp_path))
        endpoint, body = CALLS[call]
        started = time.monotonic()
        got: dict = {}
        with httpx.Client(timeout=30) as client:
            try:
                with client.stream("POST", f"{proxy.url}{endpoint}", json=body) as r:
                    got["status"] = r.status_code
                    data = r.read()
                    got["error"] = json.loads(data) if r.status_code >= 400 else None
            except httpx.RemoteProtocolError:  # cut off mid-stream, as the upstream cut it
                got["status"] = None
        got["seconds"] = time.monotonic() - started
        (record,) = wait_records(tmp_path / "traj" / "default.jsonl", 1)
    got["record"] = (record.complete, record.error.kind if record.error else None, record.status)
    got["message"] = record.error.message if record.error else None
    return got


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_is_told_the_same_on_both_paths(fault, tmp_path):
    status, kind, record_status = EXPECTED[fault]
    seen = {path: outcome(fault, path, "chat", tmp_path / path) for path in ("mitmproxy", "client")}
    for path, got in seen.items():
        assert got["record"] == (False, kind, record_status), (path, got)
        assert got["status"] == status, (path, got)
        if status is not None:  # the agent's error names the failure, in its API's shape
            assert got["error"]["error"]["code"] == kind and got["error"]["error"]["type"] == "proxy_error", (path, got)
        if kind == "upstream_timeout":
            assert IDLE <= got["seconds"] < IDLE + 5, (path, got)
            assert f"{IDLE:g} s" in got["message"] and "timeout)" in got["message"], (path, got)


@pytest.mark.parametrize("fault", ["refused", "silent_before_answering"])
def test_an_anthropic_agent_gets_the_error_in_its_shape_on_both_paths(fault, tmp_path):
    status, kind, _ = EXPECTED[fault]
    for path in ("mitmproxy", "client"):
        got = outcome(fault, path, "anthropic", tmp_path / path)
        assert got["status"] == status, (path, got)
        assert got["error"]["type"] == "error" and got["error"]["error"]["code"] == kind, (path, got)


def test_the_idle_limit_replaces_mitmproxys_own_while_a_call_waits(tmp_path):
    """An upstream silent for 1.5 s between events, under mitmproxy's connection
    idle limit cut to 1 s and llm-traj's at 3 s: the call completes on both paths
    (mitmproxy's limit would have closed the agent's connection without an answer)."""
    from ..e2e.test_anticall_e2e import idle_limit_of_1s

    done = b"data: [DONE]\n\n"
    pieces = [SSE_HEAD, *(b"%x\r\n%s\r\n" % (len(e), e) for e in (EVENT, EVENT, done)), b"0\r\n\r\n"]
    for path in ("mitmproxy", "client"):
        with ScriptedUpstream([pieces[0] + pieces[1], pieces[2], pieces[3] + pieces[4]], gap=1.5) as up:
            options = {"llm_traj_path": tmp_path / path, "llm_traj_upstream_idle_timeout": 3}
            if path == "client":
                config = tmp_path / "upstreams.toml"
                config.write_text(f'default_route = "up"\n[providers.up]\nbase_url = "{up.url}/v1"\ntimeouts = {{connect = 5}}\n')
                options["llm_traj_config"] = config
            with ProxyProcess(upstream=up.url, options=options, extra_args=idle_limit_of_1s()) as proxy:
                endpoint, body = CALLS["chat"]
                r = httpx.post(f"{proxy.url}{endpoint}", json=body, timeout=30)
                assert r.status_code == 200 and r.content.endswith(done), path
                (record,) = wait_records(tmp_path / path / "default.jsonl", 1)
        assert record.complete and record.error is None and len(record.events) == 3, path
