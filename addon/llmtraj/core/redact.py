"""Keeps secrets out of trajectories: secret headers and body fields are
replaced by a marker, and the values of secret headers, and strings shaped like
credentials (`sk-...`, `Bearer ...`, `AIza...`), are scrubbed from anything else
the record holds.

Scrubbing works on values, never on serialised text: a string value is
rewritten, a key, a number or the JSON around it never is, so a record stays
valid JSON with the same keys and types whatever the secret (a common word,
JSON punctuation, a field name)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from pydantic_core import to_json

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


def looks_like_credential(value: str) -> bool:
    """Whether a secret header's value is worth hunting for in the rest of the
    record: a key has digits or is long. A short word (`Bearer assistant`) is
    redacted in its header only; scrubbing it everywhere would rewrite every
    `"role": "assistant"`."""
    return (
        len(value) >= _MIN_SCRUB_LEN and value.isascii() and value.isprintable()
        and (len(value) >= 20 or any(c.isdigit() for c in value))
    )  # fmt: skip


# In JSON from elsewhere, an escape that spells a printable ASCII character
# (what secrets and shapes are made of) where `to_json` would write it as is.
_ESCAPED_ASCII = re.compile(rb"\\u00[2-7][0-9a-fA-F]|\\/")


# Credential shapes scrubbed wherever they occur, whatever the headers said:
# provider keys, and bearer tokens written out in text. Each needs a digit (real
# keys have them; hyphenated words do not).
_TOKEN = r"(?=[A-Za-z_-]*[0-9])"
_SHAPE_SOURCE = (
    r"(?<![A-Za-z0-9_-])(?:sk-" + _TOKEN + r"[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}|AKIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}|hf_" + _TOKEN + r"[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,})"
    r"|(?<![A-Za-z0-9])(?:[Bb]earer|BEARER) +((?=[A-Za-z._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{16,})"
)
_SHAPES = re.compile(_SHAPE_SOURCE)
# In serialised JSON a character before a shape may be escaped (`\nsk-...`):
# searched there without the lookbehinds, so that it finds at least as much.
_SHAPES_BYTES = re.compile(re.sub(r"\(\?<!\[A-Za-z0-9_?-?\]\)", "", _SHAPE_SOURCE).encode())
# Every shape starts with one of these: a text without any is not searched.
SHAPE_STARTS = ("sk-", "AIza", "AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "hf_", "xox", "earer ", "EARER ")
# The same starts as searches that begin with a literal (`re` finds their first
# character as `memchr` does): 7 passes over a text instead of 12 (`in`), each
# about twice as fast.
_SHAPE_STARTS_SOURCE = ("sk-", "A(?:Iza|KIA)", "gh[pousr]_", "hf_", "xox", "earer ", "EARER ")
_SHAPE_STARTS = tuple(re.compile(source).search for source in _SHAPE_STARTS_SOURCE)
_SHAPE_STARTS_BYTES = tuple(re.compile(source.encode()).search for source in _SHAPE_STARTS_SOURCE)


def _has_shape_start(text: str) -> bool:
    for search in _SHAPE_STARTS:
        if search(text):
            return True
    return False


def _redact_shape(match: re.Match) -> str:
    if match.start(1) < 0:
        return REDACTED
    return match.group(0)[: match.start(1) - match.start(0)] + REDACTED  # keep "Bearer "


# A secret-named field in a body the JSON parser could not read (too deep,
# lone surrogates, not JSON at all), and secret-named query or form parameters.
_RAW_SECRET_FIELD = re.compile(r'("' + _SECRET_NAME + r'"\s*:\s*")((?:[^"\\]|\\.)*)"', re.IGNORECASE)
_SECRET_PARAM = re.compile(
    r"((?:^|[?&;])(?:" + _SECRET_NAME + r"|key|token|sig|signature)=)([^&#;\s]+)", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """The URL with the values of secret-named query parameters (`?key=`,
    `?api_key=`, `&access_token=`) replaced."""
    if "?" not in url:
        return url
    base, _, query = url.partition("?")
    return base + "?" + _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, query)


def redact_raw_body(text: str) -> str:
    """A body kept as text (not parsed as JSON) with the values of
    secret-named JSON fields and form parameters replaced."""
    text = _RAW_SECRET_FIELD.sub(lambda m: m.group(1) + REDACTED + '"', text)
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class Scrubber:
    """Scrubs one call's secrets (the values of its secret headers and fields
    that look like credentials) and credential shapes out of string values,
    and says cheaply whether a JSON text can hold any at all."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # longest first: a secret that contains another goes whole
        self.secrets = tuple(sorted({s for s in secrets if looks_like_credential(s)}, key=len, reverse=True))
        # as each appears inside a JSON string serialised by `to_json`
        self._needles = tuple(to_json(s)[1:-1] for s in self.secrets)

    def may_hold(self, data: bytes, foreign: bool = False) -> bool:
        """False only if no string in the JSON text `data` holds anything to
        scrub. `data` written by `to_json` escapes each character alone, so a
        secret shows as its own escaped form; `foreign` JSON (an agent's body
        as received) may spell an ASCII character as an escape, and then
        anything goes (secrets and shapes are printable ASCII)."""
        if any(needle in data for needle in self._needles):
            return True
        if foreign and _ESCAPED_ASCII.search(data):
            return True
        return any(search(data) for search in _SHAPE_STARTS_BYTES) and _SHAPES_BYTES.search(data) is not None

    def may_hold_text(self, text: str) -> bool:
        """Whether `text` holds anything to scrub (exactly, unlike `may_hold`)."""
        return any(secret in text for secret in self.secrets) or (
            _has_shape_start(text) and _SHAPES.search(text) is not None
        )

    def holds_secret(self, text: str) -> bool:
        """Whether `text` holds one of the call's secrets (a search that skips
        ahead by a secret's length: cheap over a whole stream's events)."""
        return any(secret in text for secret in self.secrets)

    @staticmethod
    def mentions_shape(text: str) -> bool:
        """Whether `text` holds the start of a credential shape (`may_hold_text`
        is False for a text without a secret and without one)."""
        return _has_shape_start(text)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
                if secret in text:  # formed again around the marker: nothing of it is kept
                    return REDACTED
        if _has_shape_start(text):
            text = _SHAPES.sub(_redact_shape, text)
        return text

    def value(self, value: Any) -> Any:
        """A copy of a JSON value with every string scrubbed: same keys (a key
        holding a secret is scrubbed too, kept apart from its siblings), same
        types, same lengths of lists."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if isinstance(key, str) and (clean := self.text(key)) != key:
                    unique, number = clean, 1
                    while unique in out or unique in value:
                        number += 1
                        unique = f"{clean}#{number}"
                    key = unique
                out[key] = self.value(item)
            return out
        if isinstance(value, (list, tuple)):
            return [self.value(item) for item in value]
        return value


@functools.lru_cache(maxsize=64)  # an agent sends the same key on every call
def scrubber_for(secrets: frozenset[str]) -> Scrubber:
    return Scrubber(secrets)
