"""Replay: answers LLM calls from a recorded trajectory. Knows nothing of
mitmproxy; `mitm/replaying.py` is the thin addon around it.

Each session has its own cursor, the first of its recorded calls not yet
served. A request is matched by a ladder, strictest first:

  exact       its canonical form equals the call at the cursor;
  later       it equals a later call not yet served (the first such one, so
              that identical requests replay in recorded order);
  normalized  its normalised form (`normalize`: the agent's volatile fields
              dropped or replaced by placeholders) equals that of a call not
              yet served, the first such one;
  nearest     (if allowed) the call not yet served of the same shape (API,
              model, roles and tool calls in order) whose text is most similar,
              above a threshold (`nearest`);
  position    (if allowed) the call at the cursor, whatever the request.

The canonical form is the request body as sorted, compact JSON without the
ignored top-level fields, redacted and scrubbed the way the recorder redacted
the recording. What answers a call, and the normalised form of every recorded
call, are made at load; a request costs one JSON parse and one dump, and is
normalised only when no exact or later call matches. A miss is explained
against the nearest recorded call, after normalisation.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ..apis import API_BY_NAME
from ..apis.base import ApiShape
from ..core.jsontext import describe, differences
from ..core.record import CallRecord
from ..core.store import SkippedLine, read_records, trajectory_files
from . import nearest as near
from .matching import (
    DEFAULT_IGNORE,
    EXACT,
    LATER,
    NEAREST,
    NORMALIZED,
    POSITION,
    Canonical,
    canonical_request,
    describe_difference,
)
from .normalize import Normalized, Normalizer
from .replies import Reply, Step
from .report import SessionStats, report_lines

_MISS_WINDOW = 32  # unserved calls from the cursor on that a miss is compared with, when none has its shape
_DIFFERENCES = 3  # differences named for a nearest match or a miss


class ReplayLoadError(ValueError):
    """A trajectory that cannot be replayed, in one line."""


@dataclass(frozen=True, slots=True)
class Served:
    step: Step
    rung: str
    reply: Reply
    rules: tuple[str, ...] = ()  # normalized: the rules that made it match ("<preset>:<rule>")
    score: float | None = None  # nearest: the similarity
    differences: tuple[str, ...] = ()  # nearest: what still differs, after normalisation


@dataclass(frozen=True, slots=True)
class Miss:
    code: str  # replay_diverged, replay_exhausted, replay_unknown_session
    message: str


@dataclass
class Taken:
    position: int
    rung: str
    rules: tuple[str, ...] = ()
    score: float | None = None
    differences: tuple[str, ...] = ()


@dataclass
class Tape:
    """One session's recording and its cursor."""

    steps: list[Step]
    normalized: list[Normalized]  # of each step, made at load
    served: list[bool] = field(init=False)
    cursor: int = 0  # the first step not yet served
    by_key: dict[str, deque[int]] = field(init=False)  # positions of each canonical request, in order
    by_normalized: dict[str, deque[int]] = field(init=False)  # and of each normalised one
    stats: SessionStats = field(init=False)
    _shapes: list[tuple] = field(init=False)
    _words: list[Counter | None] = field(init=False)

    def __post_init__(self) -> None:
        self.served = [False] * len(self.steps)
        self.by_key, self.by_normalized = {}, {}
        for position, (step, normalized) in enumerate(zip(self.steps, self.normalized)):
            self.by_key.setdefault(step.request.key, deque()).append(position)
            self.by_normalized.setdefault(normalized.key, deque()).append(position)
        self.stats = SessionStats(recorded=len(self.steps))
        self._shapes = [near.shape(s.request.api, n.body) for s, n in zip(self.steps, self.normalized)]
        self._words = [None] * len(self.steps)

    def take(self, request: Canonical, normalized, allow_position: bool, allow_nearest: bool) -> Taken | None:
        """The step that answers a request, by the first rung that matches;
        `normalized()` gives the request's normalised form (made only if needed)."""
        position = self._first(self.by_key, request.key)
        if position is not None:
            return self._serve(Taken(position, EXACT if position == self.cursor else LATER))
        live = normalized()
        position = self._first(self.by_normalized, live.key)
        if position is not None:
            fired = sorted({*live.fired, *self.normalized[position].fired})
            return self._serve(Taken(position, NORMALIZED, tuple(f"{live.preset}:{name}" for name in fired)))
        if allow_nearest:
            found = self.nearest(request.api, live, same_shape=True)
            if found is not None and found[1] >= near.THRESHOLD:
                position, score = found
                return self._serve(Taken(position, NEAREST, score=score, differences=self.differences(position, live)))
        if allow_position and self.cursor < len(self.steps):
            return self._serve(Taken(self.cursor, POSITION))
        return None

    def _first(self, index: dict[str, deque[int]], key: str) -> int | None:
        positions = index.get(key)
        while positions and self.served[positions[0]]:  # taken by another rung meanwhile
            positions.popleft()
        return positions[0] if positions else None

    def _serve(self, taken: Taken) -> Taken:
        self.served[taken.position] = True
        while self.cursor < len(self.steps) and self.served[self.cursor]:
            self.cursor += 1
        return taken

    def nearest(self, api: str, live: Normalized, same_shape: bool) -> tuple[int, float] | None:
        """(position, similarity) of the unserved step closest to a normalised
        request: among those of its shape, or (not `same_shape`) those of its
        shape if any, else the next few from the cursor."""
        shape = near.shape(api, live.body)
        unserved = [p for p in range(self.cursor, len(self.steps)) if not self.served[p]]
        candidates = [p for p in unserved if self._shapes[p] == shape]
        if not candidates and not same_shape:
            candidates = unserved[:_MISS_WINDOW]
        if not candidates:
            return None
        words = near.words(live.body)
        scored = [(near.similarity(self._words_of(p), words), -p) for p in candidates]
        score, minus_position = max(scored)
        return -minus_position, score

    def _words_of(self, position: int) -> Counter:
        words = self._words[position]
        if words is None:
            words = self._words[position] = near.words(self.normalized[position].body)
        return words

    def differences(self, position: int, live: Normalized) -> tuple[str, ...]:
        found = islice(differences(self.normalized[position].body, live.body), _DIFFERENCES)
        return tuple(describe(*d) for d in found)


class Replay:
    def __init__(
        self,
        records: Iterable[CallRecord],
        ignore: Iterable[str] = DEFAULT_IGNORE,
        normalizer: Normalizer | None = None,
    ) -> None:
        self.ignore = frozenset(ignore)
        self.normalizer = normalizer or Normalizer.builtin()
        by_session: dict[str, list[CallRecord]] = {}
        for record in records:
            by_session.setdefault(record.session, []).append(record)
        self._tapes: dict[str, Tape] = {}
        self.models: list[tuple[str, bool]] = []  # (model, whether an Anthropic call) of every call, for /v1/models
        self.urls: set[str] = set()  # where the recorded calls went
        for session, records_ in by_session.items():
            steps, normalized = [], []
            for record in sorted(records_, key=lambda r: r.index):
                api = API_BY_NAME.get(record.api)
                if api is None:
                    raise ReplayLoadError(f"session {session} #{record.index}: cannot replay api {record.api!r}")
                step = Step(record, api, self.ignore)
                steps.append(step)
                normalized.append(self._normalize(step.request, record.request_headers))
                if isinstance(record.request, dict) and isinstance(record.request.get("model"), str):
                    self.models.append((record.request["model"], record.api == "anthropic.messages"))
                self.urls.add(record.url)
            self._tapes[session] = Tape(steps, normalized)
        self._unknown: dict[str, SessionStats] = {}  # sessions asked for that were not recorded

    @property
    def calls(self) -> int:
        return sum(len(t.steps) for t in self._tapes.values())

    @property
    def sessions(self) -> int:
        return len(self._tapes)

    def canonical(self, api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]]) -> Canonical:
        return canonical_request(api, body, headers, self.ignore)

    def _normalize(self, request: Canonical, headers: Iterable[tuple[str, str]]) -> Normalized:
        rules = self.normalizer.rule_set(self.normalizer.preset_for(headers, request.key))
        return rules.normalize(request.api, None, request.body) if request.raw else rules.normalize(request.api, request.body)

    def match(
        self, session: str, request: Canonical, allow_position: bool = False, allow_nearest: bool = False
    ) -> Served | Miss:
        tape = self._tapes.get(session)
        if tape is None:
            return self._unknown_session(session)
        live: list[Normalized] = []  # made at most once, by the first rung or the miss that needs it

        def normalized() -> Normalized:
            if not live:
                live.append(self._normalize(request, request.headers))
            return live[0]

        taken = tape.take(request, normalized, allow_position, allow_nearest)
        if taken is None:
            return self._miss(session, tape, request, normalized())
        stats = tape.stats
        stats.served += 1
        stats.rungs[taken.rung] += 1
        stats.rules.update(taken.rules)
        step = tape.steps[taken.position]
        if taken.rung == NEAREST:
            stats.nearest.append({"step": step.index, "score": round(taken.score, 3),
                                  "differences": list(taken.differences)})  # fmt: skip
        return Served(step, taken.rung, step.reply(request.wants_stream), taken.rules, taken.score, taken.differences)

    def _miss(self, session: str, tape: Tape, request: Canonical, live: Normalized) -> Miss:
        total = len(tape.steps)
        if tape.cursor >= total:
            code = "replay_exhausted"
            what = f"session {session!r} is exhausted: all {total} recorded calls were replayed"
        else:
            code = "replay_diverged"
            found = tape.nearest(request.api, live, same_shape=False)
            position = found[0] if found is not None else tape.cursor
            step = tape.steps[position]
            where = f"at step {step.index} (of {total})"
            if position != tape.cursor:
                where += f", the closest recorded call (similarity {found[1]:.2f}; the cursor is at step {tape.steps[tape.cursor].index})"
            if step.request.api != request.api:
                detail = describe_difference(step.request, request)
            else:
                detail = "; ".join(tape.differences(position, live)) or describe_difference(step.request, request)
            what = f"the request diverges from the recording of session {session!r} {where}: {detail}"
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
        rules that made calls match, the nearest matches, the misses and the
        first of them. JSON-able."""
        stats = {s: t.stats for s, t in self._tapes.items()} | self._unknown
        return {"sessions": {session: st.as_dict() for session, st in sorted(stats.items())}}

    def report_lines(self) -> list[str]:
        return report_lines(self.report()["sessions"], self.calls)


def load(
    path: Path | str, ignore: Iterable[str] = DEFAULT_IGNORE, normalizer: Normalizer | None = None
) -> tuple[Replay, list[SkippedLine]]:
    """The replay of a trajectory and the torn last lines skipped; a bad line
    raises `core.store.TrajectoryError` (file:line: what)."""
    if not trajectory_files(path):
        raise ReplayLoadError(f"{path}: no trajectory there (a directory of <session>.jsonl files, or a .jsonl file)")
    skipped: list[SkippedLine] = []
    return Replay(read_records(path, skipped=skipped), ignore, normalizer), skipped
