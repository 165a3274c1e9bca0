"""The LLM API shapes llm-traj understands, each behind `ApiShape`."""

from __future__ import annotations

from typing import Any

from ..core.record import NO_RESPONSE_STATUS
from .anthropic_messages import AnthropicMessages
from .base import ApiShape, StreamAggregator
from .chat_completions import ChatCompletions
from .completions import Completions
from .responses import Responses

API_SHAPES: tuple[ApiShape, ...] = (ChatCompletions(), AnthropicMessages(), Responses(), Completions())
API_BY_NAME: dict[str, ApiShape] = {shape.name: shape for shape in API_SHAPES}


def no_response_answer(api: ApiShape, kind: str, message: str) -> tuple[int, dict[str, Any]]:
    """(status, error body in the API's shape) for an agent whose upstream failed
    before answering (`kind`: the record's error kind, also the error's `code`)."""
    return NO_RESPONSE_STATUS[kind], api.error_body(f"llm-traj: {message}", "proxy_error", kind)


def api_for(method: str, path: str) -> ApiShape | None:
    """The API a request calls, or None for traffic that is passed through unrecorded."""
    for shape in API_SHAPES:
        if shape.matches(method, path):
            return shape
    return None


def chat_view(api: str, final: Any) -> Any:
    """A recorded final object as a chat.completion (see `ApiShape.chat_view`);
    anything that is not an object of a known API comes back as is."""
    shape = API_BY_NAME.get(api)
    return shape.chat_view(final) if shape is not None and isinstance(final, dict) else final


__all__ = ["API_BY_NAME", "API_SHAPES", "ApiShape", "StreamAggregator", "api_for", "chat_view"]
