"""What the export formats share: the calls they take, the calls they skip and why, and
the chat view of a call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from ...apis import API_BY_NAME, chat_view
from ...core.record import CallRecord
from ..stats import call_outcome

FORMATS = ("openai-chat", "har", "atif", "tokens")
GRANULARITIES = ("per_call", "per_session")


@dataclass(frozen=True)
class Skipped:
    """A call an export left out, and why."""

    session: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.session} #{self.index}: {self.reason}"


class Unusable(ValueError):
    """A call the format cannot express, and why."""


def llm_traj_version() -> str:
    try:
        return metadata.version("llm-traj")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ok_calls(calls: list[CallRecord], skipped: list[Skipped] | None) -> Iterator[CallRecord]:
    for record in calls:
        outcome = call_outcome(record)
        if outcome == "ok":
            yield record
        elif skipped is not None:
            detail = record.error.kind if record.error else f"status {record.status}"
            skipped.append(Skipped(record.session, record.index, f"{outcome} ({detail})"))


def chat_request(record: CallRecord) -> dict[str, Any]:
    """The request as chat completions sees it (Anthropic and Responses requests converted)."""
    shape = API_BY_NAME.get(record.api)
    request = shape.chat_request_view(record.request) if shape is not None else None
    if request is None:
        raise Unusable(f"a {record.api} call has no conversation")
    if not request.get("messages"):
        raise Unusable("the request has no messages")
    return request


def first_choice(record: CallRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """(choice, its message) of a successful call."""
    choice = chat_view(record.api, record.response)["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise Unusable("the reply has no message")
    return choice, message


def message_text(content: Any) -> str:
    """The text of message content: a string, or its parts' text (other parts as `[type]`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if part.get("type") == "text" else f"[{part.get('type')}]"
            for part in content
            if isinstance(part, dict)
        )
    return json.dumps(content, ensure_ascii=False)


def prompt_of(record: CallRecord) -> dict[str, Any] | None:
    """The call's prompt tag as exports carry it (`prompt`: name, version, label, match, variables, hashes)."""
    return record.prompt.model_dump(exclude_none=True) if record.prompt is not None else None
