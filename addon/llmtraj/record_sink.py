"""Turns captured calls into trajectory lines in a child process.

The proxy's event loop is the hot path of every agent step, and on it only the
capture happens (`CallCapture`: references to the bytes as they pass, and
when). Parsing, decoding, SSE aggregation, redaction, serialising and writing
run here, in `python -m llmtraj.record_sink PATH`, on the machine's other core.
Captures arrive on stdin as length-prefixed marshal data (both ends are this
package, on the same Python). The child runs in its own session, so a Ctrl-C
meant for the proxy does not reach it, and ends at end of input, once whatever
arrived is written: a proxy killed with `kill -9` loses no call it had finished.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import marshal
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from .apis import API_BY_NAME
from .recorder import CallTee
from .store import TrajectoryWriter

_LENGTH = struct.Struct("!I")
_PIPE_SIZE = 1 << 20  # room for bursts before our own buffer is used
logger = logging.getLogger("llm_traj")

RawHeaders = list[tuple[bytes, bytes]]


def text_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    """Raw header pairs as text (as mitmproxy's `items(multi=True)` gives them, several times faster)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


@dataclass(slots=True)
class CallCapture:
    """What the proxy keeps of one call while it runs: no parsing, no copies."""

    api: str
    session: str
    index: int
    mode: str
    method: str
    url: str
    request_headers: RawHeaders
    request_body: bytes
    started_at: float
    status: int | None = None
    response_headers: RawHeaders = field(default_factory=list)
    response_headers_at: float | None = None
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    error: tuple[str, str] | None = None  # (kind, message) when the call did not finish
    extra: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, Any] | None = None  # route, url, attempts: see `record.Upstream`

    def frame(self) -> bytes:
        # marshal: the fastest stdlib serialiser for plain values, and both
        # ends run the same Python (the child is started with sys.executable)
        data = marshal.dumps([getattr(self, name) for name in _CAPTURE_FIELDS])
        return _LENGTH.pack(len(data)) + data

    @classmethod
    def unframe(cls, data: bytes) -> CallCapture:
        return cls(*marshal.loads(data))


_CAPTURE_FIELDS = [f.name for f in fields(CallCapture)]


def record_of(capture: CallCapture) -> tuple[dict[str, Any], set[str], bytes | None]:
    """(the record's fields, secrets to scrub, request body to write as is)."""
    tee = CallTee(
        api=API_BY_NAME[capture.api],
        session=capture.session,
        index=capture.index,
        mode=capture.mode,
        method=capture.method,
        url=capture.url,
        request_headers=text_headers(capture.request_headers),
        request_body=capture.request_body,
        started_at=capture.started_at,
    )
    if capture.status is not None:
        tee.response_started(capture.status, text_headers(capture.response_headers), now=capture.response_headers_at)
        for data, at in zip(capture.chunks, capture.chunk_times):
            tee.chunk(data, now=at)
    if capture.error is None:
        fields = tee.finish(now=capture.ended_at)
    else:
        fields = tee.fail(*capture.error, now=capture.ended_at)
    fields["extra"].update(capture.extra)
    fields["upstream"] = capture.upstream
    return fields, tee.secrets, tee.request_json


class RecordSink:
    """The proxy's end: starts the child and sends it captures without ever
    blocking the event loop (what the pipe cannot take at once is buffered and
    written when it can)."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = path
        self._proc: subprocess.Popen | None = None
        self._pending = bytearray()
        self._fd = -1
        self._flush_scheduled = False
        self._waiting_writable = False

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmtraj.record_sink", str(self.path)],
            stdin=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))},
        )
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except (AttributeError, OSError):
            pass  # not Linux, or over the limit: the default size works too

    def send(self, capture: CallCapture) -> None:
        if self._proc is None:
            self.start()
        self._pending += capture.frame()
        if not (self._flush_scheduled or self._waiting_writable):
            # Written once per loop iteration: under load many calls end in one,
            # and one write (one wake-up of the child) carries them all.
            asyncio.get_running_loop().call_soon(self._flush)
            self._flush_scheduled = True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._proc is None:  # closed meanwhile: close() wrote what was pending
            return
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # the child is gone: say so, start another
            logger.error(f"llm-traj: the record writer stopped ({exc}); {len(self._pending)} bytes of calls lost")
            self._forget_writer()
            self._pending.clear()
            self._proc.poll()  # reap it if it is already gone
            self._proc = None
            return
        del self._pending[:written]
        if self._pending and not self._waiting_writable:
            asyncio.get_running_loop().add_writer(self._fd, self._flush)
            self._waiting_writable = True
        elif not self._pending:
            self._forget_writer()

    def _forget_writer(self) -> None:
        if self._waiting_writable:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._waiting_writable = False

    def close(self, timeout: float = 30.0) -> None:
        """Hand over what is pending and wait until it is written."""
        if self._proc is None and not self._pending:
            return
        try:
            self._forget_writer()
        except RuntimeError:
            pass  # no loop running
        if self._proc is None or self._proc.poll() is not None:
            self.start()  # the writer is gone: a new one writes what is pending
        proc, self._proc = self._proc, None
        os.set_blocking(self._fd, True)
        try:
            proc.stdin.write(bytes(self._pending))
            proc.stdin.close()
        except OSError as exc:
            logger.error(f"llm-traj: could not hand the last calls to the record writer: {exc}")
        self._pending.clear()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("llm-traj: the record writer did not finish in time; stopping it")
            proc.kill()
            proc.wait()


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(path: str, source=None) -> None:
    """Write every capture read from `source` (stdin) to the trajectory at `path`."""
    source = source or sys.stdin.buffer
    writer = TrajectoryWriter(path)
    try:
        while header := source.read(_LENGTH.size):
            if len(header) < _LENGTH.size:
                break  # the proxy died mid-frame: that call was not finished
            length = _LENGTH.unpack(header)[0]
            data = source.read(length)
            if len(data) < length:
                break  # likewise
            try:
                capture = CallCapture.unframe(data)
                writer.append(*record_of(capture))
            except Exception as exc:  # one bad call must not cost the others
                print(f"llm-traj: could not record a call: {exc!r}", file=sys.stderr, flush=True)
    finally:
        writer.close()


if __name__ == "__main__":
    serve(sys.argv[1])
