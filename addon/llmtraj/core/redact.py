"""Keeps secrets out of trajectories: secret headers and body fields are
replaced by a marker, and the values of secret headers are scrubbed from
anything else the record holds."""

from __future__ import annotations

import functools
import re
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_HEADER = re.compile(
    # `token(?!s)`: `x-auth-token` is a secret, `x-ratelimit-remaining-tokens` is not
    r"authorization|api[-_]?key|secret|token(?!s)|password|cookie|credential|signature|session-key",
    re.IGNORECASE,
)
# Whole-name matches only: `max_tokens`, `token` (a logprob entry) and the like must survive.
_SECRET_NAME = (
    r"(?:[a-z0-9]+[-_])*(?:api[-_]?key|apikey|secret|client[-_]?secret|password|passwd"
    r"|access[-_]?token|refresh[-_]?token|auth[-_]?token|id[-_]?token|bearer[-_]?token"
    r"|authorization|credentials?|private[-_]?key)"
)
_SECRET_FIELD = re.compile(_SECRET_NAME, re.IGNORECASE)
# JSON object keys in a raw body (a quote inside a string is escaped, so text
# that merely looks like a key does not match). Checking the keys spares most
# bodies a walk over every message of a long conversation; an alternation of
# the secret names searched with `re` directly is ~50x slower on a 200 KB body.
_JSON_KEY = re.compile(rb'"([A-Za-z0-9_.\-]{1,64})"\s*:')
_MIN_SCRUB_LEN = 8  # shorter values would scrub ordinary words


@functools.lru_cache(maxsize=1024)  # header names repeat on every call
def is_secret_header(name: str) -> bool:
    return bool(_SECRET_HEADER.search(name))


@functools.lru_cache(maxsize=4096)  # key names repeat on every call
def _is_secret_key(name: bytes) -> bool:
    return _SECRET_FIELD.fullmatch(name.decode("ascii")) is not None


def may_have_secret_fields(body: bytes) -> bool:
    return any(_is_secret_key(name) for name in _JSON_KEY.findall(body))


def redact_headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[str]]:
    """Headers with secret values replaced, and the secret values themselves
    (a bearer token also without its scheme) for `scrub`."""
    out: list[tuple[str, str]] = []
    secrets: set[str] = set()
    for name, value in headers:
        if is_secret_header(name):
            out.append((name, REDACTED))
            for candidate in (value.strip(), value.strip().partition(" ")[2].strip()):
                if len(candidate) >= _MIN_SCRUB_LEN:
                    secrets.add(candidate)
        else:
            out.append((name, value))
    return out, secrets


def redact_fields(value: Any, secrets: set[str] | None = None) -> Any:
    """A copy of a JSON value with secret-named fields replaced, at any depth.
    The replaced string values are added to `secrets` for `scrub`."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and _SECRET_FIELD.fullmatch(k) and v not in (None, ""):
                out[k] = REDACTED
                if secrets is not None and isinstance(v, str) and len(v) >= _MIN_SCRUB_LEN:
                    secrets.add(v)
            else:
                out[k] = redact_fields(v, secrets)
        return out
    if isinstance(value, list):
        return [redact_fields(v, secrets) for v in value]
    return value


def scrub(text: str, secrets: set[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
