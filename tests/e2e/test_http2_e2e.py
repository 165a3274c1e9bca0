"""An agent speaking HTTP/2 (curl --http2, inside the CONNECT tunnel of regular
proxy mode, TLS to a named host) is recorded and replayed like an HTTP/1 one, on
mitmproxy 11 and 12 alike: streamed and not, the record complete, the replay
the recorded bytes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.testing.standin import StandinUpstream, make_self_signed_cert

from ..conftest import wait_records

MESSAGES = [{"role": "user", "content": "weather?"}]


def curl_h2(proxy: ProxyProcess, ca: Path, url: str, stream: bool) -> tuple[str, bytes]:
    """(HTTP version and status, body) of one chat call made over HTTP/2."""
    body = json.dumps({"model": "standin-tools", "stream": stream, "messages": MESSAGES})
    out = subprocess.run(
        ["curl", "-sS", "--http2", "-x", proxy.url, "--cacert", str(ca), "-H", "content-type: application/json",
         "--data-binary", body, "-w", "\n%{http_version} %{http_code}", url],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    content, _, status = out.stdout.rpartition(b"\n")
    return status.decode(), content


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_http2_agent_is_recorded_and_replayed(tmp_path, stream):
    cert, key = make_self_signed_cert(tmp_path)
    confdir, traj = tmp_path / "mitm", tmp_path / "traj"
    # lazy: mitmproxy talks HTTP/2 with the agent before it knows the upstream (eager would pass on the
    # stand-in's HTTP/1.1); replay is lazy anyway. The named host's certificate is self-signed.
    options = {"llm_traj_path": traj, "confdir": confdir, "ssl_insecure": "true", "connection_strategy": "lazy"}
    ca = confdir / "mitmproxy-ca-cert.pem"
    with StandinUpstream(tls=(cert, key)) as named, ProxyProcess(options=options) as proxy:
        url = named.url.replace("127.0.0.1", "localhost") + "/v1/chat/completions"
        status, recorded = curl_h2(proxy, ca, url, stream)
    assert status == "2 200" and b"get_weather" in recorded
    [record] = wait_records(traj / "default.jsonl", 1)
    assert record.status == 200 and record.complete and record.stream == stream
    assert record.response["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"

    with ProxyProcess(options={**options, "llm_traj_mode": "replay"}) as proxy:
        status, replayed = curl_h2(proxy, ca, url, stream)  # the named host is gone: replay answers
    assert status == "2 200" and replayed == recorded


def test_http2_agent_through_the_bridge(tmp_path):
    """An HTTP/2 agent (as Codex through HTTPS_PROXY) calling the Responses API of a named host whose
    route speaks chat completions: its events stream back over HTTP/2, the record is bridged."""
    confdir, traj = tmp_path / "mitm", tmp_path / "traj"
    with StandinUpstream() as engine:
        config = tmp_path / "upstreams.toml"
        config.write_text(f'default_route = "engine"\n[providers.engine]\nbase_url = "{engine.url}/v1"\n'
                          'upstream_api = "chat.completions"\n')  # fmt: skip
        options = {"llm_traj_path": traj, "confdir": confdir, "connection_strategy": "lazy", "llm_traj_config": config}
        with ProxyProcess(options=options) as proxy:
            body = json.dumps({"model": "standin-tools", "stream": True, "input": "weather?"})
            out = subprocess.run(
                ["curl", "-sS", "-N", "--http2", "-x", proxy.url, "--cacert", str(confdir / "mitmproxy-ca-cert.pem"),
                 "-H", "content-type: application/json", "--data-binary", body, "-w", "\n%{http_version} %{http_code}",
                 "https://api.openai.com/v1/responses"],
                capture_output=True, timeout=30,
            )  # fmt: skip
    assert out.returncode == 0, out.stderr
    content, _, status = out.stdout.rpartition(b"\n")
    assert status == b"2 200" and b"event: response.function_call_arguments.delta" in content
    assert content.rstrip().splitlines()[-2] == b"event: response.completed"
    [record] = wait_records(traj / "default.jsonl", 1)
    assert record.api == "responses" and record.complete and record.bridge.url == f"{engine.url}/v1/chat/completions"
    assert [item["name"] for item in record.response["output"]] == ["get_weather", "get_time"]
