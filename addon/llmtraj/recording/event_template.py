"""An event of a stream as a template of the ones after it (issue 19): most
events of a long stream repeat the one before them but for their text (and a
counter, and a random padding), so an event that matches the template is folded
in as the text it adds, without parsing its JSON.

A template is made of an event whose aggregator says which of its strings is
text it would append (`StreamAggregator.text_slot`) and which other fields it
ignores: the event's raw cut at those values into literal pieces and slots. It
is proven on the event itself before use: the raw with other values put in its
slots parses to the event's value with those values at their places, so any raw
of the same pieces around valid JSON values of the same kinds parses to the
event's value with the new values there (a JSON string's or integer's bytes
never change how what is around them parses), and folding it in is appending
its text. Anything else goes the general way (parsed, folded in whole).

The places of the slots in the template's raw and each folded event's values
are also what the record stores of those events (`core.chain.encode_events`):
the template's event with its `slots`, each event that followed it as its
values (`v`), as they are written in its raw."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from pydantic_core import from_json

Path = tuple[str | int, ...]  # where a value is in an event's JSON value

# The body of a JSON string (what is between its quotes), and an integer.
_STRING_BODY = re.compile(r'[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*')
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_TEXT = "text"  # the kind of the text slot among `str` and `int` (ignored values)
_NEEDS_QUOTING = re.compile(r'["\\\x00-\x1f]')


def _at(value: Any, path: Path) -> Any:
    for key in path:
        value = value[key]
    return value


def _replaced(value: Any, path: Path, new: Any) -> Any:
    """`value` with `new` at `path` (copied along the path only)."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[key] = _replaced(value[key], rest, new)
    return copy


@functools.lru_cache(maxsize=64)
def _key(key: str) -> re.Pattern[str]:
    """An object key `key` (written without escapes) and the colon after it."""
    return re.compile('"%s"[ \t\n\r]*:[ \t\n\r]*' % re.escape(key))


def _span(raw: str, start: int, key: str | int, value: str | int) -> tuple[int, int] | None:
    """Where `value` (a string, written with escapes or not, or an integer) is in `raw` after `start` as the
    value of object key `key` (a string's body: between its quotes), if it is there exactly once."""
    if not isinstance(key, str) or _NEEDS_QUOTING.search(key):
        return None
    found = None
    for written in _key(key).finditer(raw, start):
        at, span = written.end(), None
        if type(value) is int:
            if (number := _INTEGER.match(raw, at)) is not None and int(number.group()) == value:
                span = number.span()
        elif raw.startswith('"', at) and (text := _text(raw, at + 1)) is not None and text[0] == value:
            span = (at + 1, text[1]) if raw.startswith('"', text[1]) else None
        if span is not None:
            if found is not None:
                return None
            found = span
    return found


class EventTemplate:
    """Raws made of `pieces` with a value in each slot between them: the text slot's string is appended
    (`append`), the other slots' values are ignored."""

    __slots__ = ("pieces", "steps", "append", "slots")

    def __init__(self, pieces: list[str], kinds: list[Any], append: Callable[[str], None], slots: list[list[int]]) -> None:
        self.pieces, self.append, self.slots = pieces, append, slots  # slots: their places in the template's raw
        self.steps = list(zip(kinds, pieces[1:]))  # each slot's kind (str, int or _TEXT) and the piece after it

    @classmethod
    def of(
        cls, raw: str, value: Any, text: Path, ignored: tuple[Path, ...], append: Callable[[str], None]
    ) -> EventTemplate | None:
        """The template of an event (`raw`, its data parsed as `value`) whose string at `text` the next
        events append by `append`, and whose values at `ignored` (strings and integers) they may change
        without effect; None when the raw does not lend itself to one (a value not found once as its key's)
        or the proof fails."""
        start = raw.index("\n") + 7 if raw.startswith("event: ") else 6  # the data (after `data: `)
        slots: list[tuple[int, int, type, Path]] = []
        for path in (text, *ignored):
            try:
                found = _at(value, path)
            except (KeyError, IndexError, TypeError):
                if path is text:
                    return None
                continue  # an ignored field this event does not have
            if not (type(found) is str or (type(found) is int and path is not text)):
                return None
            span = _span(raw, start, path[-1], found)
            if span is None:
                return None
            slots.append((*span, type(found), path))
        slots.sort()
        pieces, kinds, proof, expected = [], [], [], value
        end = 0
        for position, (a, b, kind, path) in enumerate(slots):
            if a < end:
                return None
            pieces.append(raw[end:a])
            kinds.append(_TEXT if path is text else kind)
            other = f"\x01llm-traj {position}" if kind is str else 7_000_000_000 + position
            proof += [raw[end:a], "\\u0001llm-traj %d" % position if kind is str else str(other)]
            expected = _replaced(expected, path, other)
            end = b
        pieces.append(raw[end:])
        proof.append(raw[end:-2])  # (the raw ends with its blank line)
        try:
            if from_json("".join(proof)[start:]) != expected:
                return None
        except ValueError:
            return None
        return cls(pieces, kinds, append, [[a, b] for a, b, _, _ in slots])

    def take(self, raws: list[str], start: int, events: list[dict[str, Any]] | None = None) -> int:
        """Folds in the texts of the blocks of `raws` from `start` on while they are of this template: the
        index of the first that is not (`len(raws)` if all are). Each such block's event in `events` (if
        given, as `raws`) gets its values, as written in the raw (`v`, a tuple)."""
        first, steps, append = self.pieces[0], self.steps, self.append
        for index in range(start, len(raws)):
            raw = raws[index]
            if not raw.startswith(first):
                return index
            at = len(first)
            text = None
            values = []
            for kind, piece in steps:
                # each slot's end found in C (the next quote, the integer's last digit), its value checked after
                if kind is int:
                    if (found := _INTEGER.match(raw, at)) is None or not raw.startswith(piece, end := found.end()):
                        return index
                    value = found.group()
                else:
                    end = raw.find('"', at)
                    value = raw[at:end]
                    if "\\" in value or not value.isprintable():  # escapes, or characters JSON must escape
                        if kind is not _TEXT or (decoded := _text(raw, at)) is None:
                            return index
                        text, end = decoded
                        value = raw[at:end]
                    elif kind is _TEXT:
                        text = value
                    if not raw.startswith(piece, end):
                        return index
                values.append(value)
                at = end + len(piece)
            if at != len(raw):
                return index
            append(text)
            if events is not None:
                # a tuple: of strings alone, the collector stops tracking it (and then its event) at its first
                # pass, where 20,000 lists it walks on every full pass cost a long stream's writer 1 µs an event
                events[index]["v"] = tuple(values)
        return len(raws)


def _text(raw: str, at: int) -> tuple[str, int] | None:
    """The string whose body starts at `at` in `raw` (decoded), and where its body ends; None if it is not
    one JSON reads."""
    found = _STRING_BODY.match(raw, at)
    value = found.group()
    if "\\" in value:
        try:
            value = from_json(f'"{value}"')
        except ValueError:  # an escape that is not JSON's: the general way reports it
            return None
    return value, found.end()
