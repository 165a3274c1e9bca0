"""The small interface every supported LLM API shape implements.

The modes (record, replay, anti-call) only talk to this interface, so adding an
API is one new module plus one line in `llmtraj.apis.API_SHAPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..core.sse import SSEBlock


class TextSlot(NamedTuple):
    """Where a streamed event's text is (`path` into its JSON value), the fields
    whose change has no effect (`ignored`: counters, padding), and the call that
    folds in the text of an event equal to it but for these (`append`)."""

    path: tuple[str | int, ...]
    ignored: tuple[tuple[str | int, ...], ...]
    append: Callable[[str], None]


class StreamAggregator(Protocol):
    def add(self, block: SSEBlock) -> None:
        """Fold one SSE block of the response stream into the aggregate."""

    def add_parsed(self, name: str | None, data: str, value: Any) -> None:
        """Fold one whole block with data into the aggregate, its data already
        parsed as JSON (`value`): the same as `add` of that block (its `event`
        is `name`), without parsing it again."""

    def text_slot(self, name: str | None, value: Any) -> TextSlot | None:
        """For a block just folded in (`add_parsed`): where its value holds a
        string that a block equal to it but for that string (and for the
        fields `ignored` names) would append, and how to append it; None when
        such a block would do anything else (`recording.event_template`)."""

    def result(self) -> dict[str, Any] | None:
        """The final object as a non-streamed call would have returned it, or
        None when no event carried any part of it."""

    @property
    def problems(self) -> list[str]:
        """Events that could not be folded in (bad JSON, error events), in order."""

    @property
    def done(self) -> bool:
        """Whether the stream's own end marker came ([DONE], message_stop, response.completed, ...)."""


class StreamBuilder(Protocol):
    """Makes the response stream of one call from pieces pushed one at a time
    (an anti-call driver's deltas), as SSE bytes ready for the wire."""

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> bytes:
        """One delta of choice `index` (the first one of a choice gets its role)."""

    def finish(self, *, finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               stop_sequence: str | None = None) -> bytes:
        """The end of the stream: closes the choices still open, then usage if
        the request asked for it, then the end marker. `stop_sequence`: the
        stop sequence that ended the answer (Anthropic says which; in the
        other APIs it is a stop like any)."""

    def error(self, body: dict[str, Any]) -> bytes:
        """An error event (the stream ends after it)."""

    def completion(self) -> dict[str, Any]:
        """What a non-streamed call answers for everything built so far."""


class ApiShape(Protocol):
    name: str
    # How this API's stream ends, as the final event's first line: SDKs stop reading there (openai's
    # at `data: [DONE]`, without waiting for the body's own end), so the agent has its whole answer then.
    final_events: tuple[bytes, ...]
    # How a final event ends, where its servers write it so (its data included): how one is told at the
    # end of a chunk that holds the events before it too. Empty where the data varies (Responses').
    final_endings: tuple[bytes, ...]

    def matches(self, method: str, path: str) -> bool:
        """Whether a request (path without query and session prefix) is a call of this API."""

    def new_aggregator(self) -> StreamAggregator: ...

    def chunks_from_final(self, final: dict[str, Any]) -> list[bytes]:
        """The SSE blocks of a stream that a client folds back into `final`
        (replaying a non-streamed recording to a client that asks for a stream)."""

    def error_body(self, message: str, type: str, code: str | None = None) -> dict[str, Any]:
        """An error object in this API's own error shape."""

    def wants_stream(self, request: Any) -> bool:
        """Whether a request (its JSON body) asks for a streamed response."""

    def completion_from_text(self, request: Any, text: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                             finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """The final object answering `request` with `text` (and tool calls);
        ValueError for a malformed tool call."""

    def new_stream(self, request: Any) -> StreamBuilder:
        """A builder for the response stream of `request`."""

    def chat_request_view(self, request: Any) -> dict[str, Any] | None:
        """A request seen as a chat-completions request (`messages` with roles
        system/user/assistant/tool, `tools` as functions), for export; None when
        the API has no conversation (legacy completions) or the body is not one."""

    def chat_view(self, final: dict[str, Any]) -> dict[str, Any]:
        """A final object seen as a chat.completion (choices whose message has
        content, reasoning_content and tool_calls; usage as prompt/completion
        tokens), for what people read: show, stats, export, mitmweb. An error
        body comes back as is."""


def single_choice_view(
    final: dict[str, Any], *, texts: list[str], reasoning: str | None, tool_calls: list[dict[str, Any]],
    finish_reason: Any, usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The chat.completion an API with one answer per call (Messages, Responses)
    is seen as: `texts` joined as the content, `usage` already in chat terms."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    view = {"id": final.get("id"), "object": "chat.completion", "model": final.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}  # fmt: skip
    if usage is not None:
        view["usage"] = usage
    if final.get("error"):
        view["error"] = final["error"]
    return view
