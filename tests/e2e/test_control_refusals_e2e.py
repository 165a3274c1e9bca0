"""The anti-call control API refusing requests, end to end: a real mitmdump in
anti-call mode, its control API spoken to over real TCP (raw sockets, curl).
Each refusal is decided from the request's head, before its body is read: a
truthful status, the control API's JSON error body, and the connection closed."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest
from llmtraj.anticall.control import MAX_BODY, MAX_CONNECTIONS, MAX_HEAD
from llmtraj.cli.proxy_process import ProxyProcess

NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def traj(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refusals")


@pytest.fixture(scope="module")
def control(traj):
    """(port, token) of a real mitmdump's control API; the proxy may hold
    MAX_CONNECTIONS and more sockets (it inherits this process's limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * MAX_CONNECTIONS + 256
    if soft < wanted <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    proxy = ProxyProcess(upstream=NOWHERE, options={"llm_traj_mode": "anticall", "llm_traj_path": traj}).start()
    try:
        info = json.loads((traj / "control.json").read_text())
        yield int(info["url"].rsplit(":", 1)[1]), info["token"]
    finally:
        proxy.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends `data` and reads until the server closes the connection (a refusal
    must close it): (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        response = b""
        while chunk := sock.recv(1 << 16):
            response += chunk
    return parse(response)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert len(body) == int(headers["content-length"]), response[:300]
    return int(lines[0].split(" ")[1]), headers, body


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "control_error" and set(error) == {"message", "type", "code"}
    return {"status": status, "code": error["code"], "message": error["message"]}


def request(token: str | None, method: str = "GET", path: str = "/v1/sessions", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_head_over_the_limit_is_431(control):
    port, token = control
    big = request(token, headers=(f"X-Padding: {'a' * (MAX_HEAD + 10)}",))
    error = error_of(*exchange(port, big))
    assert error["status"] == 431 and error["code"] == "head_too_large" and "64 KiB" in error["message"]


def test_a_body_over_the_limit_is_413_before_it_is_sent(control):
    port, token = control
    head = request(token, "POST", "/v1/calls/s:1/response", (f"Content-Length: {MAX_BODY + 1}", "Content-Type: application/json"))
    started = time.monotonic()
    error = error_of(*exchange(port, head))  # no byte of the body is ever sent
    assert error["status"] == 413 and error["code"] == "body_too_large" and time.monotonic() - started < 5
    # a client that sends its body anyway still reads the refusal
    error = error_of(*exchange(port, head + b"x" * (4 << 20)))
    assert error["status"] == 413


@pytest.mark.parametrize("data, why", [
    (b"GARBAGE\r\n\r\n", "Malformed HTTP request line"),
    (b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "no colon in header line"),
    (b"GET /v1/sessions HTTP/9.9\r\nHost: x\r\n\r\n", "HTTP version"),  # tornado 6.4: "Malformed ...", 6.5: "Unexpected ..."
])  # fmt: skip
def test_a_malformed_head_is_400_in_our_shape(control, data, why):
    error = error_of(*exchange(control[0], data))
    assert error["status"] == 400 and error["code"] == "bad_request" and why in error["message"]


def test_a_bad_content_length_is_400(control):
    port, token = control
    error = error_of(*exchange(port, request(token, "POST", "/v1/sessions/s/end", ("Content-Length: 12abc",))))
    assert error["status"] == 400 and error["code"] == "bad_request" and "Content-Length" in error["message"]


def test_a_body_without_content_length_is_411(control):
    port, token = control
    data = request(token, "POST", "/v1/sessions/s/end", ("Transfer-Encoding: chunked",)) + b"2\r\n{}\r\n0\r\n\r\n"
    error = error_of(*exchange(port, data))
    assert error["status"] == 411 and error["code"] == "length_required"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_no_or_a_wrong_token_is_401_before_the_body(control, token):
    port, _ = control
    # the body is announced and never sent: the refusal cannot wait for it
    status, headers, body = exchange(port, request(token, "POST", "/v1/sessions/s/end", ("Content-Length: 1000",)))
    assert headers["www-authenticate"] == "Bearer"
    error = error_of(status, headers, body)
    assert error["status"] == 401 and error["code"] == "unauthorized"


def test_curl_sees_the_refusals(control):
    port, token = control
    url = f"http://127.0.0.1:{port}/v1/sessions"

    def curl(*args: str) -> tuple[int, dict]:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args, url], capture_output=True, text=True, timeout=30)
        body, _, code = out.stdout.rpartition("\n")
        return int(code), json.loads(body)

    assert curl()[0] == 401
    code, body = curl("-H", f"Authorization: Bearer {token}", "-H", f"X-Big: {'b' * (MAX_HEAD + 1)}")
    assert code == 431 and body["error"]["code"] == "head_too_large"
    code, body = curl("-H", f"Authorization: Bearer {token}")
    assert code == 200 and body == []


def test_connections_over_the_cap_get_503_and_the_api_recovers(control):
    port, token = control
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # one more is refused from its head (the others stay open and idle)
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = exchange(port, request(token))
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the server may not have counted every connection yet
        assert headers["retry-after"] == "1"
        error = error_of(status, headers, body)
        assert error["status"] == 503 and error["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while (status := exchange(port, request(token, headers=("Connection: close",)))[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200


def test_a_keep_alive_connection_still_serves_after_a_404(control):
    """Errors decided after the body was read (404, 405, a bad push) keep the connection."""
    port, token = control
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request(token, path="/nope") + request(token))
        response = b""
        while response.count(b"HTTP/1.1 ") < 2 or not response.endswith(b"[]"):
            response += sock.recv(1 << 16)
    assert response.startswith(b"HTTP/1.1 404 ") and b"HTTP/1.1 200 " in response
