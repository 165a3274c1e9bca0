"""The proxy's end of the writer pipe: starts the writer process, hands it
captures without ever blocking the event loop, and keeps each one until the
writer confirms it is on disk.

Every frame carries a sequence number; the writer acknowledges each one once
its line is written (on its stdout, those written together in one write, so
that the loop wakes once for a burst of calls). A frame not yet acknowledged when the
writer dies is sent again, marked, to the writer started in its place, which
skips a call already on disk. A capture is written into the pipe at once, in
the hook that ends the call, which mitmproxy runs before the client gets the
end of the response: once an agent has its answer the call is in the pipe, and
the writer (in its own session) writes it even if the proxy is killed.
`wait_written` waits until every call of a session handed over so far is
confirmed (the proxy's written barrier).

A request body goes as a delta against the session's previous body when it
begins with a good part of it (`capture.DELTA`): the writer then reads only
what is new. The previous body is the one of the session's last frame sent to
the running writer, in pipe order (`LastBodies`, kept alike at both ends); a
writer started anew has none, so frames sent again go whole, and so does the
first of every session after them."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import select
import subprocess
import sys
import time
from collections import deque

from .capture import ACK, DELTA, CallCapture, LastBodies, resent, shared_length

_PIPE_SIZE = 1 << 20  # room for bursts before our own buffer is used
_MAX_TRIES = 8  # writers that may die with a call pending before it is given up (a writer killed while starting counts too)
_PIECES_PER_WRITE = 64  # (within any system's IOV_MAX)
_MIN_DELTA = 1 << 10  # a body sharing less with the session's previous one goes whole
# glibc's malloc gives a large block back to the system when it is freed and
# faults fresh pages in for the next one: in the writer, which takes a body of
# megabytes per call, that was near half its CPU per call. Blocks up to 32 MB
# come from the heap instead, and up to 64 MB of it stay free for the next
# (unless the environment says otherwise; elsewhere these names mean nothing).
_WRITER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
logger = logging.getLogger("llm_traj")


class RecordSink:
    """The proxy's end: starts the child and sends it captures without ever
    blocking the event loop (a frame goes into the pipe straight from its
    pieces; what the pipe cannot take at once is kept as they are, not copied,
    and written when it can). `sent` counts the calls handed over, `acked`
    those the writer confirmed written, `restarts` the writers started in
    place of one that died."""

    def __init__(self, path: os.PathLike | str, prompts: os.PathLike | str | None = None) -> None:
        self.path = path
        self.prompts = prompts  # the prompt registry the writer tags calls from
        self.sent = self.acked = self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._fd = self._ack_fd = -1
        self._next_seq = 1
        # frames not yet confirmed, by sequence number in order sent: (frame's pieces, writers it was sent to, the body's pieces)
        self._unacked: dict[int, tuple[list[bytes | memoryview], int, list[bytes]]] = {}
        self._last_bodies = LastBodies()  # what the running writer has of each session (see `_frame`)
        self._pending: deque[bytes | memoryview] = deque()  # pieces of frames not yet in the pipe (the first maybe in part)
        self._acks = bytearray()  # a partial acknowledgement read so far
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop watching the pipes
        self._waiting_writable = False
        self._started_at = 0.0
        self._restart_delay = 0.0
        self._restart_scheduled: asyncio.TimerHandle | None = None
        # The frames of each session not yet confirmed (or given up), for `wait_written`.
        self._unwritten: dict[str, set[int]] = {}
        self._session_of: dict[int, str] = {}
        self._written_waiters: dict[str, list[tuple[set[int], asyncio.Future]]] = {}

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmtraj.recording.writer", str(self.path),
             *(["--prompts", str(self.prompts)] if self.prompts else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the acknowledgements
            start_new_session=True,
            env={**_WRITER_MALLOC, **os.environ,
                 "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))},
        )
        self._started_at = time.monotonic()
        self._fd, self._ack_fd = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        os.set_blocking(self._ack_fd, False)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except (AttributeError, OSError):
            pass  # not Linux, or over the limit: the default size works too
        self._watch()

    def _watch(self) -> None:
        """Read acknowledgements on the running loop, if there is one (a sink
        started from a hook outside it is watched from its first `send`)."""
        if self._loop is not None or self._proc is None:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loop.add_reader(self._ack_fd, self._read_acks)

    def _unwatch(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._ack_fd)
                if self._waiting_writable:
                    self._loop.remove_writer(self._fd)
            except RuntimeError:
                pass  # the loop is closed already
        self._loop, self._waiting_writable = None, False

    def send(self, capture: CallCapture) -> None:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        if self._proc is None and self._restart_scheduled is None:
            self.start()
        body = capture.body_pieces()
        frame = self._frame(capture, seq, body)
        self._unacked[seq] = (frame, 1, body)
        self._unwritten.setdefault(capture.session, set()).add(seq)
        self._session_of[seq] = capture.session
        self.sent += 1
        self._pending.extend(frame)
        if self._restart_scheduled is not None:
            return  # the restart to come sends it with the others
        self._watch()
        self._write()

    def _frame(self, capture: CallCapture, seq: int, body: list[bytes]) -> list[bytes | memoryview]:
        """The capture's frame, its body as a delta against the session's
        previous one where it can be. Every frame's body is kept as its
        session's last, in the order the frames go into the pipe: the writer
        keeps the same ones (a frame the pipe does not take yet goes before
        any later one)."""
        length = sum(map(len, body))
        previous = self._last_bodies.swap(capture.session, body, length)
        if previous is not None and length >= _MIN_DELTA and (shared := shared_length(previous[0], body)) >= _MIN_DELTA:
            return capture.frame(seq, DELTA, shared, previous[1])
        return capture.frame(seq)

    def _write(self) -> None:
        if self._proc is None or not self._pending:
            return
        try:
            self._put()
        except OSError:  # the writer is gone
            self._writer_died()
            return
        if self._pending and not self._waiting_writable and self._loop is not None:
            self._loop.add_writer(self._fd, self._write)
            self._waiting_writable = True
        elif not self._pending and self._waiting_writable:
            self._loop.remove_writer(self._fd)
            self._waiting_writable = False

    def _put(self) -> None:
        """Write into the pipe what it takes of the pending pieces, straight
        from them; OSError if the writer is gone."""
        pending = self._pending
        while pending:
            try:
                written = os.writev(self._fd, list(itertools.islice(pending, _PIECES_PER_WRITE)))
            except BlockingIOError:
                return
            while written and written >= len(pending[0]):
                written -= len(pending.popleft())
            if written:  # the pipe is full
                pending[0] = memoryview(pending[0])[written:]
                return

    def _read_acks(self) -> None:
        try:
            data = os.read(self._ack_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the writer closed its end: it exited or died
            self._writer_died()
            return
        self._take_acks(data)

    def _take_acks(self, data: bytes) -> None:
        self._acks += data
        whole = len(self._acks) - len(self._acks) % ACK.size
        for (seq,) in ACK.iter_unpack(self._acks[:whole]):
            if self._unacked.pop(seq, None) is not None:
                self.acked += 1
                self._settled(seq)
        del self._acks[:whole]

    def _settled(self, seq: int) -> None:
        """A frame is written, or given up: nobody waits for it any more."""
        session = self._session_of.pop(seq, None)
        frames = self._unwritten.get(session)
        if frames is None:
            return
        frames.discard(seq)
        if not frames:
            del self._unwritten[session]
        waiters = self._written_waiters.get(session)
        if waiters:
            waiting = [(wanted, waiter) for wanted, waiter in waiters if wanted & frames and not waiter.done()]
            for wanted, waiter in waiters:
                if not (wanted & frames) and not waiter.done():
                    waiter.set_result(None)
            if waiting:
                self._written_waiters[session] = waiting
            else:
                del self._written_waiters[session]

    async def wait_written(self, session: str, timeout: float) -> bool:
        """Wait until every call of `session` handed over so far is confirmed
        written; False if that took longer than `timeout` seconds."""
        wanted = set(self._unwritten.get(session, ()))
        if not wanted:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._written_waiters.setdefault(session, []).append((wanted, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False

    def _writer_died(self) -> None:
        """Start another writer and send it what the dead one did not confirm
        (a writer dying over and over is restarted at a growing interval)."""
        loop = self._loop
        status = self._stop_watching_and_reap()
        self.restarts += 1
        lived = time.monotonic() - self._started_at
        self._restart_delay = 0.0 if lived > 10 else min(30.0, max(0.5, self._restart_delay * 2))
        logger.error(
            f"llm-traj: the record writer stopped ({status}); starting another"
            f"{f' in {self._restart_delay:g} s' if self._restart_delay else ''},"
            f" which writes the {len(self._unacked)} calls not confirmed written"
        )
        if self._restart_delay and loop is not None:
            self._restart_scheduled = loop.call_later(self._restart_delay, self._restart)
        else:
            self._restart()

    def _restart(self) -> None:
        self._restart_scheduled = None
        self._pending = deque(self._resend_frames())
        self.start()
        self._write()

    def _resend_frames(self) -> list[bytes]:
        """The pieces of the unconfirmed frames marked as sent before (the new
        writer skips a call already on disk), each body whole (the new writer
        has no previous body: each becomes its session's last); a call whose
        writer died `_MAX_TRIES` times is given up, with an error."""
        pieces = []
        self._last_bodies.clear()
        for seq, (frame, tries, body) in list(self._unacked.items()):
            if tries >= _MAX_TRIES:
                del self._unacked[seq]
                self._settled(seq)
                logger.error(f"llm-traj: a call was not recorded: {tries} record writers died with it pending")
                continue
            frame = resent(frame, body)
            self._unacked[seq] = (frame, tries + 1, body)
            self._last_bodies.swap(self._session_of[seq], body, sum(map(len, body)))
            pieces += frame
        return pieces

    def _stop_watching_and_reap(self) -> str:
        proc, self._proc = self._proc, None
        self._unwatch()
        self._acks.clear()
        self._last_bodies.clear()  # (what it had is gone with it)
        if proc is None:
            return "not running"
        if proc.poll() is None:  # closed its pipes but lives on: not a writer we can use
            proc.kill()
        status = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return f"exit status {status}" if status >= 0 else f"killed by signal {-status}"

    def close(self, timeout: float = 30.0) -> None:
        """Hand over what is pending and wait until the writer has written it
        all (a writer that dies meanwhile is replaced, as on the loop)."""
        self._unwatch()
        if self._restart_scheduled is not None:  # replaced here instead
            self._restart_scheduled.cancel()
            self._restart_scheduled = None
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_TRIES):
            if self._proc is None:
                if not self._unacked:
                    return
                self._pending = deque(self._resend_frames())
                self.start()
            if self._drain(deadline):
                break
            status = self._stop_watching_and_reap()
            if time.monotonic() >= deadline:
                break
            logger.error(f"llm-traj: the record writer stopped ({status}) with {len(self._unacked)} calls to write; starting another")
        if self._proc is not None:
            self._stop_watching_and_reap()
        if self._unacked:
            logger.error(f"llm-traj: {len(self._unacked)} calls were not recorded: the record writer did not write them in time")
            for seq in list(self._unacked):
                self._settled(seq)

    def _drain(self, deadline: float) -> bool:
        """Write what is pending, close the pipe and read acknowledgements
        until the writer exits; True if it exited normally."""
        proc = self._proc
        closed = False
        while True:
            if not self._pending and not closed:
                proc.stdin.close()
                closed = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.error("llm-traj: the record writer did not finish in time; stopping it")
                return False
            readable, writable, _ = select.select([self._ack_fd], [] if closed else [self._fd], [], remaining)
            if writable:
                try:
                    self._put()
                except OSError:
                    return False  # died: its acknowledgements so far are read below, next time round
            if readable:
                try:
                    data = os.read(self._ack_fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    return proc.wait() == 0 and not self._unacked
                self._take_acks(data)


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
