"""Requests stored as a chain (schema_version 2): a call's request that repeats
much of an earlier call of its session is written as a reference to that call
plus what is new, so a session's file grows with its conversation, not with the
square of it.

On the line, `request_base` is `{"index": k, "same": [keys], "prefix": {key: n}}`
and `request` holds every key of the request in its order: a key in `same` has
call k's value (written as null), a key in `prefix` is the first n items of call
k's list followed by the items written here, any other key is as written. Call k
is an earlier line of the same session in the same file (the writer only refers
to lines it wrote through the file it still has open), so a line never depends
on a later one and a torn last line loses only its own call.

A streamed call's events repeat most of their bytes from one to the next (the
id, model and framing around a few characters of delta), so a version 2 event
may carry `p` and `s`: its `raw` is then only the middle, between the first p
and the last s characters of the previous event's raw in the same line.

Most events of a long stream are one event with other values in a few places
(its text, a counter, a random padding): the writer's event template
(`recording.event_template`) finds those places. An event whose values were
found so carries `slots`, their places in its raw (`[[start, end], ...]`), and
each event after it that differs only there is `{"t": ..., "v": [values]}`:
its raw is that event's with the characters of each slot replaced by the value
(as written in the raw, escapes and all).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from itertools import chain as chained
from typing import Any

_ABSENT = object()
# A short string costs more as a reference ("key" in `same` plus a null) than written out.
_MIN_SAME_STRING = 64
TIPS_PER_SESSION = 8  # the main conversation and a few side conversations (titles, summaries, subagents)
SESSIONS_PER_FILE = 128  # a single file of many sessions: those written to last (another starts a fresh chain)
RESOLVED_PER_SESSION = 16  # resolved requests a reader keeps; older ones are rebuilt from the chain


def _common_prefix(new: list, old: list, old_length: int) -> int:
    """How many first items `new` shares with the first `old_length` of `old`."""
    if new is old and old_length <= len(new):  # a list appended to since (`recording.body_parse`): nothing to compare
        return old_length
    n = min(len(new), old_length)
    if new[:n] == old[:n]:  # the usual case, compared in C
        return n
    i = 0
    while new[i] == old[i]:
        i += 1
    return i


def _list_lengths(request: dict[str, Any]) -> dict[str, int]:
    """The lengths of a request's lists, which are what a chain tip holds of them."""
    return {key: len(value) for key, value in request.items() if isinstance(value, list)}


def delta(
    request: dict[str, Any], base: dict[str, Any], lengths: dict[str, int] | None = None
) -> tuple[int, dict[str, Any], list[str], dict[str, int]]:
    """(items reused, the request as stored, `same`, `prefix`) of `request`
    against `base`, of whose lists only the first `lengths` items are its own
    (the lists may have grown since: see `RequestChains`)."""
    stored: dict[str, Any] = {}
    same: list[str] = []
    prefix: dict[str, int] = {}
    reused = 0
    for key, value in request.items():
        old = base.get(key, _ABSENT)
        if isinstance(value, list) and isinstance(old, list):
            old_length = len(old) if lengths is None else lengths[key]
            n = _common_prefix(value, old, old_length)
            if n == len(value) == old_length and n:
                same.append(key)
                stored[key] = None
            elif n:
                prefix[key] = n
                stored[key] = value[n:]
            else:
                stored[key] = value
            reused += n
        elif (
            isinstance(value, dict) or (isinstance(value, str) and len(value) >= _MIN_SAME_STRING)
        ) and value == old:
            same.append(key)
            stored[key] = None
            reused += 1
        else:
            stored[key] = value
    return reused, stored, same, prefix


class RequestChains:
    """The writer's side, for one file: per session, the requests of its chain
    tips (the calls most recently written that no later call extended), each
    with the lengths its lists had then. A later request may hold the very
    list of a tip, appended to (the body parse extends a conversation's list
    in place): the tip's items are its first ones, found without comparing
    them; a list is never changed but by appending."""

    def __init__(self, identity: tuple[int, int]) -> None:
        self.identity = identity  # (st_dev, st_ino) of the file the tips were written to
        self.end = 0  # the file was at least this long after our last line: shorter means truncated
        self._tips: OrderedDict[str, OrderedDict[int, tuple[dict[str, Any], dict[str, int]]]] = OrderedDict()

    def encode(self, session: str, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(request as stored, `request_base` or None) against the tip it shares most with."""
        best: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        for index, (tip, lengths) in reversed(self._tips.get(session, {}).items()):
            reused, stored, same, prefix = delta(request, tip, lengths)
            if reused and (best is None or reused > best[0]):
                best = (reused, stored, {"index": index, "same": same, "prefix": prefix})
        if best is None:
            return request, None
        return best[1], best[2]

    def written(self, session: str, index: int, request: dict[str, Any], base: int | None) -> None:
        tips = self._tips.setdefault(session, OrderedDict())
        self._tips.move_to_end(session)
        if len(self._tips) > SESSIONS_PER_FILE:
            self._tips.popitem(last=False)
        if base is not None:
            tips.pop(base, None)  # that conversation moved on to this call
        tips[index] = (request, _list_lengths(request))
        if len(tips) > TIPS_PER_SESSION:
            tips.popitem(last=False)


class SessionRequests:
    """The reader's side, for one session of one file: what each version 2 line
    added to the chain, and the last few requests resolved whole."""

    def __init__(self) -> None:
        self._nodes: dict[int, tuple[int | None, frozenset[str], dict[str, int], dict[str, Any]]] = {}
        self._resolved: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._twice: set[int] = set()  # indexes on more than one line: not referable

    def add(self, index: int, request: Any, base: Any) -> Any:
        """The whole request of the line of call `index` (which may refer to an
        earlier one); ValueError for a reference that cannot be followed."""
        if base is not None and not (
            isinstance(base, dict) and isinstance(request, dict) and isinstance(base.get("index"), int)
        ):
            raise ValueError("request_base: not a reference to an earlier call")
        # Two writers numbering the same session in one file put an index on
        # two lines: a reference to it could mean either, so it is refused.
        twice = index in self._nodes or index in self._twice
        self._resolved.pop(index, None)
        if isinstance(request, dict):
            self._nodes[index] = (
                (None, frozenset(), {}, request) if base is None
                else (base["index"], frozenset(base.get("same", ())), dict(base.get("prefix", {})), request)
            )  # fmt: skip
        try:
            return request if base is None else self.resolve(index)
        finally:
            if twice:
                self._twice.add(index)
                self._nodes.pop(index, None)
                self._resolved.pop(index, None)

    def resolve(self, index: int) -> dict[str, Any]:
        chain = []
        current: int | None = index
        whole = None
        while current is not None and (whole := self._resolved.get(current)) is None:
            node = self._nodes.get(current)
            if node is None:
                why = "is on two lines" if current in self._twice else "is not an earlier line"
                raise ValueError(f"request_base: call {current} {why} of this session in this file")
            chain.append((current, node))
            current = node[0]
        for at, (_, same, prefix, stored) in reversed(chain):
            whole = stored if whole is None else _apply(whole, same, prefix, stored)
            self._remember(at, whole)
        return whole

    def _remember(self, index: int, request: dict[str, Any]) -> None:
        self._resolved[index] = request
        self._resolved.move_to_end(index)
        if len(self._resolved) > RESOLVED_PER_SESSION:
            self._resolved.popitem(last=False)


def _apply(base: dict[str, Any], same: frozenset[str], prefix: dict[str, int], stored: dict[str, Any]) -> dict[str, Any]:
    whole = {}
    try:
        for key, value in stored.items():
            if key in same:
                whole[key] = base[key]
            elif key in prefix:
                items = base[key]
                if not isinstance(items, list) or len(items) < prefix[key] or not isinstance(value, list):
                    raise ValueError(f"request_base: prefix {key}: {prefix[key]} items of the base do not fit")
                whole[key] = items[: prefix[key]] + value
            else:
                whole[key] = value
    except KeyError as exc:
        raise ValueError(f"request_base: the base has no {exc.args[0]!r}") from None
    return whole


def _shared_prefix(a: str, b: str, limit: int, guess: int = 0) -> int:
    """The length of the common prefix of a and b, at most `limit` (each step
    one comparison in C, not a loop over characters). `guess`, the answer for
    the previous pair of a stream's events (which mostly differ only in their
    delta), is tried first, then lengths ever further from it (a delta that
    shares its first characters with the one before moves the answer by a
    few), then the rest is bisected."""
    lo, hi = 0, limit  # a[:lo] == b[:lo], and the answer is at most hi
    if 0 < guess <= limit:
        if a.startswith(b[:guess]):
            lo, step = guess, 1
            while lo < hi:
                end = min(lo + step, hi)
                if a[lo:end] != b[lo:end]:
                    hi = end - 1
                    break
                lo, step = end, step * 2
        else:
            hi, step = guess - 1, 1
            while lo < hi:
                at = max(hi - step, lo)
                if a.startswith(b[:at]):
                    lo = at
                    break
                hi, step = at - 1, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shared_suffix(a: str, b: str, limit: int, guess: int = 0) -> int:
    """The length of the common suffix, as `_shared_prefix` finds the prefix's."""
    n, m = len(a), len(b)
    lo, hi = 0, limit
    if 0 < guess <= limit:
        if a.endswith(b[m - guess :]):
            lo, step = guess, 1
            while lo < hi:
                end = min(lo + step, hi)
                if a[n - end : n - lo] != b[m - end : m - lo]:
                    hi = end - 1
                    break
                lo, step = end, step * 2
        else:
            hi, step = guess - 1, 1
            while lo < hi:
                at = max(hi - step, lo)
                if a.endswith(b[m - at :]):
                    lo = at
                    break
                hi, step = at - 1, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[n - mid : n - lo] == b[m - mid : m - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


_MIN_SHARED = 8  # below this, `"p":..,"s":..` costs more than it saves


def encode_events(
    events: list[dict[str, Any]], near: list[str] | None = None, starts: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Events as stored: each raw that shares enough with the previous one as `p`, `s` and its middle; an
    event of a template (`v`, after the event with `slots` it follows) as its values alone.
    `near`, if given, gets what each raw adds to the one before it, with enough to either side for any of
    `starts` that overlaps it (all of a raw stored whole), for the search for credential shapes by their
    starts (`store._events_may_hold`)."""
    out = []
    append = out.append
    keep = near.append if near is not None else None
    reach = max(map(len, starts)) - 1 if starts else 0
    previous = head = tail = ""
    p = s = m = 0
    in_template = False  # the last event had `slots` or was stored as values
    around: list[str] | None = None  # (with `near`) the template's text around its slots, within reach of them
    for event in events:
        raw = event["raw"]
        n = len(raw)
        if in_template and "v" in event:
            values = event["v"]
            append({"t": event["t"], "v": values})
            if around is not None:  # each value between the template's text around it, as in the raw
                keep(_interleaved(around, values))
            elif near is not None:  # no start can run across a value's edge: the values alone
                near += values
            previous, m = raw, n
            p = s = 0  # (the previous pair's lengths are of other raws)
            continue
        in_template = "slots" in event
        if in_template and keep is not None:
            around = _around_slots(raw, event["slots"], reach)
            if _edges_clean(around, starts):
                around = None
        limit = n if n < m else m
        # The previous pair's p and s first, without a call: most events differ from the one before in their
        # delta alone (and then share the very `head` and `tail` strings the previous pair did), or their
        # deltas share one character more or less (a token's leading space).
        if 0 < p <= limit and raw.startswith(head):
            if p < limit and raw[p] == previous[p]:
                if p + 1 == limit or raw[p + 1] != previous[p + 1]:
                    p += 1
                else:
                    p = _shared_prefix(raw, previous, limit, p)
                head = raw[:p]
        elif 1 < p <= limit and raw.startswith(head[:-1]):
            p -= 1
            head = head[:-1]
        else:
            p = _shared_prefix(raw, previous, limit, p)
            head = raw[:p]
        rest = limit - p
        if not (0 < s <= rest and raw.endswith(tail) and (s == rest or raw[n - s - 1] != previous[m - s - 1])):
            s = _shared_suffix(raw, previous, rest, s)
            tail = raw[n - s :]
        stored = {k: v for k, v in event.items() if k != "v"} if "v" in event else event  # (a value without its template)
        if p + s >= _MIN_SHARED:
            append({**stored, "raw": raw[p : n - s], "p": p, "s": s})  # (its raw_base64 and slots too, if any)
            if keep is not None:
                keep(raw[p - reach if p > reach else 0 : n - s + reach])
        else:
            append(stored)
            if keep is not None:
                keep(raw)
        previous, m = raw, n
    return out


def _interleaved(pieces: list[str], values: list[str]) -> str:
    """The pieces with a value between each two."""
    return "".join(chained.from_iterable(zip(pieces, values))) + pieces[-1]


@functools.lru_cache(maxsize=4)
def _edge_characters(starts: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(the last characters of the starts' first parts, the first characters of their last parts), of
    every way to cut a start in two."""
    return (frozenset(start[i] for start in starts for i in range(len(start) - 1)),
            frozenset(start[i] for start in starts for i in range(1, len(start))))  # fmt: skip


def _edges_clean(around: list[str], starts: tuple[str, ...]) -> bool:
    """Whether no start can run across a slot's edge: the template's text before each slot ends, and
    the text after it begins, with a character no start has there (none of it empty)."""
    ends, begins = _edge_characters(starts)
    return all(text and text[-1] not in ends for text in around[:-1]) and all(
        text and text[0] not in begins for text in around[1:]
    )


def _around_slots(raw: str, slots: list[list[int]], reach: int) -> list[str]:
    """The text of `raw` before, between and after its slots, within `reach` of a slot (the middle of a
    long stretch left out, a line feed in its place: no credential shape's start has one)."""
    text_starts = [0, *(end for _, end in slots)]
    text_ends = [*(start for start, _ in slots), len(raw)]
    around = []
    for i, (a, b) in enumerate(zip(text_starts, text_ends)):
        left = reach if i else 0  # (nothing before the first slot's text reaches back past the raw's start)
        right = reach if i < len(slots) else 0
        if b - a <= left + right:
            around.append(raw[a:b])
        else:
            around.append(raw[a : a + left] + "\n" + raw[b - right : b])
    return around


def decode_events(events: Any) -> Any:
    """Every event's raw whole again; ValueError if a reference does not fit."""
    if not isinstance(events, list):
        return events
    out = []
    previous = ""
    pieces: list[str] | None = None  # the raw of the last event with `slots` around them, while its values follow
    for event in events:
        if isinstance(event, dict) and "v" in event:
            values = event["v"]
            if pieces is None or not isinstance(values, list) or len(values) != len(pieces) - 1 \
                    or not all(isinstance(value, str) for value in values):  # fmt: skip
                raise ValueError("events: values that follow no event with as many slots")
            event = {key: value for key, value in event.items() if key != "v"}
            event["raw"] = _interleaved(pieces, values)
        else:
            pieces = None
            if isinstance(event, dict) and "p" in event:
                p, s, middle = event.get("p"), event.get("s"), event.get("raw")
                if not (isinstance(p, int) and isinstance(s, int) and isinstance(middle, str)
                        and 0 <= p and 0 <= s and p + s <= len(previous)):  # fmt: skip
                    raise ValueError("events: a reference to the previous event that does not fit")
                event = {**event, "raw": previous[:p] + middle + previous[len(previous) - s :]}
                del event["p"], event["s"]
            if isinstance(event, dict) and "slots" in event:
                event = dict(event)
                pieces = _cut_at(event.get("raw"), event.pop("slots"))
        out.append(event)
        previous = event.get("raw") if isinstance(event, dict) and isinstance(event.get("raw"), str) else ""
    return out


def _cut_at(raw: Any, slots: Any) -> list[str]:
    """`raw` cut at its `slots`: the text before, between and after them."""
    if not isinstance(raw, str) or not isinstance(slots, list) or not slots:
        raise ValueError("events: slots of an event without a raw, or no slots")
    pieces, end = [], 0
    for slot in slots:
        if not (isinstance(slot, list) and len(slot) == 2 and all(type(x) is int for x in slot)
                and end <= slot[0] <= slot[1] <= len(raw)):  # fmt: skip
            raise ValueError("events: slots that are not places in order in their raw")
        pieces.append(raw[end : slot[0]])
        end = slot[1]
    pieces.append(raw[end:])
    return pieces


def shared_prefix(a: bytes, b: bytes) -> int:
    """The length of the common prefix of two byte strings (a request body and
    the one before it), found by bisection: each step one comparison in C of
    a slice of `a` in place (a memoryview, not a copy) with `b`."""
    view = memoryview(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(view[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo
