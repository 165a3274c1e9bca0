"""An Anthropic Messages request as a chat-completions request.

Every field is translated, ignored for a stated reason, or refused
(`Untranslatable`): server tools, MCP servers, documents, redacted thinking
and the like have no chat-completions form.
"""

from __future__ import annotations

from typing import Any

from ..apis import API_BY_NAME
from .errors import Untranslatable

# Fields that steer nothing the chat upstream does: prompt caching and service
# routing at Anthropic. Left out.
_IGNORED = frozenset({"service_tier", "cache_control", "inference_geo"})
_THINKING_EFFORT = ((4096, "low"), (16384, "medium"))  # budget_tokens below each bound -> effort; above: high


def _text_of(blocks: Any, where: str) -> str:
    """A system prompt: a string, or text blocks (their cache_control is Anthropic's caching)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise Untranslatable(f"{where} that is not a string or a list of text blocks")
    texts = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise Untranslatable(f"a {kind} block in {where}")
        texts.append(block.get("text") or "")
    return "\n\n".join(texts) if len(texts) > 1 else "".join(texts)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64":
        return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    raise Untranslatable(f"an image with a {source.get('type')!r} source in {where}")


def _parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """User content blocks (text, image) as chat content parts."""
    parts = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append(_image(block, where))
        else:
            raise Untranslatable(f"a {kind or 'malformed'} block in {where}")
    return parts


def _content(parts: list[dict[str, Any]]) -> Any:
    """Text-only parts as one string (what every chat template renders); else the parts."""
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = _content(_parts(content if isinstance(content, list) else [content], where))
    if block.get("is_error") and isinstance(content, str):
        # chat has no error flag on a tool result: the model reads it in the text
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content}


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages (chat wants them right
    after the assistant's calls), then what else it says as one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content that is not a string or a list of blocks")
    out = [_tool_result(b, f"{where} tool_result") for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    rest = [b for b in content if not (isinstance(b, dict) and b.get("type") == "tool_result")]
    if rest:
        out.append({"role": "user", "content": _content(_parts(rest, where))})
    return out


def _assistant(content: Any, where: str) -> dict[str, Any]:
    """An assistant turn as one chat message (as the API's chat view of it):
    text as content, thinking as reasoning_content, tool_use blocks as tool_calls."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content that is not a string or a list of blocks")
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in ("text", "thinking", "tool_use"):  # redacted_thinking (encrypted), server tool use and results
            raise Untranslatable(f"a {kind or 'malformed'} block in {where}")
    return API_BY_NAME["anthropic.messages"].chat_view({"content": content})["choices"][0]["message"]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise Untranslatable("tools that are not a list")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or "input_schema" not in tool or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") or tool.get("name") if isinstance(tool, dict) else None
            raise Untranslatable(f"the server tool {kind!r}", "only client tools with an input_schema can be offered")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise Untranslatable(f"tool_choice {choice!r}")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _thinking(thinking: Any, chat: dict[str, Any]) -> None:
    """Extended thinking as the chat-side switches: `reasoning_effort` (from the
    budget) and the chat template's `enable_thinking` (Qwen3 and the like)."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens") or 0
        # output_config's effort, when given, says it directly
        chat.setdefault("reasoning_effort", next((effort for bound, effort in _THINKING_EFFORT if budget < bound), "high"))
        chat["chat_template_kwargs"] = {"enable_thinking": True}
    elif kind == "adaptive":
        chat["chat_template_kwargs"] = {"enable_thinking": True}
    elif kind == "disabled":
        chat["chat_template_kwargs"] = {"enable_thinking": False}
    else:
        raise Untranslatable(f"thinking {thinking!r}")


def _output(config: Any, chat: dict[str, Any]) -> None:
    """`output_config`: the effort (chat's `reasoning_effort`) and a JSON schema
    the answer must follow (chat's `response_format`)."""
    if not isinstance(config, dict):
        raise Untranslatable(f"output_config {config!r}")
    for key, value in config.items():
        if key == "effort":
            chat["reasoning_effort"] = value
        elif key == "format" and value is not None:
            if not isinstance(value, dict) or value.get("type") != "json_schema":
                raise Untranslatable(f"output_config.format {value!r}")
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": value.get("schema")}}
        elif value is not None:
            raise Untranslatable(f"output_config.{key}")


def _context_management(config: Any) -> None:
    """Context editing happens at Anthropic, on the conversation it keeps; only
    edits that change nothing can be passed over (clearing no thinking)."""
    edits = config.get("edits") if isinstance(config, dict) else None
    for edit in edits if isinstance(edits, list) else [config]:
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not (isinstance(kind, str) and kind.startswith("clear_thinking_") and edit.get("keep") == "all"):
            raise Untranslatable(f"the context_management edit {kind or edit!r}", "only clear_thinking with keep 'all' (no change)")


def anthropic_to_chat(request: Any) -> dict[str, Any]:
    """The chat-completions request for an Anthropic Messages request; raises
    Untranslatable naming what has no chat form."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise Untranslatable("a request without a messages list")
    chat: dict[str, Any] = {"model": request.get("model")}
    messages: list[dict[str, Any]] = []
    for key, value in request.items():
        if key in ("model", "messages") or key in _IGNORED or value is None:
            continue
        if key == "system":
            messages.append({"role": "system", "content": _text_of(value, "system")})
        elif key == "max_tokens":
            chat["max_tokens"] = value
        elif key in ("temperature", "top_p", "top_k"):
            chat[key] = value
        elif key == "stop_sequences":
            if value:
                chat["stop"] = value
        elif key == "stream":
            chat["stream"] = value
            if value is True:  # usage comes in the last chunk: the agent's message_delta carries it
                chat["stream_options"] = {"include_usage": True}
        elif key == "tools":
            if value:
                chat["tools"] = _tools(value)
        elif key == "tool_choice":
            _tool_choice(value, chat)
        elif key == "thinking":
            _thinking(value, chat)
        elif key in ("output_config", "output_format"):  # output_format: the structured-outputs beta's name
            _output(value if key == "output_config" else {"format": value}, chat)
        elif key == "context_management":
            _context_management(value)
        elif key == "metadata":
            if isinstance(value, dict) and value.get("user_id") is not None:
                chat["user"] = str(value["user_id"])
        else:  # mcp_servers, container, ...
            raise Untranslatable(f"the field {key!r}")
    for position, message in enumerate(request["messages"]):
        where = f"messages[{position}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            messages += _user(message.get("content"), where)
        elif role == "assistant":
            messages.append(_assistant(message.get("content"), where))
        elif role == "system":  # Claude Code adds system turns mid-conversation
            messages.append({"role": "system", "content": _text_of(message.get("content"), where)})
        else:
            raise Untranslatable(f"{where} with role {role!r}")
    chat["messages"] = messages
    return chat
