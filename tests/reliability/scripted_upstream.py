"""A raw TCP upstream for fault tests: it reads each request's head (and body,
by its Content-Length) and answers with the given bytes (or pieces, `gap`
seconds apart), then ends the connection as told: `close` (a FIN), `reset`
(an RST), or `hang` (silence until the test ends); `by_path` gives other
requests' paths their own (answer, ending)."""

from __future__ import annotations

import socket
from contextlib import ExitStack, contextmanager
import struct
import threading
import time


class ScriptedUpstream:
    def __init__(self, answer: bytes | list[bytes], then: str = "close", gap: float = 0.0,
                 by_path: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.scripts = {path: ([piece], end) for path, (piece, end) in (by_path or {}).items()}
        self.pieces = [answer] if isinstance(answer, bytes) else answer
        self.then, self.gap = then, gap
        assert {then, *(end for _, end in self.scripts.values())} <= {"close", "reset", "hang"}
        self._server = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._server.close()

    def _serve(self) -> None:
        self._server.settimeout(0.1)
        held = []
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            data = b""
            while b"\r\n\r\n" not in data and (more := conn.recv(65536)):
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            while len(body) < length and (more := conn.recv(65536)):
                body += more
            path = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else ""
            pieces, then = self.scripts.get(path, (self.pieces, self.then))
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(self.gap)
                conn.sendall(piece)
            if then == "hang":
                held.append(conn)
                continue
            if then == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        for conn in held:
            conn.close()


def http_response(body: bytes, headers: dict[str, str], status: str = "200 OK") -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


@contextmanager
def blackholed_url():
    """The URL of a port whose connections are never set up (its listener's
    backlog is full, so the kernel drops new SYNs), or None if this system
    sets them up anyway."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server, ExitStack() as stack:
        address = server.getsockname()
        for _ in range(4):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(address)
        time.sleep(0.1)
        with socket.socket() as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(address)
            except TimeoutError:
                yield f"http://127.0.0.1:{address[1]}"
                return
        yield None


def refused_url() -> str:
    """The URL of a port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
