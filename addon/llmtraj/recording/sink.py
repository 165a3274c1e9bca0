"""The proxy's end of the writer pipe: starts the writer process and hands it captures
without ever blocking the event loop."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys

from .capture import CallCapture

_PIPE_SIZE = 1 << 20  # room for bursts before our own buffer is used
logger = logging.getLogger("llm_traj")


class RecordSink:
    """The proxy's end: starts the child and sends it captures without ever
    blocking the event loop (what the pipe cannot take at once is buffered and
    written when it can)."""

    def __init__(self, path: os.PathLike | str, prompts: os.PathLike | str | None = None) -> None:
        self.path = path
        self.prompts = prompts  # the prompt registry the writer tags calls from
        self._proc: subprocess.Popen | None = None
        self._pending = bytearray()
        self._fd = -1
        self._flush_scheduled = False
        self._waiting_writable = False

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmtraj.recording.writer", str(self.path),
             *(["--prompts", str(self.prompts)] if self.prompts else [])],
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


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
