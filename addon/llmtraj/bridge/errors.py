"""What the bridge refuses, and errors in the agent's own API shape."""

from __future__ import annotations

from typing import Any

from ..apis import ApiShape


class Untranslatable(ValueError):
    """A request the bridge cannot translate faithfully: answered with a 400 in
    the agent's API shape that names the feature, never sent with it dropped."""

    def __init__(self, feature: str, detail: str = "") -> None:
        self.feature = feature
        message = f"llm-traj bridge: {feature} cannot be translated to chat completions"
        super().__init__(message + (f" ({detail})" if detail else ""))


# Anthropic's error `type` by HTTP status (its API names errors by kind, not by code).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}  # fmt: skip


def agent_error(api: ApiShape, status: int, upstream_body: Any, fallback: str) -> dict[str, Any]:
    """The error body the agent gets for the upstream's chat-completions error
    (OpenAI's `{"error": {message, type, code}}`, or vLLM's flat
    `{"message", "type", "code"}`): the upstream's message and code kept, the
    type given as the agent's API names it for that status."""
    error = upstream_body.get("error") if isinstance(upstream_body, dict) else None
    if not isinstance(error, dict):
        error = upstream_body if isinstance(upstream_body, dict) and "message" in upstream_body else {}
    message = error.get("message") if isinstance(error.get("message"), str) else fallback
    code = error.get("code")
    code = str(code) if code is not None else None
    if api.name == "anthropic.messages":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    else:
        kind = error.get("type") if isinstance(error.get("type"), str) else (
            "server_error" if status >= 500 else "invalid_request_error")
    return api.error_body(message, kind, code)
