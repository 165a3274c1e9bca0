"""JSON as text: the compact form llm-traj writes (`compact_json`), where two values first
differ, and short excerpts of values for messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_EXCERPT = 60


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


MISSING = object()


def first_difference(recorded: Any, request: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(path, recorded value, request value) of the first place two JSON values
    differ, in the recording's key order; `MISSING` for an absent value."""
    return next(differences(recorded, request, path), None)


def differences(recorded: Any, request: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every place two JSON values differ, as `first_difference` gives the
    first: lazily, so taking a few costs only the walk up to them."""
    if isinstance(recorded, dict) and isinstance(request, dict):
        for key, value in recorded.items():
            sub = f"{path}.{key}" if path else key
            if key not in request:
                yield sub, value, MISSING
            else:
                yield from differences(value, request[key], sub)
        for key, value in request.items():
            if key not in recorded:
                yield (f"{path}.{key}" if path else key), MISSING, value
        return
    if isinstance(recorded, list) and isinstance(request, list):
        for i, (a, b) in enumerate(zip(recorded, request)):
            yield from differences(a, b, f"{path}[{i}]")
        i = min(len(recorded), len(request))
        if i < len(recorded):
            yield f"{path}[{i}]", recorded[i], MISSING
        elif i < len(request):
            yield f"{path}[{i}]", MISSING, request[i]
        return
    # `type` too: 1, 1.0 and true are equal in Python, not in the canonical JSON
    if type(recorded) is not type(request) or recorded != request:
        yield path, recorded, request


def describe(path: str, recorded: Any, request: Any) -> str:
    """One difference in words: `path: recorded X, request Y`, with excerpts."""
    return f"{path or 'body'}: recorded {excerpt(recorded, request)}, request {excerpt(request, recorded)}"


def excerpt(value: Any, other: Any) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, str) and isinstance(other, str):
        # Long texts often differ far in: show where they part.
        common = next((i for i, (a, b) in enumerate(zip(value, other)) if a != b), min(len(value), len(other)))
        start = max(0, common - 20)
        text = value[start : start + _EXCERPT]
        return ("…" if start else "") + compact_json(text) + ("…" if start + _EXCERPT < len(value) else "")
    text = compact_json(value)
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"
