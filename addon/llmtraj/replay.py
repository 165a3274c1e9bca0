"""Replay: answers LLM calls from a recorded trajectory. Knows nothing of
mitmproxy; `mitm/replaying.py` is the thin addon around it.

Each session has its own cursor, the first of its recorded calls not yet
served. A request is matched by a ladder, strictest first:

  exact     its canonical form equals the call at the cursor;
  later     it equals a later call not yet served (the first such one, so that
            identical requests replay in recorded order);
  position  (if allowed) the call at the cursor, whatever the request.

The canonical form is the request body as sorted, compact JSON without the
ignored top-level fields, redacted and scrubbed the way the recorder redacted
the recording. What answers a call is built at load (a stream/non-stream
conversion when asked), so a request costs one JSON parse and one dump.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_core import from_json

from .apis import API_BY_NAME, ApiShape
from .record import CallRecord
from .redact import REDACTED, may_have_secret_fields, redact_fields, redact_headers, scrub
from .store import SkippedLine, read_records, trajectory_files

# Fields that change from run to run without changing the answer: how it is
# delivered (a stream recording is replayed to a non-stream request and back)
# and bookkeeping that the model does not see.
REPORT_PATH = "/llm-traj/replay-report"  # where the proxy answers the replay report

DEFAULT_IGNORE = (
    "stream", "stream_options", "user", "metadata", "store",
    "service_tier", "prompt_cache_key", "safety_identifier",
)  # fmt: skip

EXACT, LATER, POSITION = "exact", "later", "position"
MATCH_HEADER = b"x-llm-traj-match"
STEP_HEADER = b"x-llm-traj-step"

# Not replayed: framing the proxy redoes (the recording is content-decoded, the
# length may change with a stream/non-stream conversion).
_DROPPED_HEADERS = {
    "content-length", "transfer-encoding", "content-encoding", "connection",
    "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
}  # fmt: skip
_SSE = b"text/event-stream"
_JSON = b"application/json"
_EXCERPT = 60


class ReplayLoadError(ValueError):
    """A trajectory that cannot be replayed, in one line."""


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Canonical:
    """A request as matching sees it: `key` is what is compared; `body` (the
    JSON without the ignored fields, or the text of a body that is not JSON)
    is only looked at to describe a difference."""

    api: str
    key: str
    body: Any
    wants_stream: bool = False


def canonical(
    api: ApiShape, body: Any, raw: str | None, ignore: frozenset[str], secrets: set[str] = frozenset()
) -> Canonical:
    if raw is not None:
        text = scrub(raw, secrets)
        return Canonical(api.name, f"{api.name}\nraw\n{text}", text)
    wants_stream = api.wants_stream(body)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ignore}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    scrubbed = scrub(text, secrets)
    if scrubbed is not text:  # a header secret in the body: a difference must not show it
        body = json.loads(scrubbed)
    return Canonical(api.name, f"{api.name}\njson\n{scrubbed}", body, wants_stream)


def canonical_request(
    api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]], ignore: frozenset[str]
) -> Canonical:
    """The canonical form of a live request, redacted as the recorder redacts."""
    _, secrets = redact_headers(list(headers))
    try:
        obj = from_json(body) if body else None
    except ValueError:
        return canonical(api, None, body.decode("utf-8", errors="replace"), ignore, secrets)
    if may_have_secret_fields(body):
        obj = redact_fields(obj, secrets)
    return canonical(api, obj, None, ignore, secrets)


MISSING = object()


def first_difference(recorded: Any, request: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(path, recorded value, request value) of the first place two JSON values
    differ, in the recording's key order; `MISSING` for an absent value."""
    if isinstance(recorded, dict) and isinstance(request, dict):
        for key, value in recorded.items():
            sub = f"{path}.{key}" if path else key
            if key not in request:
                return sub, value, MISSING
            if found := first_difference(value, request[key], sub):
                return found
        for key, value in request.items():
            if key not in recorded:
                return (f"{path}.{key}" if path else key), MISSING, value
        return None
    if isinstance(recorded, list) and isinstance(request, list):
        for i, (a, b) in enumerate(zip(recorded, request)):
            if found := first_difference(a, b, f"{path}[{i}]"):
                return found
        if len(recorded) == len(request):
            return None
        i = min(len(recorded), len(request))
        if i < len(recorded):
            return f"{path}[{i}]", recorded[i], MISSING
        return f"{path}[{i}]", MISSING, request[i]
    # `type` too: 1, 1.0 and true are equal in Python, not in the canonical JSON
    if type(recorded) is not type(request) or recorded != request:
        return path, recorded, request
    return None


def excerpt(value: Any, other: Any) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, str) and isinstance(other, str):
        # Long texts often differ far in: show where they part.
        common = next((i for i, (a, b) in enumerate(zip(value, other)) if a != b), min(len(value), len(other)))
        start = max(0, common - 20)
        text = value[start : start + _EXCERPT]
        return ("…" if start else "") + dumps(text) + ("…" if start + _EXCERPT < len(value) else "")
    text = dumps(value)
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"


def describe_difference(recorded: Canonical, request: Canonical) -> str:
    if recorded.api != request.api:
        return f"api: recorded {recorded.api}, request {request.api}"
    path, a, b = first_difference(recorded.body, request.body) or ("body", recorded.body, request.body)
    return f"{path or 'body'}: recorded {excerpt(a, b)}, request {excerpt(b, a)}"


# -------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class Reply:
    """What the agent gets. Headers are ready for the wire; `events` are the
    recorded stream's blocks with their delay after the first one (empty when
    there is no pace to keep); `body` is always the whole body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    events: tuple[tuple[float, bytes], ...] = ()
    cut: bool = False  # the recorded call ended early: cut the connection after the body


def _headers(
    recorded: Iterable[tuple[str, str]], step: bytes, content_type: bytes | None = None
) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for name, value in recorded:
        lower = name.lower()
        if (
            lower in _DROPPED_HEADERS
            or lower.startswith("x-llm-traj-")  # ours, in a recording made during a replay
            or value == REDACTED  # a set-cookie and the like: the value is gone
            or (content_type is not None and lower == "content-type")
        ):
            continue
        out.append((name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")))
    if content_type is not None:
        out.append((b"content-type", content_type))
    out.append((STEP_HEADER, step))
    return tuple(out)


class Step:
    """One recorded call, ready to be served."""

    __slots__ = ("session", "index", "request", "_record", "_api", "_recorded")

    def __init__(self, record: CallRecord, api: ApiShape, ignore: frozenset[str]) -> None:
        self.session, self.index = record.session, record.index
        self.request = canonical(api, record.request, record.request_raw, ignore)
        self._record, self._api = record, api
        self._recorded = self._as_recorded()

    def reply(self, wants_stream: bool) -> Reply:
        """As recorded (built at load); a complete success is converted, when
        asked, to the other delivery (stream or not)."""
        record = self._record
        if wants_stream == record.stream or not record.complete or not 200 <= record.status < 300:
            return self._recorded
        if not isinstance(record.response, dict):
            return self._recorded
        return self._convert()

    def _step_header(self) -> bytes:
        return f"{self.session}#{self.index}".encode()

    def _as_recorded(self) -> Reply:
        record = self._record
        if record.status is None:
            # No answer came: the agent got the proxy's 502, written as
            # mitm/proxy_errors.py writes it.
            message = f"llm-traj proxy: {record.error.message if record.error else 'no response'}"
            body = json.dumps(self._api.error_body(message, "proxy_error", "proxy_502")).encode()
            return Reply(502, _headers((), self._step_header(), _JSON), body)
        headers = _headers(record.response_headers, self._step_header())
        if record.events is not None:
            first = record.events[0].t if record.events else 0.0
            events = tuple((e.t - first, e.raw.encode()) for e in record.events)
            body = b"".join(raw for _, raw in events)
        else:
            events = ()
            body = (
                record.response_raw.encode() if record.response_raw is not None
                else dumps(record.response).encode() if record.response is not None
                else b""
            )  # fmt: skip
        return Reply(record.status, headers, body, events, cut=not record.complete)

    def _convert(self) -> Reply:
        record = self._record
        if record.stream:  # the aggregate the recorder built from the stream
            headers = _headers(record.response_headers, self._step_header(), _JSON)
            return Reply(record.status, headers, dumps(record.response).encode())
        headers = _headers(record.response_headers, self._step_header(), _SSE)
        return Reply(record.status, headers, b"".join(self._api.chunks_from_final(record.response)))


async def reply_body(reply: Reply, speed: float) -> AsyncIterator[bytes]:
    """The body as it is written: a recorded stream at its pace divided by
    `speed` (0: all at once), and for a call that ended early, the cut
    (ConnectionResetError) after it."""
    if speed > 0 and reply.events:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for delay, raw in reply.events:
            wait = start + delay / speed - loop.time()  # from the start, so sleeps do not add up drift
            if wait > 0:
                await asyncio.sleep(wait)
            yield raw
    else:
        yield reply.body
    if reply.cut:
        raise ConnectionResetError("the recorded call ended here")


# ---------------------------------------------------------------- matching


@dataclass(frozen=True, slots=True)
class Served:
    step: Step
    rung: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Miss:
    code: str  # replay_diverged, replay_exhausted, replay_unknown_session
    message: str


@dataclass
class SessionStats:
    recorded: int
    served: int = 0
    rungs: Counter = field(default_factory=Counter)
    misses: int = 0
    first_divergence: str | None = None


class _Tape:
    """One session's recording and its cursor."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.served = [False] * len(steps)
        self.cursor = 0  # the first step not yet served
        self.by_key: dict[str, deque[int]] = {}  # positions of each canonical request, in order
        for position, step in enumerate(steps):
            self.by_key.setdefault(step.request.key, deque()).append(position)
        self.stats = SessionStats(recorded=len(steps))

    def take(self, key: str, allow_position: bool) -> tuple[int, str] | None:
        positions = self.by_key.get(key)
        while positions and self.served[positions[0]]:  # taken by the position rung meanwhile
            positions.popleft()
        if positions:
            position = positions.popleft()
            rung = EXACT if position == self.cursor else LATER
        elif allow_position and self.cursor < len(self.steps):
            position, rung = self.cursor, POSITION
        else:
            return None
        self.served[position] = True
        while self.cursor < len(self.steps) and self.served[self.cursor]:
            self.cursor += 1
        return position, rung


class Replay:
    def __init__(self, records: Iterable[CallRecord], ignore: Iterable[str] = DEFAULT_IGNORE) -> None:
        self.ignore = frozenset(ignore)
        by_session: dict[str, list[CallRecord]] = {}
        for record in records:
            by_session.setdefault(record.session, []).append(record)
        self._tapes: dict[str, _Tape] = {}
        for session, records_ in by_session.items():
            steps = []
            for record in sorted(records_, key=lambda r: r.index):
                api = API_BY_NAME.get(record.api)
                if api is None:
                    raise ReplayLoadError(f"session {session} #{record.index}: cannot replay api {record.api!r}")
                steps.append(Step(record, api, self.ignore))
            self._tapes[session] = _Tape(steps)
        self._unknown: dict[str, SessionStats] = {}  # sessions asked for that were not recorded

    @property
    def calls(self) -> int:
        return sum(len(t.steps) for t in self._tapes.values())

    @property
    def sessions(self) -> int:
        return len(self._tapes)

    def canonical(self, api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]]) -> Canonical:
        return canonical_request(api, body, headers, self.ignore)

    def match(self, session: str, request: Canonical, allow_position: bool = False) -> Served | Miss:
        tape = self._tapes.get(session)
        if tape is None:
            return self._unknown_session(session)
        taken = tape.take(request.key, allow_position)
        if taken is None:
            return self._miss(session, tape, request)
        position, rung = taken
        tape.stats.served += 1
        tape.stats.rungs[rung] += 1
        step = tape.steps[position]
        return Served(step, rung, step.reply(request.wants_stream))

    def _miss(self, session: str, tape: _Tape, request: Canonical) -> Miss:
        total = len(tape.steps)
        if tape.cursor >= total:
            code = "replay_exhausted"
            what = f"session {session!r} is exhausted: all {total} recorded calls were replayed"
        else:
            code = "replay_diverged"
            step = tape.steps[tape.cursor]
            what = (
                f"the request diverges from the recording of session {session!r} at step {step.index} "
                f"(of {total}): {describe_difference(step.request, request)}"
            )
        # A retried call (a timeout, an SDK retry) is a common cause: say so.
        again = next(
            (tape.steps[p].index for p in reversed(range(len(tape.steps)))
             if tape.served[p] and tape.steps[p].request.key == request.key),
            None,
        )  # fmt: skip
        if again is not None:
            what += f"; it equals step {again}, already replayed"
        return self._count_miss(tape.stats, code, what)

    def _unknown_session(self, session: str) -> Miss:
        known = sorted(self._tapes)
        listed = ", ".join(known[:5]) + (f", … ({len(known)} in all)" if len(known) > 5 else "")
        stats = self._unknown.setdefault(session, SessionStats(recorded=0))
        what = f"session {session!r} is not in the recording (it has: {listed})"
        return self._count_miss(stats, "replay_unknown_session", what)

    @staticmethod
    def _count_miss(stats: SessionStats, code: str, what: str) -> Miss:
        stats.misses += 1
        if stats.first_divergence is None:
            stats.first_divergence = what
        return Miss(code, f"llm-traj replay: {what}")

    def report(self) -> dict[str, Any]:
        """Per session: calls recorded and served, the rungs that matched, the
        misses and the first of them. JSON-able."""
        stats = {s: t.stats for s, t in self._tapes.items()} | self._unknown
        return {
            "sessions": {
                session: {
                    "recorded": st.recorded,
                    "served": st.served,
                    "unserved": st.recorded - st.served,
                    "rungs": dict(st.rungs),
                    "misses": st.misses,
                    "first_divergence": st.first_divergence,
                }
                for session, st in sorted(stats.items())
            }
        }

    def report_lines(self) -> list[str]:
        sessions = self.report()["sessions"]
        served = sum(s["served"] for s in sessions.values())
        misses = sum(s["misses"] for s in sessions.values())
        lines = [
            f"replay report: {served} of {self.calls} recorded calls served, {misses} misses, {len(sessions)} sessions"
        ]
        for name, s in sessions.items():
            rungs = ", ".join(f"{r} {n}" for r, n in s["rungs"].items())
            line = f"  {name}: {s['served']}/{s['recorded']} served" + (f" ({rungs})" if rungs else "")
            line += f", {s['misses']} misses"
            if s["first_divergence"]:
                line += f"; first: {s['first_divergence']}"
            lines.append(line)
        return lines


def load(path: Path | str, ignore: Iterable[str] = DEFAULT_IGNORE) -> tuple[Replay, list[SkippedLine]]:
    """The replay of a trajectory and the torn last lines skipped; a bad line
    raises `store.TrajectoryError` (file:line: what)."""
    if not trajectory_files(path):
        raise ReplayLoadError(f"{path}: no trajectory there (a directory of <session>.jsonl files, or a .jsonl file)")
    skipped: list[SkippedLine] = []
    return Replay(read_records(path, skipped=skipped), ignore), skipped
