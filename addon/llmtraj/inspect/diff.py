"""Where two trajectories of the same task part: `diff` walks the calls they share,
session by session, to the first one whose request or reply differs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..apis import chat_view
from ..core.jsontext import compact_json, excerpt, first_difference
from ..core.record import CallRecord
from ..replay.matching import DEFAULT_IGNORE
from ..replay.normalize import Normalizer
from .stats import by_session

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


def _request(record: CallRecord, ignore: frozenset[str], normalizer: Normalizer | None) -> Any:
    """The request as replay matches it: without the top-level fields that
    change from run to run without changing the answer (stream, user, ...),
    and normalised as replay normalises it (unless `normalizer` is None)."""
    if record.request_raw is not None:
        request = record.request_raw
    elif isinstance(record.request, dict):
        request = {k: v for k, v in record.request.items() if k not in ignore}
    else:
        request = record.request
    if normalizer is None:
        return request
    rules = normalizer.rule_set(normalizer.preset_for(record.request_headers, compact_json(request)))
    raw = record.request_raw is not None
    return (rules.normalize(record.api, None, request) if raw else rules.normalize(record.api, request)).body


def _compare(a: CallRecord, b: CallRecord, ignore: frozenset[str], normalizer: Normalizer | None) -> Divergence | None:
    found = ("api", a.api, b.api) if a.api != b.api else first_difference(
        _request(a, ignore, normalizer), _request(b, ignore, normalizer))  # fmt: skip
    if found:
        return _divergence(a.index, "request", found)
    found = first_difference(_reply(a), _reply(b))
    return _divergence(a.index, "response", found) if found else None


def _session_diff(
    session: str, calls_a: list[CallRecord], calls_b: list[CallRecord], ignore: frozenset[str],
    normalizer: Normalizer | None,
) -> SessionDiff:
    a_by_index = {r.index: r for r in calls_a}
    b_by_index = {r.index: r for r in calls_b}
    result = SessionDiff(session, len(calls_a), len(calls_b), 0, None, 0)
    leading = True  # no difference and no missing call yet
    for index in sorted(a_by_index.keys() | b_by_index.keys()):
        a, b = a_by_index.get(index), b_by_index.get(index)
        divergence = _compare(a, b, ignore, normalizer) if a is not None and b is not None else None
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
    records_a: Iterable[CallRecord],
    records_b: Iterable[CallRecord],
    ignore: Iterable[str] = DEFAULT_IGNORE,
    normalizer: Normalizer | None = None,
) -> DiffResult:
    """Where two trajectories of the same task part, per session present in
    both: calls are paired by index; requests are compared without the
    `ignore`d top-level fields (replay's defaults) and, given a `normalizer`,
    after replay's normalisation (ids, dates, paths of the agent's preset);
    replies by status, completeness and what each choice said (message,
    finish reason)."""
    sessions_a, sessions_b = by_session(records_a), by_session(records_b)
    ignore = frozenset(ignore)
    return DiffResult(
        sessions=[
            _session_diff(name, sessions_a[name], sessions_b[name], ignore, normalizer)
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
