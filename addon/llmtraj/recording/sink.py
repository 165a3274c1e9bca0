"""The proxy's end of the writer pipe: starts the writer process and hands it captures
without ever blocking the event loop, and counts the writer's acknowledgements (a byte
per call written, on its stdout) so that a caller can wait until a session's calls are
on disk (`wait_written`)."""

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
        # Frames handed to writers and acknowledged as written, counted over every
        # writer this sink started; a session's calls are written once the count
        # acknowledged reaches that of its last frame.
        self._handed = 0
        self._acked = 0
        self._last_frame: dict[str, int] = {}  # by session
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._reading_acks = False

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmtraj.recording.writer", str(self.path),
             *(["--prompts", str(self.prompts)] if self.prompts else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # its acknowledgements
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))},
        )
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except (AttributeError, OSError):
            pass  # not Linux, or over the limit: the default size works too
        self._acks_fd = self._proc.stdout.fileno()
        os.set_blocking(self._acks_fd, False)
        try:
            asyncio.get_running_loop().add_reader(self._acks_fd, self._read_acks)
            self._reading_acks = True
        except RuntimeError:
            pass  # no loop (started at configure outside it): read from the first send on

    def send(self, capture: CallCapture) -> None:
        if self._proc is None:
            self.start()
        if not self._reading_acks:
            asyncio.get_running_loop().add_reader(self._acks_fd, self._read_acks)
            self._reading_acks = True
        self._pending += capture.frame()
        self._handed += 1
        self._last_frame[capture.session] = self._handed
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
            self._writer_lost(f"{exc}; {len(self._pending)} bytes of calls lost")
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

    def _stop_reading_acks(self) -> None:
        if self._reading_acks:
            asyncio.get_running_loop().remove_reader(self._acks_fd)
            self._reading_acks = False

    def _writer_lost(self, why: str) -> None:
        """The writer died: what it had not acknowledged is lost (never written),
        so nobody waits for it; the next call starts another writer."""
        logger.error(f"llm-traj: the record writer stopped ({why})")
        self._forget_writer()
        self._stop_reading_acks()
        self._pending.clear()
        self._proc.stdout.close()
        self._proc.poll()  # reap it if it is already gone
        self._proc = None
        self._acknowledge(self._handed)

    def _read_acks(self) -> None:
        try:
            data = os.read(self._acks_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of its output: the writer is gone
            if self._proc is not None:
                unwritten = self._handed - self._acked
                self._writer_lost(f"exited with {self._proc.wait()}; {unwritten} call(s) handed to it not written")
            return
        self._acknowledge(self._acked + len(data))

    def _acknowledge(self, acked: int) -> None:
        self._acked = acked
        if self._waiters and self._waiters[0][0] <= acked:
            still = []
            for frame, waiter in self._waiters:
                if frame > acked:
                    still.append((frame, waiter))
                elif not waiter.done():
                    waiter.set_result(None)
            self._waiters = still

    def written(self, session: str) -> bool:
        """Whether every call of `session` handed over so far is written."""
        return self._last_frame.get(session, 0) <= self._acked

    async def wait_written(self, session: str, timeout: float) -> bool:
        """Wait until every call of `session` handed over so far is written;
        False if that took longer than `timeout` seconds."""
        frame = self._last_frame.get(session, 0)
        if frame <= self._acked:
            return True
        waiter = asyncio.get_running_loop().create_future()
        entry = (frame, waiter)
        self._waiters.append(entry)
        self._waiters.sort(key=lambda w: w[0])
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def close(self, timeout: float = 30.0) -> None:
        """Hand over what is pending and wait until it is written."""
        if self._proc is None and not self._pending:
            return
        try:
            self._forget_writer()
            self._stop_reading_acks()
        except RuntimeError:
            pass  # no loop running
        if self._proc is None or self._proc.poll() is not None:
            self.start()  # the writer is gone: a new one writes what is pending
            try:
                self._stop_reading_acks()
            except RuntimeError:
                pass
        proc, self._proc = self._proc, None
        proc.stdout.close()  # nobody reads its acknowledgements any more: it stops sending them
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
        self._acknowledge(self._handed)  # written, or never will be: nobody waits any more


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
