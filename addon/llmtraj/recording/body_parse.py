"""The record writer's parse of request bodies, per session, in time that grows
with what a body adds rather than with the conversation it repeats.

An agent's call repeats its conversation: the body's longest array (`messages`,
`input`, ...) begins with the very bytes of an earlier body of the session.
The items of that array that lie wholly within the bytes the two bodies share
are that body's items (the same bytes parse the same), so only the rest is
parsed: the body with those items cut out, `{..."messages": [` and what
follows them. Where the array's items end is found by a scan of the JSON
tokens that matter (strings, brackets, commas), over each body's new bytes
once (the first body of a session that is reused is scanned whole, once).
A body comes as its pieces (`capture.BodyPieces`): only what follows the items
reused is joined.

A body that repeats every item of the earlier one appends its own to that
body's list (and commas) in place rather than copying them: a call touches
only what it adds, not every item of a long conversation (each of which, out
of the cache once the proxy has streamed a long body past it, costs a miss).
Whoever holds such a list (an earlier `_Parsed`, the store's chain tips,
`core.chain.RequestChains`) reads only its own first items, which never
change: a list is only appended to while no one holds more of it, and a body
that keeps fewer items (an edit, a side conversation, a branch back to an
older body) gets a copy of them. A value `parse` returns is therefore whole
until the next `parse` of its session.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

from ..core.chain import shared_prefix
from .capture import BodyPieces, as_pieces
from .session_lru import SessionLRU

MIN_BODY = 32 << 10  # a body smaller than this, or sharing less with the earlier ones, is parsed whole (cheap)
BODIES_PER_SESSION = 4  # the main conversation and a few side conversations
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},:]')
_OPEN, _CLOSE, _COMMA, _QUOTE = b"[{", b"]}", ord(","), ord('"')
_BLANKS = b" \t\r\n"


@dataclass(slots=True, eq=False)
class _Parsed:
    """A body, its value, and where its longest array's items are. The
    array's list and `commas` may be shared with later bodies, which append
    to them: its own are the first `items` and the first `n_commas`."""

    body: BodyPieces
    value: dict[str, Any]
    key: str
    items: int  # its items of value[key]
    start: int = -1  # just after the array's `[`; -1: not scanned yet, -2: not to be reused (the key twice)
    commas: array | None = None  # the offsets of the commas between its items, in order
    n_commas: int = 0
    close: int = -1  # the offset of its `]`


class RequestBodies:
    """Parses request bodies as `from_json` does (the same value, or the same
    ValueError), reusing what the bodies of the same session held before (the
    sessions written to last, within a memory budget)."""

    def __init__(self, sessions: int = 128, budget: int = 256 << 20) -> None:
        self._bodies: SessionLRU[list[_Parsed]] = SessionLRU(sessions, budget)

    def parse(
        self, session: str, body: bytes | BodyPieces, repeats: tuple[BodyPieces, int] | None = None
    ) -> Any:
        """`repeats`: a body and the length of the prefix `body` shares with
        it, when known; if it is one of the earlier bodies, sharing enough,
        that one is reused and none is compared."""
        if len(body) < MIN_BODY:
            return from_json(bytes(body))
        body = as_pieces(body)
        kept = self._bodies.pop(session)
        earlier = kept[0] if kept is not None else []
        best, shared = None, 0
        if repeats is not None and repeats[1] >= MIN_BODY:
            best = next((parsed for parsed in earlier if parsed.body is repeats[0]), None)
            shared = repeats[1] if best is not None else 0
        if best is None:
            for parsed in earlier:
                if (n := shared_prefix(bytes(parsed.body), bytes(body))) > shared:
                    best, shared = parsed, n
        reused = _reuse(best, body, shared) if best is not None and shared >= MIN_BODY else None
        if reused is None:
            value = from_json(bytes(body))
            new = _whole(body, value) if isinstance(value, dict) else None
        else:
            new = reused
            value = reused.value
        if new is not None and new.key:
            if reused is not None:  # that conversation moved on to this body
                earlier = [e for e in earlier if e is not best]
            earlier.append(new)
            del earlier[: -BODIES_PER_SESSION]
        self._bodies.put(session, earlier, sum(len(e.body) for e in earlier))
        return value


def _longest_array(value: dict[str, Any]) -> str:
    """The key of the value's longest array ("" when it has none)."""
    arrays = [(len(v), k) for k, v in value.items() if isinstance(v, list)]
    return max(arrays)[1] if arrays else ""


def _whole(body: BodyPieces, value: dict[str, Any]) -> _Parsed:
    """A body parsed whole (its array scanned when it is reused)."""
    key = _longest_array(value)
    return _Parsed(body, value, key, len(value[key]) if key else 0)


def _extended(seq: list | array, own: int, more: list | array) -> list | array:
    """The first `own` items of `seq`, then `more`: `seq` itself, appended to,
    when it holds no more than those (whoever else holds it reads only its own
    first items, which stay as they are), else a copy."""
    if len(seq) != own:
        seq = seq[:own]
    seq.extend(more)
    return seq


def _reuse(earlier: _Parsed, body: BodyPieces, shared: int) -> _Parsed | None:
    """`body` parsed with the items of `earlier`'s array that lie within the
    `shared` bytes reused, and where its own items are; None when none can be.
    Of `body`, only what follows those items is read (`rest`, from `cut`)."""
    if earlier.start == -1 and not _scan(earlier):
        earlier.start = -2
    if earlier.start < 0:
        return None
    commas, n_commas, key = earlier.commas, earlier.n_commas, earlier.key
    more_commas: list[int] = []  # the commas after those kept
    if earlier.close < shared:  # the whole array is shared
        kept, kept_commas, cut = earlier.items, n_commas, earlier.close
        rest = body.tail(cut)
    else:
        kept = kept_commas = bisect_left(commas, shared, 0, n_commas)  # the commas before the first byte that differs
        if kept == n_commas and (comma := _comma_after_items(earlier, body, shared)) >= 0:
            kept = earlier.items  # the last item too: it ends within the shared bytes, and a comma follows it
            more_commas.append(comma)
        elif not kept:
            return None
        cut = (more_commas[0] if more_commas else commas[kept - 1]) + 1
        rest = body.tail(cut)
        if not (item := rest.lstrip(_BLANKS)) or item[0] == _CLOSE[0]:
            return None  # (a trailing comma: the body is not JSON; from_json says why)
    quoted = b'"' + key.encode() + b'"'
    if rest.find(quoted) >= 0 or _key_escapes(key).search(rest):
        return None  # the key may be there twice: the last one counts, and it may be what follows
    try:
        value = from_json(body.head(earlier.start) + rest)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get(key), list):
        return None
    close = earlier.close
    if close >= shared:
        new_commas: list[int] = []
        if (close := _items(rest, 0, new_commas)) < 0:
            return None
        more_commas += [comma + cut for comma in new_commas]
        close += cut
    # (appended to only now that the body is known to reuse them)
    value[key] = _extended(earlier.value[key], kept, value[key])
    if (longest := _longest_array(value)) != key:  # (the conversation outgrew the tools, say): scanned when reused
        return _whole(body, value)
    commas = _extended(commas, kept_commas, more_commas)
    return _Parsed(body, value, key, len(value[key]), earlier.start, commas, len(commas), close)


def _comma_after_items(parsed: _Parsed, body: BodyPieces, shared: int) -> int:
    """The offset of the comma in `body` that follows the last of `parsed`'s
    items, when that item lies within the first `shared` bytes (so it is the
    same item in both, a whole value there, followed by blanks and a comma
    here); -1 otherwise."""
    if not parsed.items:
        return -1
    end, at = parsed.close, parsed.body.at
    while at(end - 1) in _BLANKS:
        end -= 1
    if end > shared:
        return -1
    at, size = body.at, len(body)
    while end < size and at(end) in _BLANKS:
        end += 1
    return end if end < size and at(end) == _COMMA else -1


def _scan(parsed: _Parsed) -> bool:
    """Finds where the array of `parsed.key` is in its (valid JSON) body and
    where its items end; False if the key is there more than once, or not as
    a key of the top level."""
    body, key = bytes(parsed.body), parsed.key
    depth, expect_key, found, at = 0, False, False, 0
    while (token := _TOKEN.search(body, at)) is not None:
        c, at = body[token.start()], token.end()
        if c == _QUOTE:
            if depth == 1 and expect_key and from_json(token.group()) == key:  # (a key: short)
                if found:
                    return False
                found = True
                colon = _TOKEN.search(body, at)
                value = _TOKEN.search(body, colon.end()) if colon is not None else None
                if value is None or colon.group() != b":" or value.group() != b"[":
                    return False
                parsed.start, parsed.commas = value.end(), array("q")
                parsed.close = _items(body, value.end(), parsed.commas)
                if parsed.close < 0:
                    return False
                parsed.n_commas = len(parsed.commas)
                at = parsed.close + 1
            expect_key = False
        elif c in _OPEN:
            depth += 1
            expect_key = c == _OPEN[1] and depth == 1
        elif c in _CLOSE:
            depth -= 1
        elif c == _COMMA:
            expect_key = depth == 1
    return found


def _items(body: bytes, at: int, commas: list[int] | array) -> int:
    """Scans an array's items from `at` (at an item's start), adding the
    offsets of the commas between them to `commas`; the offset of its `]`,
    or -1 if it has none."""
    depth = 0
    for token in _TOKEN.finditer(body, at):
        c = body[token.start()]
        if c == _COMMA:
            if not depth:
                commas.append(token.start())
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            if not depth:
                return token.start()
            depth -= 1
    return -1


_ESCAPES: dict[str, re.Pattern[bytes]] = {}


def _key_escapes(key: str) -> re.Pattern[bytes]:
    """What finds an escape that spells a character of `key` (a `\\u0061` for
    an `a`): the key written another way."""
    pattern = _ESCAPES.get(key)
    if pattern is None:
        spelled = sorted({f"{ord(c):04x}" for c in key})
        pattern = _ESCAPES[key] = re.compile(rb"\\u(?:" + "|".join(spelled).encode() + rb")", re.IGNORECASE)
    return pattern
