"""Replay: answers LLM calls from a recorded trajectory. Knows nothing of
from ..apis import API_BY_NAME
from ..apis.base import ApiShape
from ..core.record import CallRecord
from .matching import Canonical, DEFAULT_IGNORE, EXACT, LATER, POSITION, canonical_request, describe_difference
from .replies import Reply, Step
from .report import SessionStats
from ..core.store import SkippedLine, read_records, trajectory_files
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

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apis import API_BY_NAME
from ..apis.base import ApiShape
from ..core.record import CallRecord
from ..core.store import SkippedLine, read_records, trajectory_files
from .matching import (
    DEFAULT_IGNORE,
    EXACT,
    LATER,
    POSITION,
    Canonical,
    canonical_request,
    describe_difference,
)
from .replies import Reply, Step
from .report import SessionStats


class ReplayLoadError(ValueError):
    """A trajectory that cannot be replayed, in one line."""


@dataclass(frozen=True, slots=True)
class Served:
    step: Step
    rung: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Miss:
    code: str  # replay_diverged, replay_exhausted, replay_unknown_session
    message: str


class Tape:
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
        self._tapes: dict[str, Tape] = {}
        self.models: list[tuple[str, bool]] = []  # (model, whether an Anthropic call) of every call, for /v1/models
        self.urls: set[str] = set()  # where the recorded calls went
        for session, records_ in by_session.items():
            steps = []
            for record in sorted(records_, key=lambda r: r.index):
                api = API_BY_NAME.get(record.api)
                if api is None:
                    raise ReplayLoadError(f"session {session} #{record.index}: cannot replay api {record.api!r}")
                steps.append(Step(record, api, self.ignore))
                if isinstance(record.request, dict) and isinstance(record.request.get("model"), str):
                    self.models.append((record.request["model"], record.api == "anthropic.messages"))
                self.urls.add(record.url)
            self._tapes[session] = Tape(steps)
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

    def _miss(self, session: str, tape: Tape, request: Canonical) -> Miss:
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
    raises `core.store.TrajectoryError` (file:line: what)."""
    if not trajectory_files(path):
        raise ReplayLoadError(f"{path}: no trajectory there (a directory of <session>.jsonl files, or a .jsonl file)")
    skipped: list[SkippedLine] = []
    return Replay(read_records(path, skipped=skipped), ignore), skipped
