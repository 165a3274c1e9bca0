"""Numbers about trajectories, and where two trajectories of the same task part.

`stats` totals calls per session and per model (the model the agent asked
for), with the calls' token capture and, per session, whether its calls
continue one another token for token; `diff` walks the calls that two trajectories share, session by session,
to the first one whose request or reply differs. Both read `CallRecord`s and
return plain data; `render_stats` / `render_diff` turn that into text.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ..apis import chat_view
from ..core.record import CallRecord
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
    with_tokens: int = 0  # calls with token ids (`tokens`)
    tokens_complete: int = 0  # of those, the ones whose capture is complete
    continuity: list[dict[str, Any]] | None = None  # sessions: `tokens.continuity.continuity` of its calls


def _row(kind: Literal["session", "model", "all"], name: str, calls: list[CallRecord]) -> StatsRow:
    outcomes = [call_outcome(r) for r in calls]
    usages = [usage_of(r) for r in calls]
    known = [u for u in usages if u is not None]
    reasoning = [n for u in known if (n := reasoning_tokens(u)) is not None]
    ends = [r.timings.ended_at for r in calls if r.timings.ended_at is not None]
    ttfbs = [r.timings.first_byte_at - r.timings.started_at for r in calls if r.timings.first_byte_at is not None]
    tokens = [(r.index, r.tokens) for r in calls if r.tokens is not None]
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
        with_tokens=len(tokens),
        tokens_complete=sum(t.complete for _, t in tokens),
        continuity=continuity([(i, t.model_dump()) for i, t in tokens]) if kind == "session" and tokens else None,
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
