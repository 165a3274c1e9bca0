"""The record writer process: turns captured calls into trajectory lines.

The proxy's event loop is the hot path of every agent step, and on it only the
capture happens (`capture.CallCapture`: references to the bytes as they pass,
and when). Parsing, decoding, SSE aggregation, redaction, serialising and
writing run here, in `python -m llmtraj.recording.writer PATH`, on the
machine's other core. Captures arrive on stdin as framed marshal data and
request body (both ends are this package, on the same Python;
`capture.FRAME_HEAD`), and each frame's sequence number goes back on stdout
once its line is written: those of all the frames read by then in one write,
after which the writer pauses a few ms (`NAP`) so that the calls of a burst
are taken in one wake-up, not one each. A frame
marked as sent before (to a writer that died) is skipped if its call is on disk
already. A body sent as a delta (`capture.DELTA`) is taken as the pieces of
the session's previous body (`capture.LastBodies`, kept as the proxy keeps its
own) up to the bytes it repeats, then the new bytes (`capture.BodyPieces`: not
joined), and what parses and scans it is told how much of it repeats that body;
a delta whose previous body this writer does not have ends the process
without writing it (the proxy sends whatever is unconfirmed again, whole, to
the writer it starts in its place). The process runs in its own session, so a Ctrl-C meant for the proxy
does not reach it, and ends at end of input, once whatever arrived is written:
a proxy killed with `kill -9` loses no call it had finished.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..apis import API_BY_NAME
from ..bridge.recording import add_bridge
from ..core.headers import content_length, text_headers
from ..core.store import TrajectoryWriter, written_calls
from ..prompts.tagging import PromptTagger
from ..tokens.recording import agent_chunks, engine_final, plan_of, tokens_of
from .body_parse import RequestBodies
from .builder import RecordBuilder
from .capture import ACK, DELTA, FRAME_HEAD, RESENT, BodyPieces, CallCapture, LastBodies
from .secret_scan import SecretFieldScan


def record_of(
    capture: CallCapture, tagger: PromptTagger | None = None, secret_scan: SecretFieldScan | None = None,
    request_bodies: RequestBodies | None = None, repeats: tuple[BodyPieces, int] | None = None,
) -> tuple[dict[str, Any], set[str], bytes | BodyPieces | None]:
    """(the record's fields, secrets to scrub, request body to write as is);
    `repeats`: the session's previous body and how many bytes of it the
    request body begins with, when known."""
    tee = RecordBuilder(
        secret_scan=secret_scan,
        request_bodies=request_bodies,
        repeats=repeats,
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
    api = tee.api
    note = capture.token_capture
    rewriting = None
    if capture.status is not None:
        tee.response_started(capture.status, text_headers(capture.response_headers), now=capture.response_headers_at)
        chunks, times = capture.chunks, capture.chunk_times
        if note is not None and not note.get("passed_unchanged"):
            # the record's events are the agent's: the engine's bytes as the proxy rewrote them
            chunks, rewriting = agent_chunks(chunks, plan_of(note), tee.fields["stream"])
            times = [*times, capture.ended_at or (times[-1] if times else None)]
        tee.chunks(chunks, times)
    error = capture.error
    if error is None and (short := _short_body(capture)) is not None:
        error = ("upstream_disconnected", short)
    fields = tee.finish(now=capture.ended_at) if error is None else tee.fail(*error, now=capture.ended_at)
    fields["extra"].update(capture.extra)
    fields["upstream"] = capture.upstream
    final = engine_final(api, capture.chunks, fields["stream"]) if rewriting is not None else fields["response"]
    fields["tokens"] = tokens_of(api, final, fields["extra"], note["engine"] if note else None)
    fields["capture"] = {**note, **(rewriting or {})} if note is not None else None
    fields["weight_version"] = capture.weight_version
    if capture.bridge is not None:
        add_bridge(fields, capture.bridge, tee.secrets)
    if tagger is not None:
        fields["prompt"] = tagger.tag(capture.api, fields["request"], capture.prompt)
    return fields, tee.secrets, tee.request_json


def _short_body(capture: CallCapture) -> str | None:
    """Why a response that ended normally is short of its Content-Length, if it is
    (counted on the upstream's bytes as captured, before any rewriting for the agent)."""
    if capture.status is None or (length := content_length(capture.response_headers)) is None:
        return None
    received = sum(map(len, capture.chunks))
    return f"the body ended after {received} of its {length} bytes (Content-Length)" if received < length else None


# A writer woken by a call acknowledges what it has written and reads again
# no sooner than this long after it woke: the calls that arrive meanwhile are
# read, written and acknowledged in one wake-up (one read, one acknowledgement
# and, in the proxy, one wake-up to read it), instead of one of each per call.
# A call waits at most this long more for its line; a writer busy for longer
# (large bodies, a backlog) does not pause; an idle one blocks on its input.
NAP = 0.004
_READ = 1 << 16  # at least this much per read (a frame longer than that is read whole)


class FrameReader:
    """The frames on `source`, read in as few reads as they arrived in: `take`
    gives a frame already read whole (or None), `fill` reads what came."""

    def __init__(self, source) -> None:
        self._read = source.read1  # (what is there, at most one read)
        self._buffer = bytearray()
        self._need = FRAME_HEAD.size  # bytes the next frame needs in the buffer, as far as is known

    def fill(self) -> bool:
        """Read what is there, waiting for some; False at end of input."""
        data = self._read(max(_READ, self._need - len(self._buffer)))
        self._buffer += data
        return bool(data)

    def take(self) -> tuple[tuple[int, int, int, int, int, int], bytes, bytes] | None:
        """(its head's fields, marshal data, request body) of the next frame, if it is whole."""
        buffer = self._buffer
        if len(buffer) < FRAME_HEAD.size:
            return None
        fields = FRAME_HEAD.unpack_from(buffer)
        length, body_length = fields[:2]
        data_end = FRAME_HEAD.size + length
        self._need = end = data_end + body_length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:  # (one copy each, not two)
            data, body = bytes(view[FRAME_HEAD.size : data_end]), bytes(view[data_end:end])
        del buffer[:end]
        self._need = FRAME_HEAD.size
        return fields, data, body


def serve(path: str, source=None, prompts: str | None = None, acks: int | None = None, nap: float = NAP) -> bool:
    """Write every capture read from `source` (stdin) to the trajectory at `path`,
    each tagged with its system prompt's version in the registry at `prompts`,
    and acknowledge them on the file descriptor `acks` once written: all the
    frames read by then in one write, when no whole frame is left to write,
    then read more no sooner than `nap` seconds after the first of them;
    False if it stopped at a delta whose previous body it does not have."""
    frames = FrameReader(source or sys.stdin.buffer)
    tagger = PromptTagger(prompts) if prompts else None
    secret_scan = SecretFieldScan()
    request_bodies = RequestBodies()
    last_bodies = LastBodies()
    writer = TrajectoryWriter(path)
    on_disk: dict[Path, set[tuple[str, int, float]]] = {}  # calls in a file, read when a resent frame asks
    written = bytearray()  # acknowledgements not yet sent
    woke = 0.0  # when the first of them was taken
    # What start-up built (modules, pydantic's schemas) lives as long as the writer: frozen, the cyclic
    # collector no longer walks it on each full pass, which a long stream's many objects set off (a
    # 200-event stream's record cost 11-17% more CPU with it walked, a 20,000-event one about 1.7x).
    gc.freeze()

    def already_written(capture: CallCapture) -> bool:
        file = writer.file_for(capture.session)
        if file not in on_disk:
            on_disk[file] = written_calls(file) if file.exists() else set()
        return (capture.session, capture.index, capture.started_at) in on_disk[file]

    def acknowledge() -> None:
        nonlocal acks
        if acks is not None:
            try:
                sent = 0
                while sent < len(written):
                    sent += os.write(acks, written[sent:])
            except OSError:  # the proxy is gone: go on writing what it sent
                acks = None
        written.clear()

    try:
        while True:
            frame = frames.take()
            if frame is None:
                if written:
                    acknowledge()
                    if (pause := woke + nap - time.monotonic()) > 0:
                        time.sleep(pause)
                if not frames.fill():
                    break  # end of input (a frame cut short: the proxy died mid-frame, that call was not finished)
                continue
            (_, _, seq, flags, shared, base), data, body = frame
            if not written:
                woke = time.monotonic()
            try:
                capture = CallCapture.unframe(data, body)
            except Exception as exc:  # one bad call must not cost the others
                print(f"llm-traj: could not record a call: {exc!r}", file=sys.stderr, flush=True)
                last_bodies.clear()  # its session's last body is unknown: no delta is taken against a wrong one
            else:
                repeats = None
                if flags & DELTA:
                    previous = last_bodies.last(capture.session)
                    if previous is None or len(previous) != base or shared > base:
                        print(f"llm-traj: the record writer does not have the body a call's request repeats"
                              f" (session {capture.session!r}); stopping, for the proxy to send it whole",
                              file=sys.stderr, flush=True)  # fmt: skip
                        return False
                    capture.request_body = BodyPieces.after(previous, shared, body)
                    repeats = previous, shared
                else:
                    capture.request_body = BodyPieces([body])
                last_bodies.swap(capture.session, capture.request_body, len(capture.request_body))
                try:
                    if not (flags & RESENT and already_written(capture)):
                        writer.append(*record_of(capture, tagger, secret_scan, request_bodies, repeats))
                except Exception as exc:  # one bad call must not cost the others
                    print(f"llm-traj: could not record a call: {exc!r}", file=sys.stderr, flush=True)
            written += ACK.pack(seq)
    finally:
        writer.close()
        if written:  # (those written before a delta it could not take too)
            acknowledge()
    return True


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(prog="python -m llmtraj.recording.writer")
    arguments.add_argument("path")
    arguments.add_argument("--prompts", help="the prompt registry to tag calls from")
    parsed = arguments.parse_args()
    # A capture arriving wakes this process: as a batch process (Linux) it does
    # not preempt the proxy then, which goes on sending the agent its answer
    # (its share of the CPU stays the same).
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    logging.basicConfig(format="%(message)s")  # its warnings (a trajectory file rotated) on the proxy's stderr
    sys.exit(0 if serve(parsed.path, prompts=parsed.prompts, acks=sys.stdout.fileno()) else 3)
