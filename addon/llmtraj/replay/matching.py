"""How a request is compared with a recorded call: its canonical form (the body as
sorted compact JSON without the ignored fields, redacted as the recorder redacted),
the match rungs, and the description of a difference."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydantic_core import from_json

from ..apis import ApiShape
from ..core.jsontext import describe, first_difference
from ..core.redact import may_have_secret_fields, redact_fields, redact_headers, redact_raw_body, scrubber_for

# Fields that change from run to run without changing the answer: how it is
# delivered (a stream recording is replayed to a non-stream request and back)
# and bookkeeping that the model does not see.
DEFAULT_IGNORE = (
    "stream", "stream_options", "user", "metadata", "store",
    "service_tier", "prompt_cache_key", "safety_identifier",
)  # fmt: skip

EXACT, LATER, NORMALIZED, NEAREST, POSITION = "exact", "later", "normalized", "nearest", "position"


# --------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Canonical:
    """A request as matching sees it: `key` is what is compared; `body` (the
    JSON without the ignored fields, or the text of a body that is not JSON)
    is only looked at to describe a difference."""

    api: str
    key: str
    body: Any
    wants_stream: bool = False
    raw: bool = False  # `body` is the text of a body that is not JSON
    headers: tuple[tuple[str, str], ...] = ()  # a live request's, to pick its normalisation preset


def canonical(
    api: ApiShape, body: Any, raw: str | None, ignore: frozenset[str], secrets: set[str] = frozenset()
) -> Canonical:
    scrubber = scrubber_for(frozenset(secrets))
    if raw is not None:
        text = scrubber.text(redact_raw_body(raw))
        return Canonical(api.name, f"{api.name}\nraw\n{text}", text, raw=True)
    wants_stream = api.wants_stream(body)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ignore}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if scrubber.may_hold(text.encode()):  # a secret in the body: scrubbed as the recorder did, and a difference must not show it
        body = scrubber.value(body)
        text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return Canonical(api.name, f"{api.name}\njson\n{text}", body, wants_stream)


def canonical_request(
    api: ApiShape, body: bytes, headers: Iterable[tuple[str, str]], ignore: frozenset[str]
) -> Canonical:
    """The canonical form of a live request, redacted as the recorder redacts."""
    headers = tuple(headers)
    _, secrets = redact_headers(list(headers))
    try:
        obj = from_json(body) if body else None
    except ValueError:
        found = canonical(api, None, body.decode("utf-8", errors="replace"), ignore, secrets)
    else:
        if may_have_secret_fields(body):
            obj = redact_fields(obj, secrets)
        found = canonical(api, obj, None, ignore, secrets)
    return replace(found, headers=headers)


def describe_difference(recorded: Canonical, request: Canonical) -> str:
    if recorded.api != request.api:
        return f"api: recorded {recorded.api}, request {request.api}"
    return describe(*(first_difference(recorded.body, request.body) or ("body", recorded.body, request.body)))
