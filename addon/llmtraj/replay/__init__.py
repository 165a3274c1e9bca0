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
the recording. A session of a trajectory on disk is read when it is first
asked for, and its tape keeps only what matching needs (the digest of each
canonical request, where the line is); the record is read again when its call
is served, so memory and startup do not grow with the recording.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..apis import API_BY_NAME
from ..apis.base import ApiShape
from ..core.record import CallRecord
from ..core.store import LineReader, SessionFile, SkippedLine, TrajectoryError, trajectory_files, trajectory_sessions
from .matching import (
    DEFAULT_IGNORE,
    EXACT,
    LATER,
    POSITION,
    Canonical,
    canonical_request,
    describe_difference,
)
from .replies import Reply, Step, key_digest
from .report import SessionStats


logger = logging.getLogger("llm_traj")


class ReplayLoadError(ValueError):
    """A trajectory that cannot be replayed, in one line."""


@dataclass(frozen=True, slots=True)
class Served:
    step: Step
    rung: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Miss:
    code: str  # replay_diverged, replay_exhausted, replay_unknown_session, replay_unreadable
    message: str
    status: int = 400  # 500 when the recording, not the request, is at fault


class Tape:
    """One session's recording and its cursor."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.served = [False] * len(steps)
        self.cursor = 0  # the first step not yet served
        self.by_key: dict[bytes, deque[int]] = {}  # positions of each canonical request's digest, in order
        for position, step in enumerate(steps):
            self.by_key.setdefault(step.key, deque()).append(position)
        self.stats = SessionStats(recorded=len(steps))

    def take(self, key: bytes, allow_position: bool) -> tuple[int, str] | None:
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
    """Sessions' tapes: from records in memory (all built at once), or from
    the sessions of a trajectory on disk (`load`), each built when first asked
    for."""

    def __init__(
        self,
        records: Iterable[CallRecord] = (),
        ignore: Iterable[str] = DEFAULT_IGNORE,
        sessions: Mapping[str, SessionFile] | None = None,
    ) -> None:
        self.ignore = frozenset(ignore)
        by_session: dict[str, list[tuple[CallRecord, None]]] = {}
        for record in records:
            by_session.setdefault(record.session, []).append((record, None))
        self._tapes: dict[str, Tape] = {s: self._tape(s, steps) for s, steps in by_session.items()}
        self._on_disk: dict[str, SessionFile] = dict(sessions or {})  # not read yet
        self._lines = LineReader()  # the records of steps on disk, read again to serve them
        self._unreadable: dict[str, str] = {}  # sessions whose recording could not be read, and why
        self._unknown: dict[str, SessionStats] = {}  # sessions asked for that were not recorded

    def _tape(self, session: str, records: Iterable[tuple[CallRecord, object]]) -> Tape:
        steps = []
        for record, source in sorted(records, key=lambda r: r[0].index):
            api = API_BY_NAME.get(record.api)
            if api is None:
                raise ReplayLoadError(f"session {session} #{record.index}: cannot replay api {record.api!r}")
            if record.session != session:
                raise ReplayLoadError(f"session {session} #{record.index}: the call is of session {record.session!r}")
            steps.append(Step(record, api, self.ignore, source))
        return Tape(steps)

    def _read(self, session: str) -> Tape | None:
        """The tape of a session on disk, read now; None if it cannot be."""
        where = self._on_disk.pop(session)
        skipped: list[SkippedLine] = []
        # The records read here are dropped once their steps are made: no
        # cycles to collect, and the collector's passes over the proxy's heap
        # would double the time of a long session.
        collecting = gc.isenabled()
        gc.disable()
        try:
            tape = self._tape(session, ((record, partial(_record_source, self._lines, where, span))
                                        for span, record in where.records(skipped=skipped)))  # fmt: skip
        except (OSError, TrajectoryError, ReplayLoadError) as exc:
            self._unreadable[session] = f"session {session!r} cannot be replayed: {exc}"
            logger.error(f"llm-traj: {self._unreadable[session]}")
            return None
        finally:
            if collecting:
                gc.enable()
        for line in skipped:
            logger.warning(f"llm-traj: {line}")
        self._tapes[session] = tape
        return tape

    def close(self) -> None:
        """Closes the files kept open to serve calls (a closed replay still serves, reopening them)."""
        self._lines.close()

    @property
    def calls(self) -> int:
        """Calls of the sessions read so far."""
        return sum(len(t.steps) for t in self._tapes.values())

    @property
    def sessions(self) -> int:
        return len(self._tapes) + len(self._on_disk) + len(self._unreadable)

    def canonical(self, api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]]) -> Canonical:
        return canonical_request(api, body, headers, self.ignore)

    def match(self, session: str, request: Canonical, allow_position: bool = False) -> Served | Miss:
        tape = self._tapes.get(session)
        if tape is None and session in self._on_disk:
            tape = self._read(session)
        if tape is None:
            if session in self._unreadable:
                return Miss("replay_unreadable", f"llm-traj replay: {self._unreadable[session]}", 500)
            return self._unknown_session(session)
        taken = tape.take(key_digest(request.key), allow_position)
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
        key = key_digest(request.key)
        again = next(
            (tape.steps[p].index for p in reversed(range(len(tape.steps)))
             if tape.served[p] and tape.steps[p].key == key),
            None,
        )  # fmt: skip
        if again is not None:
            what += f"; it equals step {again}, already replayed"
        return self._count_miss(tape.stats, code, what)

    def _unknown_session(self, session: str) -> Miss:
        known = sorted([*self._tapes, *self._on_disk, *self._unreadable])
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
        """Per session read (or asked for): calls recorded and served, the
        rungs that matched, the misses and the first of them; and how many
        recorded sessions were never asked for. JSON-able."""
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
            },
            "sessions_not_asked": len(self._on_disk),
        }

    def report_lines(self) -> list[str]:
        report = self.report()
        sessions = report["sessions"]
        served = sum(s["served"] for s in sessions.values())
        misses = sum(s["misses"] for s in sessions.values())
        not_asked = f" ({report['sessions_not_asked']} more recorded, never asked for)" if self._on_disk else ""
        lines = [
            f"replay report: {served} of {self.calls} recorded calls served, {misses} misses, "
            f"{len(sessions)} sessions{not_asked}"
        ]
        for name, s in sessions.items():
            rungs = ", ".join(f"{r} {n}" for r, n in s["rungs"].items())
            line = f"  {name}: {s['served']}/{s['recorded']} served" + (f" ({rungs})" if rungs else "")
            line += f", {s['misses']} misses"
            if s["first_divergence"]:
                line += f"; first: {s['first_divergence']}"
            lines.append(line)
        return lines


def load(path: Path | str, ignore: Iterable[str] = DEFAULT_IGNORE) -> Replay:
    """The replay of a trajectory, each session read when first asked for: a
    torn last line is logged then, a bad line makes that session's calls
    fail (500, `replay_unreadable`) and is logged with its file:line. A single
    file is scanned at once for its sessions: a line of none raises
    `core.store.TrajectoryError`."""
    skipped: list[SkippedLine] = []
    sessions = trajectory_sessions(path, skipped)
    if not sessions and not trajectory_files(path):
        raise ReplayLoadError(f"{path}: no trajectory there (a directory of <session>.jsonl files, or a .jsonl file)")
    for line in skipped:
        logger.warning(f"llm-traj: {line}")
    return Replay(ignore=ignore, sessions=sessions)


def _record_source(lines: LineReader, where: SessionFile, span: tuple[int, int], whole: bool) -> CallRecord:
    """The record of the line at `span` again: as stored (enough for its
    reply), or whole (its request resolved by reading the session up to it)."""
    if not whole:
        return lines.record(where.file, span)
    return next(record for at, record in where.records(tolerate_corrupt=True) if at == span)
