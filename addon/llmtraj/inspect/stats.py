"""Numbers about trajectories, and where two trajectories of the same task part.

`stats` totals calls per session and per model (the model the agent asked
for), with the calls' token capture and, per session, whether its calls
continue one another token for token; `diff` walks the calls that two trajectories share, session by session,
to the first one whose request or reply differs. Both read `CallRecord`s and
return plain data; `render_stats` / `render_diff` turn that into text.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..apis import chat_view
from ..core.record import CallRecord
from ..core.store import TrajectoryReader
from ..tokens.continuity import continuity

Outcome = Literal["ok", "failed", "incomplete"]


def call_outcome(record: CallRecord) -> Outcome:
    """`incomplete`: the call did not finish (no or a partial response);
    `failed`: it finished without a usable answer (an error status, or a 200
    stream that carried only an error event); `ok` otherwise."""
    if not record.complete:
        return "incomplete"
    response = chat_view(record.api, record.response)
    if record.status is None or not 200 <= record.status < 300:
        return "failed"
    if not isinstance(response, dict) or not isinstance(response.get("choices"), list) or not response["choices"]:
        return "failed"
    return "ok"


def by_session(records: Iterable[CallRecord]) -> Mapping[str, list[CallRecord]]:
    """Records grouped by session (in order of first appearance), each group in
    call order: concurrent calls of one session are appended as they end.
    A `TrajectoryReader`'s sessions are read when looked up, one at a time."""
    if isinstance(records, TrajectoryReader):
        return records.sessions
    groups: dict[str, list[CallRecord]] = {}
    for record in records:
        groups.setdefault(record.session, []).append(record)
    return {session: sorted(calls, key=lambda r: r.index) for session, calls in groups.items()}


def request_model(record: CallRecord) -> str | None:
    model = record.request.get("model") if isinstance(record.request, dict) else None
    return model if isinstance(model, str) else None


def usage_of(record: CallRecord) -> dict[str, Any] | None:
    """The usage of a call in chat terms (prompt_tokens, completion_tokens), whatever its API."""
    response = chat_view(record.api, record.response)
    usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def reasoning_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("completion_tokens_details")
    value = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) else None


# ------------------------------------------------------------------ stats


Grouping = Literal["session", "model", "prompt"]
GROUPINGS: tuple[Grouping, ...] = ("session", "model", "prompt")


def prompt_key(record: CallRecord) -> str:
    """A call's prompt version as `stats --by prompt` groups it: NAME/VERSION,
    `(unregistered <hash>)` for a system prompt the registry did not know,
    `(no system prompt)`, or `(untagged)` for a call recorded without a registry."""
    tag = record.prompt
    if tag is None:
        return "(untagged)"
    if tag.hash is None:
        return "(no system prompt)"
    if tag.name is None:
        return f"(unregistered {tag.hash})"
    return f"{tag.name}/{tag.version}"


@dataclass(frozen=True)
class StatsRow:
    kind: Literal["session", "model", "prompt", "all"]
    name: str
    calls: int
    ok: int
    failed: int
    incomplete: int
    streamed: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasoning_tokens: int | None  # None: no call reported any
    without_usage: int  # calls whose response carried no usage (token totals leave them out)
    wall_time: float | None  # seconds from the first call's start to the last call's end
    mean_ttfb: float | None  # seconds from a call's start to its first response byte
    mean_latency: float | None  # seconds from a call's start to its end
    with_tokens: int = 0  # calls with token ids (`tokens`)
    tokens_complete: int = 0  # of those, the ones whose capture is complete
    continuity: list[dict[str, Any]] | None = None  # sessions: `tokens.continuity.continuity` of its calls


class _Tally:
    """A row's numbers, added up call by call."""

    def __init__(self, keep_tokens: bool = False) -> None:
        self.calls = 0
        self.outcomes: Counter[str] = Counter()
        self.streamed = self.prompt = self.completion = self.total = self.without_usage = 0
        self.reasoning: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.ttfbs: list[float] = []
        self.latencies: list[float] = []
        self.with_tokens = self.tokens_complete = 0
        # a session's token ids, for its continuity (only session rows keep them)
        self.tokens: list[tuple[int, dict[str, Any]]] | None = [] if keep_tokens else None

    def add(self, r: CallRecord) -> None:
        self.calls += 1
        self.outcomes[call_outcome(r)] += 1
        self.streamed += r.stream
        usage = usage_of(r)
        if usage is None:
            self.without_usage += 1
        else:
            self.prompt += _int(usage.get("prompt_tokens"))
            self.completion += _int(usage.get("completion_tokens"))
            self.total += _int(usage.get("total_tokens"))
            if (n := reasoning_tokens(usage)) is not None:
                self.reasoning = (self.reasoning or 0) + n
        t = r.timings
        self.started = t.started_at if self.started is None else min(self.started, t.started_at)
        if t.ended_at is not None:
            self.ended = t.ended_at if self.ended is None else max(self.ended, t.ended_at)
            self.latencies.append(t.ended_at - t.started_at)
        if t.first_byte_at is not None:
            self.ttfbs.append(t.first_byte_at - t.started_at)
        if r.tokens is not None:
            self.with_tokens += 1
            self.tokens_complete += r.tokens.complete
            if self.tokens is not None:
                self.tokens.append((r.index, r.tokens.model_dump()))

    def row(self, kind: Literal["session", "model", "prompt", "all"], name: str) -> StatsRow:
        return StatsRow(
            kind=kind,
            name=name,
            calls=self.calls,
            ok=self.outcomes["ok"],
            failed=self.outcomes["failed"],
            incomplete=self.outcomes["incomplete"],
            streamed=self.streamed,
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            total_tokens=self.total,
            reasoning_tokens=self.reasoning,
            without_usage=self.without_usage,
            wall_time=self.ended - self.started if self.ended is not None else None,
            mean_ttfb=statistics.fmean(self.ttfbs) if self.ttfbs else None,
            mean_latency=statistics.fmean(self.latencies) if self.latencies else None,
            with_tokens=self.with_tokens,
            tokens_complete=self.tokens_complete,
            continuity=continuity(self.tokens) if self.tokens else None,
        )


def stats(records: Iterable[CallRecord], by: Iterable[Grouping] = ("session", "model")) -> list[StatsRow]:
    """One row per session, per requested model and/or per prompt version (each
    sorted by name), and one for all calls. Empty without records. Added up call
    by call, so a `TrajectoryReader` is read one session at a time."""
    keys = {"session": lambda r: r.session, "model": lambda r: request_model(r) or "(no model)", "prompt": prompt_key}
    groups: dict[str, dict[str, _Tally]] = {kind: {} for kind in by}
    everything = _Tally()
    for record in records:
        everything.add(record)
        for kind, tallies in groups.items():
            tallies.setdefault(keys[kind](record), _Tally(keep_tokens=kind == "session")).add(record)
    if not everything.calls:
        return []
    rows = [tallies[name].row(kind, name) for kind, tallies in groups.items() for name in sorted(tallies)]
    return rows + [everything.row("all", "all")]


_COLUMNS = (
    ("calls", lambda r: r.calls), ("ok", lambda r: r.ok), ("failed", lambda r: r.failed),
    ("incomplete", lambda r: r.incomplete), ("streamed", lambda r: r.streamed),
    ("prompt", lambda r: r.prompt_tokens), ("completion", lambda r: r.completion_tokens),
    ("total", lambda r: r.total_tokens), ("reasoning", lambda r: r.reasoning_tokens),
    ("no usage", lambda r: r.without_usage),
    ("wall", lambda r: None if r.wall_time is None else f"{r.wall_time:.2f} s"),
    ("mean ttfb", lambda r: None if r.mean_ttfb is None else f"{r.mean_ttfb * 1000:.0f} ms"),
    ("mean latency", lambda r: None if r.mean_latency is None else f"{r.mean_latency * 1000:.0f} ms"),
)  # fmt: skip
# shown only for trajectories with token ids
_TOKEN_COLUMN = ("tokens complete", lambda r: f"{r.tokens_complete}/{r.with_tokens}" if r.with_tokens else None)


def render_stats(rows: list[StatsRow]) -> str:
    """A plain aligned table, text columns left, numbers right; `-` for unknown."""
    if not rows:
        return "no calls"
    columns = _COLUMNS + ((_TOKEN_COLUMN,) if any(row.with_tokens for row in rows) else ())
    table = [["", *(title for title, _ in columns)]]
    for row in rows:
        label = "all" if row.kind == "all" else f"{row.kind} {row.name}"
        table.append([label, *("-" if (v := get(row)) is None else str(v) for _, get in columns)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in table
    ]
    return "\n".join(lines + [line for row in rows for line in _continuity_lines(row)])


def _continuity_lines(row: StatsRow) -> list[str]:
    """Whether a session's calls extend one another token for token, and where not."""
    if not row.continuity:
        return []
    held = sum(entry["continues"] for entry in row.continuity)
    lines = [f"session {row.name}: continuity: {held} of {len(row.continuity)} calls continue the call before"]
    for entry in row.continuity:
        if not entry["continues"]:
            lines.append(f"  #{entry['index']} after #{entry['previous']}: differs at token {entry['position']}: "
                         f"{entry['cause']}")  # fmt: skip
    return lines
