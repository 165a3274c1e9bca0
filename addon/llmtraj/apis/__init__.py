"""The LLM API shapes llm-traj understands, each behind `ApiShape`."""

from __future__ import annotations

from .anthropic_messages import AnthropicMessages
from .base import ApiShape, StreamAggregator
from .chat_completions import ChatCompletions
from .completions import Completions
from .responses import Responses

API_SHAPES: tuple[ApiShape, ...] = (ChatCompletions(), AnthropicMessages(), Responses(), Completions())
API_BY_NAME: dict[str, ApiShape] = {shape.name: shape for shape in API_SHAPES}


def api_for(method: str, path: str) -> ApiShape | None:
    """The API a request calls, or None for traffic that is passed through unrecorded."""
    for shape in API_SHAPES:
        if shape.matches(method, path):
            return shape
    return None


__all__ = ["API_BY_NAME", "API_SHAPES", "ApiShape", "StreamAggregator", "api_for"]
