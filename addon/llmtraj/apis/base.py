"""The small interface every supported LLM API shape implements.

The modes (record, replay, anti-call) only talk to this interface, so adding an
API is one new module plus one line in `llmtraj.apis.API_SHAPES`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..sse import SSEBlock


class StreamAggregator(Protocol):
    def add(self, block: SSEBlock) -> None:
        """Fold one SSE block of the response stream into the aggregate."""

    def result(self) -> dict[str, Any] | None:
        """The final object as a non-streamed call would have returned it, or
        None when no event carried any part of it."""

    @property
    def problems(self) -> list[str]:
        """Events that could not be folded in (bad JSON, error events), in order."""


class ApiShape(Protocol):
    name: str

    def matches(self, method: str, path: str) -> bool:
        """Whether a request (path without query and session prefix) is a call of this API."""

    def new_aggregator(self) -> StreamAggregator: ...

    def error_body(self, message: str, type: str, code: str | None = None) -> dict[str, Any]:
        """An error object in this API's own error shape."""
