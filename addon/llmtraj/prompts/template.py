"""A prompt's text with `{{variable}}` placeholders: parsing, rendering, and the
pattern that recognises a filled-in copy (the placeholders as wildcards)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Template:
    """`pieces` alternate literal text and variable names: literal, name, literal, ..., literal."""

    pieces: tuple[str, ...]

    @property
    def variables(self) -> tuple[str, ...]:
        return self.pieces[1::2]

    @property
    def prefix(self) -> str:
        return self.pieces[0]

    @property
    def suffix(self) -> str:
        return self.pieces[-1]

    def render(self, values: dict[str, str]) -> str:
        """The text with each placeholder filled; a variable without a value keeps its placeholder."""
        return "".join(
            piece if i % 2 == 0 else values.get(piece, "{{" + piece + "}}") for i, piece in enumerate(self.pieces)
        )

    def groups(self) -> tuple[tuple[str, str], ...]:
        """(variable, its group in `pattern`) for each variable once."""
        return tuple((name, _group(name)) for name in dict.fromkeys(self.variables))

    def pattern(self) -> re.Pattern[str]:
        """Matches a filled-in copy of the whole text, capturing each variable (a
        repeated variable must repeat its value)."""
        parts, seen = [], set()
        for i, piece in enumerate(self.pieces):
            if i % 2 == 0:
                parts.append(re.escape(piece))
            elif piece in seen:
                parts.append(f"(?P={_group(piece)})")
            else:
                seen.add(piece)
                parts.append(f"(?P<{_group(piece)}>.*?)")
        return re.compile("".join(parts), re.DOTALL)


def _group(name: str) -> str:
    return "v_" + re.sub(r"[^A-Za-z0-9_]", lambda m: f"_{ord(m.group()):x}_", name)


def parse_template(text: str) -> Template:
    """The text's pieces; TemplateError (one line) for a placeholder that does not parse."""
    pieces: list[str] = []
    at = 0
    for m in _PLACEHOLDER.finditer(text):
        name = m.group(1)
        if not _NAME.fullmatch(name):
            raise TemplateError(f"placeholder {m.group()!r} at character {m.start()}: a name is letters, digits, _ . -")
        literal = text[at : m.start()]
        if pieces and not literal:
            raise TemplateError(
                f"placeholders {{{{{pieces[-1]}}}}} and {{{{{name}}}}} touch at character {m.start()}: "
                "put text between them, or matching cannot tell where one ends"
            )
        _check_braces(literal, at)
        pieces += [literal, name]
        at = m.end()
    _check_braces(text[at:], at)
    pieces.append(text[at:])
    return Template(tuple(pieces))


def _check_braces(literal: str, offset: int) -> None:
    for token in ("{{", "}}"):
        if (i := literal.find(token)) >= 0:
            raise TemplateError(f"unbalanced {token!r} at character {offset + i}: placeholders are {{{{name}}}}")
