"""One truthful failure shape for both forwarding paths (issue 15), through a
real mitmdump: each upstream fault is run once with mitmproxy forwarding the
call itself (no config) and once through llm-traj's own client (a route of
`llm_traj_config` with a timeout, behind the loopback server); the agent gets
the same status and error (its API's shape: 502 unreachable or disconnected,
504 timed out) and the record has the same `complete`, `error.kind` and
`status` (null when no response came). Each fault is met by an HTTP/1 agent
and then by an HTTP/2 one (TLS with ALPN h2 to the reverse proxy, as Codex
speaks): the HTTP/2 agent gets the same status, content-type and body, and
its call the same record. The idle limit is the default one,
`llm_traj_upstream_idle_timeout`, cut short by the test."""

from __future__ import annotations

import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
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
    "responses": ("/v1/responses", {"model": "m", "stream": True, "input": "Hi"}),
}


class _H2First(ssl.SSLContext):
    # httpx offers http/1.1 before h2 and mitmproxy takes the agent's first offer; Codex offers h2 first.
    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda protocol: protocol != "h2"))


@contextmanager
def agents(proxy: ProxyProcess, ca):
    """{"http1": (client, base URL), "http2": (client, base URL)} for `proxy`:
    plain HTTP/1.1, and HTTP/2 over TLS with mitmproxy's CA `ca`."""
    tls = _H2First(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_verify_locations(ca)
    https = proxy.url.replace("http://127.0.0.1", "https://localhost")  # mitmproxy's certificate names the host
    with httpx.Client(timeout=30) as http1, httpx.Client(http2=True, verify=tls, timeout=30) as http2:
        yield {"http1": (http1, proxy.url), "http2": (http2, https)}


def agent_call(client: httpx.Client, base: str, call: str) -> dict:
    """What the agent saw of one call: status (None: cut off mid-stream), content-type, error body, seconds."""
    endpoint, body = CALLS[call]
    started = time.monotonic()
    got: dict = {}
    try:
        with client.stream("POST", f"{base}{endpoint}", json=body) as r:
            got["status"], got["type"] = r.status_code, r.headers.get("content-type")
            got["version"] = r.http_version
            got["connection"] = r.extensions["network_stream"].get_extra_info("client_addr")
            data = r.read()
            if r.status_code >= 400:
                got["error"] = json.loads(data) if got["type"] == "application/json" else data
    except httpx.RemoteProtocolError:  # cut off mid-stream, as the upstream cut it
        got["status"] = None
    got["seconds"] = time.monotonic() - started
    return got


def told(record) -> dict:
    return {"record": (record.complete, record.error.kind if record.error else None, record.status),
            "message": record.error.message if record.error else None}  # fmt: skip


@contextmanager
def proxy_for(path: str, upstream: str, tmp_path, extra_args=()):
    """A recording mitmdump whose calls to `upstream` are forwarded by mitmproxy
    (`mitmproxy`) or by llm-traj's client (`client`)."""
    options = {"llm_traj_path": tmp_path / "traj", "llm_traj_upstream_idle_timeout": IDLE,
               "connection_strategy": "lazy", "confdir": tmp_path / "mitm"}  # fmt: skip
    if path == "client":
        tmp_path.mkdir(parents=True, exist_ok=True)
        config = tmp_path / "upstreams.toml"
        config.write_text(f'default_route = "up"\n[providers.up]\nbase_url = "{upstream}/v1"\ntimeouts = {{connect = 30}}\n')
        options["llm_traj_config"] = config
    with ProxyProcess(upstream=upstream, options=options, extra_args=extra_args) as proxy:
        yield proxy


def outcome(fault: str, path: str, call: str, tmp_path) -> dict[str, dict]:
    """What an HTTP/1 agent and then an HTTP/2 one saw and what was recorded,
    for one fault on one path, by HTTP version."""
    with ExitStack() as stack:
        scripted = FAULTS[fault]
        if scripted == "blackholed":
            url = stack.enter_context(blackholed_url())
            if url is None:
                pytest.skip("this system sets up connections to a listener whose backlog is full")
        else:
            url = refused_url() if scripted is None else stack.enter_context(ScriptedUpstream(*scripted)).url
        proxy = stack.enter_context(proxy_for(path, url, tmp_path))
        clients = stack.enter_context(agents(proxy, tmp_path / "mitm" / "mitmproxy-ca-cert.pem"))
        seen = {version: agent_call(client, base, call) for version, (client, base) in clients.items()}
        records = wait_records(tmp_path / "traj" / "default.jsonl", 2)
    for got, record in zip(seen.values(), records):
        got.update(told(record))
    return seen


def assert_told_alike(seen: dict[str, dict], context) -> None:
    """The HTTP/2 agent was told what the HTTP/1 one was, over HTTP/2, and its call recorded alike."""
    http1, http2 = seen["http1"], seen["http2"]
    assert http2.get("version", "HTTP/2") == "HTTP/2", (context, http2)
    same = ("status", "type", "error", "record", "message")
    assert {k: http2.get(k) for k in same} == {k: http1.get(k) for k in same}, (context, seen)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_is_told_the_same_on_both_paths(fault, tmp_path):
    status, kind, record_status = EXPECTED[fault]
    seen = {path: outcome(fault, path, "chat", tmp_path / path) for path in ("mitmproxy", "client")}
    for path, by_version in seen.items():
        assert_told_alike(by_version, path)
        for got in by_version.values():
            assert got["record"] == (False, kind, record_status), (path, got)
            assert got["status"] == status, (path, got)
            if status is not None:  # the agent's error names the failure, in its API's shape
                error = got["error"]["error"]
                assert error["code"] == kind and error["type"] == "proxy_error", (path, got)
            if kind == "upstream_timeout":
                assert IDLE <= got["seconds"] < IDLE + 5, (path, got)
                assert f"{IDLE:g} s" in got["message"] and "timeout)" in got["message"], (path, got)


@pytest.mark.parametrize("fault", ["refused", "silent_before_answering"])
def test_an_anthropic_agent_gets_the_error_in_its_shape_on_both_paths(fault, tmp_path):
    status, kind, _ = EXPECTED[fault]
    for path in ("mitmproxy", "client"):
        seen = outcome(fault, path, "anthropic", tmp_path / path)
        assert_told_alike(seen, path)
        got = seen["http1"]
        assert got["status"] == status, (path, got)
        assert got["error"]["type"] == "error" and got["error"]["error"]["code"] == kind, (path, got)


CONCURRENT = {  # call: (the upstream's answer to it and its ending, the agent's status, the record's error kind)
    "chat": ((b"", "hang"), 504, "upstream_timeout"),
    "anthropic": ((b"", "close"), 502, "upstream_disconnected"),
    "responses": ((b"", "hang"), 504, "upstream_timeout"),
}


@pytest.mark.parametrize("path", ["mitmproxy", "client"])
def test_concurrent_http2_streams_each_get_their_own_error(path, tmp_path):
    """Three calls open at once on one HTTP/2 connection, failing differently
    (one hung up on while the others wait, those two timing out): each stream
    gets its own call's error, what an HTTP/1 agent gets for it, also when the
    error hooks of the streams run interleaved (a hook pauses its stream only)."""
    by_path = {CALLS[call][0]: script for call, (script, _, _) in CONCURRENT.items()}
    # Another addon's error hook that awaits, longer for the chat call: the responses call, timed out
    # after the chat call, is answered before it.
    slow = tmp_path / "slow_error_hooks.py"
    slow.write_text("import asyncio\n\n\nclass SlowErrorHooks:\n    async def error(self, flow):\n"
                    "        await asyncio.sleep(0.3 if 'chat' in flow.request.path else 0.05)\n\n\n"
                    "addons = [SlowErrorHooks()]\n")  # fmt: skip
    with ScriptedUpstream(b"", by_path=by_path) as up, proxy_for(path, up.url, tmp_path, ["-s", str(slow)]) as proxy:
        with agents(proxy, tmp_path / "mitm" / "mitmproxy-ca-cert.pem") as clients:
            alone = {call: agent_call(*clients["http1"], call) for call in CONCURRENT}
            first = agent_call(*clients["http2"], "anthropic")  # sets up the connection the others share
            with ThreadPoolExecutor(2) as pool:
                chat = pool.submit(agent_call, *clients["http2"], "chat")
                time.sleep(0.1)
                responses = pool.submit(agent_call, *clients["http2"], "responses")
                time.sleep(IDLE / 3)  # both wait for their upstream
                together = {"anthropic": agent_call(*clients["http2"], "anthropic"),
                            "chat": chat.result(), "responses": responses.result()}  # fmt: skip
        records = wait_records(tmp_path / "traj" / "default.jsonl", 2 * len(CONCURRENT) + 1)
    assert len({got["connection"] for got in (first, *together.values())}) == 1, together
    recorded = {}  # call: how each of its records was told, by its API
    for record in records:
        recorded.setdefault(record.api, []).append(told(record))
    for call, (_, status, kind) in CONCURRENT.items():
        api = {"chat": "chat.completions", "anthropic": "anthropic.messages", "responses": "responses"}[call]
        assert_told_alike({"http1": alone[call] | recorded[api][0], "http2": together[call] | recorded[api][-1]}, call)
        assert alone[call]["status"] == status and recorded[api][0]["record"] == (False, kind, None), (call, alone)
        assert kind in json.dumps(alone[call]["error"]), (call, alone)


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
