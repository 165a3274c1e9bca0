"""Numbers about trajectories, and where two trajectories of the same task part.

`stats` totals calls per session and per model (the model the agent asked
for), `diff` walks the calls that two trajectories share, session by session,
to the first one whose request or reply differs. Both read `CallRecord`s and
return plain data; `render_stats` / `render_diff` turn that into text.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .apis import chat_view
from .record import CallRecord
from .replay import DEFAULT_IGNORE, excerpt, first_difference

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


def by_session(records: Iterable[CallRecord]) -> dict[str, list[CallRecord]]:
    """Records grouped by session (in order of first appearance), each group in
    call order: concurrent calls of one session are appended as they end."""
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


@dataclass(frozen=True)
class StatsRow:
    kind: Literal["session", "model", "all"]
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


def _row(kind: Literal["session", "model", "all"], name: str, calls: list[CallRecord]) -> StatsRow:
    outcomes = [call_outcome(r) for r in calls]
    usages = [usage_of(r) for r in calls]
    known = [u for u in usages if u is not None]
    reasoning = [n for u in known if (n := reasoning_tokens(u)) is not None]
    ends = [r.timings.ended_at for r in calls if r.timings.ended_at is not None]
    ttfbs = [r.timings.first_byte_at - r.timings.started_at for r in calls if r.timings.first_byte_at is not None]
    return StatsRow(
        kind=kind,
        name=name,
        calls=len(calls),
        ok=outcomes.count("ok"),
        failed=outcomes.count("failed"),
        incomplete=outcomes.count("incomplete"),
        streamed=sum(r.stream for r in calls),
        prompt_tokens=sum(_int(u.get("prompt_tokens")) for u in known),
        completion_tokens=sum(_int(u.get("completion_tokens")) for u in known),
        total_tokens=sum(_int(u.get("total_tokens")) for u in known),
        reasoning_tokens=sum(reasoning) if reasoning else None,
        without_usage=len(calls) - len(known),
        wall_time=max(ends) - min(r.timings.started_at for r in calls) if ends else None,
        mean_ttfb=statistics.fmean(ttfbs) if ttfbs else None,
    )


def stats(records: Iterable[CallRecord]) -> list[StatsRow]:
    """One row per session, one per requested model (both sorted by name), and
    one for all calls. Empty without records."""
    records = list(records)
    if not records:
        return []
    sessions = by_session(records)
    models: dict[str, list[CallRecord]] = {}
    for record in records:
        models.setdefault(request_model(record) or "(no model)", []).append(record)
    return (
        [_row("session", name, sessions[name]) for name in sorted(sessions)]
        + [_row("model", name, models[name]) for name in sorted(models)]
        + [_row("all", "all", records)]
    )


_COLUMNS = (
    ("calls", lambda r: r.calls), ("ok", lambda r: r.ok), ("failed", lambda r: r.failed),
    ("incomplete", lambda r: r.incomplete), ("streamed", lambda r: r.streamed),
    ("prompt", lambda r: r.prompt_tokens), ("completion", lambda r: r.completion_tokens),
    ("total", lambda r: r.total_tokens), ("reasoning", lambda r: r.reasoning_tokens),
    ("no usage", lambda r: r.without_usage),
    ("wall", lambda r: None if r.wall_time is None else f"{r.wall_time:.2f} s"),
    ("mean ttfb", lambda r: None if r.mean_ttfb is None else f"{r.mean_ttfb * 1000:.0f} ms"),
)  # fmt: skip


def render_stats(rows: list[StatsRow]) -> str:
    """A plain aligned table, text columns left, numbers right; `-` for unknown."""
    if not rows:
        return "no calls"
    table = [["", *(title for title, _ in _COLUMNS)]]
    for row in rows:
        label = "all" if row.kind == "all" else f"{row.kind} {row.name}"
        table.append([label, *("-" if (v := get(row)) is None else str(v) for _, get in _COLUMNS)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in table
    )


# ------------------------------------------------------------------- diff


@dataclass(frozen=True)
class Divergence:
    """The first difference of one call: in its request or in its reply, at a
    JSON path, with short excerpts of both sides."""

    index: int
    part: Literal["request", "response"]
    path: str
    a: str
    b: str


@dataclass
class SessionDiff:
    session: str
    calls_a: int
    calls_b: int
    same: int  # leading calls identical in both
    first: Divergence | None  # the first call present in both that differs
    differing: int  # calls present in both that differ
    only_a: list[int] = field(default_factory=list)  # call indexes
    only_b: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.first is None and not self.only_a and not self.only_b


@dataclass
class DiffResult:
    sessions: list[SessionDiff]  # sessions in both, by name
    only_a: list[str]
    only_b: list[str]

    @property
    def identical(self) -> bool:
        return not self.only_a and not self.only_b and all(s.identical for s in self.sessions)


def _reply(record: CallRecord) -> dict[str, Any]:
    """What the agent got, without what changes on every run of the same
    answer (ids, timestamps, usage, fingerprints)."""
    view: dict[str, Any] = {"status": record.status, "complete": record.complete}
    response = chat_view(record.api, record.response)
    if isinstance(response, dict) and isinstance(response.get("choices"), list):
        view["choices"] = [
            {"message": c.get("message"), "finish_reason": c.get("finish_reason")} if isinstance(c, dict) else c
            for c in response["choices"]
        ]
    else:
        view["response"] = response if response is not None else record.response_raw
    return view


def _divergence(index: int, part: Literal["request", "response"], found: tuple[str, Any, Any]) -> Divergence:
    path, a, b = found
    return Divergence(index, part, path or "body", excerpt(a, b), excerpt(b, a))


def _request(record: CallRecord, ignore: frozenset[str]) -> Any:
    """The request as replay matches it: without the top-level fields that
    change from run to run without changing the answer (stream, user, ...)."""
    if record.request_raw is not None:
        return record.request_raw
    if isinstance(record.request, dict):
        return {k: v for k, v in record.request.items() if k not in ignore}
    return record.request


def _compare(a: CallRecord, b: CallRecord, ignore: frozenset[str]) -> Divergence | None:
    found = ("api", a.api, b.api) if a.api != b.api else first_difference(_request(a, ignore), _request(b, ignore))
    if found:
        return _divergence(a.index, "request", found)
    found = first_difference(_reply(a), _reply(b))
    return _divergence(a.index, "response", found) if found else None


def _session_diff(
    session: str, calls_a: list[CallRecord], calls_b: list[CallRecord], ignore: frozenset[str]
) -> SessionDiff:
    a_by_index = {r.index: r for r in calls_a}
    b_by_index = {r.index: r for r in calls_b}
    result = SessionDiff(session, len(calls_a), len(calls_b), 0, None, 0)
    leading = True  # no difference and no missing call yet
    for index in sorted(a_by_index.keys() | b_by_index.keys()):
        a, b = a_by_index.get(index), b_by_index.get(index)
        divergence = _compare(a, b, ignore) if a is not None and b is not None else None
        if b is None:
            result.only_a.append(index)
        elif a is None:
            result.only_b.append(index)
        elif divergence is not None:
            result.differing += 1
            result.first = result.first or divergence
        leading = leading and a is not None and b is not None and divergence is None
        if leading:
            result.same += 1
    return result


def diff(
    records_a: Iterable[CallRecord], records_b: Iterable[CallRecord], ignore: Iterable[str] = DEFAULT_IGNORE
) -> DiffResult:
    """Where two trajectories of the same task part, per session present in
    both: calls are paired by index; requests are compared without the
    `ignore`d top-level fields (replay's defaults), replies by status,
    completeness and what each choice said (message, finish reason)."""
    sessions_a, sessions_b = by_session(records_a), by_session(records_b)
    ignore = frozenset(ignore)
    return DiffResult(
        sessions=[
            _session_diff(name, sessions_a[name], sessions_b[name], ignore)
            for name in sorted(sessions_a.keys() & sessions_b.keys())
        ],
        only_a=sorted(sessions_a.keys() - sessions_b.keys()),
        only_b=sorted(sessions_b.keys() - sessions_a.keys()),
    )


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


def _indexes(indexes: list[int]) -> str:
    return ", ".join(f"#{i}" for i in indexes)


def render_diff(result: DiffResult) -> str:
    lines = []
    for s in result.sessions:
        counts = _calls(s.calls_a) if s.calls_a == s.calls_b else f"{_calls(s.calls_a)} in A, {s.calls_b} in B"
        if s.identical:
            lines.append(f"session {s.session}: {counts}, identical")
            continue
        lines.append(f"session {s.session}: {counts}, {s.same} identical at the start")
        if s.first is not None:
            d = s.first
            lines.append(f"  {d.part} of #{d.index} differs at {d.path}: A {d.a}, B {d.b}")
            if s.differing > 1:
                lines.append(f"  {s.differing} calls in both differ in all")
        if s.only_a:
            lines.append(f"  only in A: {_indexes(s.only_a)}")
        if s.only_b:
            lines.append(f"  only in B: {_indexes(s.only_b)}")
    if result.only_a:
        lines.append(f"sessions only in A: {', '.join(result.only_a)}")
    if result.only_b:
        lines.append(f"sessions only in B: {', '.join(result.only_b)}")
    if not lines:
        lines.append("no sessions")
    return "\n".join(lines)
