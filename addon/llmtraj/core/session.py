"""Which session a call belongs to: a `/s/<session>/` path prefix on the base URL,
else the `x-llm-traj-session` header, else the configured default."""

from __future__ import annotations

import re

SESSION_HEADER = "x-llm-traj-session"
_PREFIX = re.compile(r"^/s/([^/?#]*)(?=[/?#]|$)")
# No path separators, no leading dot: a session id can never leave the trajectory directory.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidSession(ValueError):
    pass


def validate_session(session: str) -> str:
    if not _SESSION_ID.fullmatch(session):
        raise InvalidSession(
            f"invalid session id {session[:80]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return session


def split_session_prefix(path: str) -> tuple[str | None, str]:
    """(`session`, path without the prefix) for `/s/<session>/...`, else (None, path)."""
    m = _PREFIX.match(path)
    if m is None:
        return None, path
    rest = path[m.end() :]
    return m.group(1), rest if rest.startswith("/") else "/" + rest
