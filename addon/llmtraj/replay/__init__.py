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
the recording. A session of a trajectory on disk is read when it is first
asked for, and its tape keeps only what matching needs: the digests of each
recorded call's canonical and normalised request, the rules normalising it
fired, its shape, and where its line is. The record is read again to serve
the call (or to compare texts, for the nearest rung and to explain a miss), so
memory and startup do not grow with the recording. A live request costs one
JSON parse and one dump, and is normalised only when no exact or later call
matches.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from ..apis import API_BY_NAME
from ..apis.base import ApiShape
from ..core.jsontext import describe, differences
from ..core.record import CallRecord
from ..core.store import LineReader, SessionFile, SkippedLine, trajectory_files, trajectory_sessions
from . import nearest as near
from .matching import (
    DEFAULT_IGNORE,
    EXACT,
    LATER,
    NEAREST,
    NORMALIZED,
    POSITION,
    Canonical,
    canonical,
    canonical_request,
    describe_difference,
)
from .normalize import Normalized, Normalizer
from .replies import Reply, Step, key_digest
from .report import SessionStats, report_lines

logger = logging.getLogger("llm_traj")

# Recorded calls a nearest match or a miss compares texts with, from the
# cursor on: each is read again from disk, so their number is bounded.
_COMPARED = 32
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
    code: str  # replay_diverged, replay_exhausted, replay_unknown_session, replay_unreadable
    message: str
    status: int = 400  # 500 when the recording, not the request, is at fault


@dataclass
class Taken:
    position: int
    rung: str
    rules: tuple[str, ...] = ()
    score: float | None = None
    differences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Normalization:
    """What a tape keeps of a recorded call's normalised form."""

    key: bytes  # the digest of its key
    fired: tuple[str, ...]
    preset: str
    shape: tuple  # `nearest.shape`


class Tape:
    """One session's recording and its cursor."""

    def __init__(self, steps: list[Step], normalized: list[Normalization], body_of: Callable[[int], Any]) -> None:
        self.steps = steps
        self.normalized = normalized
        self._body_of = body_of  # position -> the recorded call's normalised body, made again
        self.served = [False] * len(steps)
        self.cursor = 0  # the first step not yet served
        self.by_key: dict[bytes, deque[int]] = {}  # positions of each canonical request's digest, in order
        self.by_normalized: dict[bytes, deque[int]] = {}  # and of each normalised one's
        for position, (step, n) in enumerate(zip(steps, normalized)):
            self.by_key.setdefault(step.key, deque()).append(position)
            self.by_normalized.setdefault(n.key, deque()).append(position)
        self._words: dict[int, Counter] = {}
        self.stats = SessionStats(recorded=len(steps))
        self.unreadable: str | None = None  # the bad line the recording of the session stops at, if it does

    def take(
        self, request: Canonical, normalized: Callable[[], Normalized], allow_position: bool, allow_nearest: bool
    ) -> Taken | None:
        """The step that answers a request, by the first rung that matches;
        `normalized()` gives the request's normalised form (made only if needed)."""
        position = self._first(self.by_key, key_digest(request.key))
        if position is not None:
            return self._serve(Taken(position, EXACT if position == self.cursor else LATER))
        live = normalized()
        position = self._first(self.by_normalized, key_digest(live.key))
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

    def _first(self, index: dict[bytes, deque[int]], key: bytes) -> int | None:
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
        request: among the next of its shape, or (not `same_shape`) those of its
        shape if any, else the next few from the cursor."""
        shape = near.shape(api, live.body)
        unserved = (p for p in range(self.cursor, len(self.steps)) if not self.served[p])
        unserved = list(islice(unserved, 4 * _COMPARED))
        candidates = [p for p in unserved if self.normalized[p].shape == shape][:_COMPARED]
        if not candidates and not same_shape:
            candidates = unserved[:_COMPARED]
        if not candidates:
            return None
        words = near.words(live.body)
        score, minus_position = max((near.similarity(self._words_of(p), words), -p) for p in candidates)
        return -minus_position, score

    def _words_of(self, position: int) -> Counter:
        words = self._words.get(position)
        if words is None:
            words = self._words[position] = near.words(self._body_of(position))
        return words

    def differences(self, position: int, live: Normalized) -> tuple[str, ...]:
        found = islice(differences(self._body_of(position), live.body), _DIFFERENCES)
        return tuple(describe(*d) for d in found)


class Replay:
    """Sessions' tapes: from records in memory (all built at once), or from
    the sessions of a trajectory on disk (`load`), each built when first asked
    for."""

    def __init__(
        self,
        records: Iterable[CallRecord] = (),
        ignore: Iterable[str] = DEFAULT_IGNORE,
        normalizer: Normalizer | None = None,
        sessions: Mapping[str, SessionFile] | None = None,
        skipped: Iterable[SkippedLine] = (),
    ) -> None:
        self.ignore = frozenset(ignore)
        self.normalizer = normalizer or Normalizer.builtin()
        by_session: dict[str, list[tuple[CallRecord, None]]] = {}
        for record in records:
            by_session.setdefault(record.session, []).append((record, None))
        self._in_memory = [record for pairs in by_session.values() for record, _ in pairs]
        self._tapes: dict[str, Tape] = {s: self._tape(s, steps) for s, steps in by_session.items()}
        self._files: dict[str, SessionFile] = dict(sessions or {})
        self._on_disk: dict[str, SessionFile] = dict(self._files)  # not read yet
        self._lines = LineReader()  # the records of steps on disk, read again to serve them
        self._unreadable: dict[str, str] = {}  # sessions whose recording could not be read, and why
        self._unknown: dict[str, SessionStats] = {}  # sessions asked for that were not recorded
        self._calls_seen: tuple[list[tuple[str, bool]], set[str]] | None = None
        self._skipped: dict[tuple[Path, int], SkippedLine] = {}  # lines skipped so far (logged once each)
        self._note_skipped(skipped)

    def _tape(self, session: str, records: Iterable[tuple[CallRecord, object]]) -> Tape:
        steps, normalized = [], []
        for record, source in sorted(records, key=lambda r: r[0].index):
            api = API_BY_NAME.get(record.api)
            if api is None:
                raise ReplayLoadError(f"session {session} #{record.index}: cannot replay api {record.api!r}")
            if record.session != session:
                raise ReplayLoadError(f"session {session} #{record.index}: the call is of session {record.session!r}")
            request = canonical(api, record.request, record.request_raw, self.ignore)
            steps.append(Step(record, api, self.ignore, source, request))
            preset = self.normalizer.preset_for(record.request_headers, request.key)
            n = self._normalize(preset, request)
            normalized.append(Normalization(key_digest(n.key), n.fired, preset, near.shape(api.name, n.body)))
        return Tape(steps, normalized, lambda p: self._normalize(normalized[p].preset, steps[p].request).body)

    def _normalize(self, preset: str, request: Canonical) -> Normalized:
        rules = self.normalizer.rule_set(preset)
        return rules.normalize(request.api, None, request.body) if request.raw else rules.normalize(request.api, request.body)

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
                                        for span, record in where.records(tolerate_corrupt=True, skipped=skipped)))  # fmt: skip
        except (OSError, ReplayLoadError) as exc:
            self._unreadable[session] = f"session {session!r} cannot be replayed: {exc}"
            logger.error(f"llm-traj: {self._unreadable[session]}")
            return None
        finally:
            if collecting:
                gc.enable()
        # A bad line cuts the session there: its calls before it replay, a call past them is told why it cannot.
        cut = next((line for line in skipped if line.session == session), None)
        if cut is not None:
            tape.unreadable = tape.stats.unreadable = str(cut)
        self._note_skipped(skipped)
        self._tapes[session] = tape
        return tape

    def _note_skipped(self, lines: Iterable[SkippedLine]) -> None:
        """Log each skipped line once (a single file's are found by the scan at
        startup and again when their session is read) and keep it for the report."""
        for line in lines:
            if (line.file, line.line) not in self._skipped:
                self._skipped[line.file, line.line] = line
                logger.warning(f"llm-traj: {line}")

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

    def _recorded_calls(self) -> Iterator[CallRecord]:
        yield from self._in_memory
        for where in self._files.values():
            try:
                for _, record in where.records(tolerate_corrupt=True):
                    yield record
            except OSError:
                continue  # that session's calls fail when asked for, saying why

    def _seen(self) -> tuple[list[tuple[str, bool]], set[str]]:
        if self._calls_seen is None:  # a pass over the recording, the first time it is asked
            models, urls = [], set()
            for record in self._recorded_calls():
                if isinstance(record.request, dict) and isinstance(record.request.get("model"), str):
                    models.append((record.request["model"], record.api == "anthropic.messages"))
                urls.add(record.url)
            self._calls_seen = models, urls
        return self._calls_seen

    @property
    def models(self) -> list[tuple[str, bool]]:
        """(model, whether an Anthropic call) of every recorded call, for /v1/models."""
        return self._seen()[0]

    @property
    def urls(self) -> set[str]:
        """Where the recorded calls went."""
        return self._seen()[1]

    def canonical(self, api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]]) -> Canonical:
        return canonical_request(api, body, headers, self.ignore)

    def match(
        self, session: str, request: Canonical, allow_position: bool = False, allow_nearest: bool = False
    ) -> Served | Miss:
        tape = self._tapes.get(session)
        if tape is None and session in self._on_disk:
            tape = self._read(session)
        if tape is None:
            if session in self._unreadable:
                return Miss("replay_unreadable", f"llm-traj replay: {self._unreadable[session]}", 500)
            return self._unknown_session(session)
        live: list[Normalized] = []  # made at most once, by the first rung or the miss that needs it

        def normalized() -> Normalized:
            if not live:
                live.append(self._normalize(self.normalizer.preset_for(request.headers, request.key), request))
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
        if tape.unreadable is not None:  # the request may be one of the calls past the bad line
            what = (f"the request matches none of the {total} calls of session {session!r} not yet replayed before its"
                    f" recording becomes unreadable: {tape.unreadable}")  # fmt: skip
            return self._count_miss(tape.stats, "replay_unreadable", what, 500)
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
            recorded = step.request
            if recorded.api != request.api:
                detail = describe_difference(recorded, request)
            else:
                detail = "; ".join(tape.differences(position, live)) or describe_difference(recorded, request)
            what = f"the request diverges from the recording of session {session!r} {where}: {detail}"
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
    def _count_miss(stats: SessionStats, code: str, what: str, status: int = 400) -> Miss:
        stats.misses += 1
        if stats.first_divergence is None:
            stats.first_divergence = what
        return Miss(code, f"llm-traj replay: {what}", status)

    def report(self) -> dict[str, Any]:
        """Per session read (or asked for): calls recorded and served, the
        rungs that matched, the rules that made calls match, the nearest
        matches, the misses and the first of them, where its recording
        became unreadable; how many recorded sessions were never asked for;
        the lines skipped so far. JSON-able."""
        stats = {s: t.stats for s, t in self._tapes.items()} | self._unknown
        return {
            "sessions": {session: st.as_dict() for session, st in sorted(stats.items())},
            "sessions_not_asked": len(self._on_disk),
            "skipped_lines": [str(line) for line in self._skipped.values()],
        }

    def report_lines(self) -> list[str]:
        report = self.report()
        return report_lines(report["sessions"], self.calls, report["sessions_not_asked"], report["skipped_lines"])


def load(path: Path | str, ignore: Iterable[str] = DEFAULT_IGNORE, normalizer: Normalizer | None = None) -> Replay:
    """The replay of a trajectory, each session read when first asked for: a
    skipped line is logged then with its file:line; a bad line cuts its
    session there (its calls before it replay, a request matching none of
    them fails with a 500 `replay_unreadable` saying where). A single file is
    scanned at once for its sessions: a line of none is logged and skipped."""
    skipped: list[SkippedLine] = []
    sessions = trajectory_sessions(path, skipped, tolerate_corrupt=True)
    if not sessions and not trajectory_files(path):
        raise ReplayLoadError(f"{path}: no trajectory there (a directory of <session>.jsonl files, or a .jsonl file)")
    return Replay(ignore=ignore, normalizer=normalizer, sessions=sessions, skipped=skipped)


def _record_source(lines: LineReader, where: SessionFile, span: tuple[int, int], whole: bool) -> CallRecord:
    """The record of the line at `span` again: as stored (enough for its
    reply), or whole (its request resolved by reading the session up to it)."""
    if not whole:
        return lines.record(where.file, span)
    return next(record for at, record in where.records(tolerate_corrupt=True) if at == span)
