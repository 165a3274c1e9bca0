"""The secret-field scan of request bodies in the record writer, per session.

An agent sends its whole conversation with every call, so the body of a call
mostly repeats the one before it. When that one held no secret-named field,
the part the new body repeats holds none either (the same bytes): only what
follows is scanned, and the writer's CPU per call does not grow with the
conversation."""

from __future__ import annotations

from ..core.chain import shared_prefix
from ..core.redact import may_have_secret_fields
from .capture import BodyPieces, as_pieces
from .session_lru import SessionLRU

_KEY_REACH = 66  # a quote, up to 64 characters of a key's name, a quote (then blanks, then its colon)
_BLANKS = b" \t\r\n"


class SecretFieldScan:
    """Remembers the last body of each session that held no secret-named field
    (the sessions written to last, within a memory budget)."""

    def __init__(self, sessions: int = 128, budget: int = 256 << 20) -> None:
        self._clean: SessionLRU[BodyPieces] = SessionLRU(sessions, budget)

    def may_have_secret_fields(
        self, session: str, body: bytes | BodyPieces, repeats: tuple[BodyPieces, int] | None = None
    ) -> bool:
        """As `core.redact.may_have_secret_fields(body)`, scanning only what
        follows the part of `body` that repeats the session's previous body
        (`repeats`: a body and the length of the prefix `body` shares with
        it, when known: not compared again, and the body not joined)."""
        body = as_pieces(body)
        kept = self._clean.pop(session)
        start = 0
        if kept is not None:
            previous = kept[0]
            known = repeats is not None and repeats[0] is previous
            start = scan_start(body, repeats[1] if known else shared_prefix(bytes(previous), bytes(body)))
        found = may_have_secret_fields(body.tail(start))
        if not found:
            self._clean.put(session, body, len(body))
        return found


def scan_start(body: bytes | BodyPieces, repeated: int) -> int:
    """Where to scan `body` when its first `repeated` bytes repeat a body with
    no secret-named key: far enough back that a key whose colon comes after
    them is seen whole (a key ending before them was in the other body)."""
    start = repeated
    at = as_pieces(body).at
    while start > 0 and at(start - 1) in _BLANKS:
        start -= 1
    return max(0, start - _KEY_REACH)
