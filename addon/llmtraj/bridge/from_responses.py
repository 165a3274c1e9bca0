"""An OpenAI Responses request as a chat-completions request.

Every field is translated, ignored for a stated reason, or refused
(`Untranslatable`): built-in tools (web search, file search, computer use,
...), stored state (`previous_response_id`, `conversation`), encrypted
reasoning passed back, files.
"""

from __future__ import annotations

from typing import Any

from .errors import Untranslatable

# Fields about storage, caching, routing and client bookkeeping at OpenAI:
# nothing the chat upstream's answer depends on. Left out. (`store`: the bridge
# stores nothing, and a later call cannot refer to it: `previous_response_id`
# is refused.)
_IGNORED = frozenset({
    "store", "metadata", "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "service_tier",
    "client_metadata", "stream_options", "user",
})  # fmt: skip
# `include` values the bridge can answer: the reasoning items it makes carry
# their text in the clear (summary), so an encrypted copy is not needed to pass
# them back; output text logprobs are not carried (refused below).
_INCLUDABLE = frozenset({"reasoning.encrypted_content"})
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _parts(content: Any, where: str) -> Any:
    """A message's content as chat content: a string, or parts (text, image)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content that is not a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal") or ""})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"]}
            if part.get("detail") not in (None, "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:  # input_file, an image by file_id, audio
            raise Untranslatable(f"a part of type {kind!r} in {where}")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


class _Messages:
    """Builds the chat messages: consecutive function calls (and a reasoning
    item before them) join one assistant message, as chat templates want."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._reasoning: list[str] = []  # reasoning items waiting for the assistant turn they belong to

    def _assistant(self, *, fresh: bool = False) -> dict[str, Any]:
        """The assistant message the next part of a turn goes into."""
        last = self.messages[-1] if self.messages else None
        if fresh or last is None or last.get("role") != "assistant" or self._reasoning:
            last = {"role": "assistant", "content": None}
            self._attach_reasoning(last)
            self.messages.append(last)
        return last

    def _attach_reasoning(self, message: dict[str, Any]) -> None:
        if self._reasoning:
            message["reasoning_content"] = "\n\n".join(self._reasoning)
            self._reasoning = []

    def finish(self) -> list[dict[str, Any]]:
        if self._reasoning:  # reasoning as the last input item: an assistant turn of its own
            self._assistant()
        return self.messages

    def add(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise Untranslatable(f"{where} that is not an object")
        kind = item.get("type") or "message"
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise Untranslatable(f"{where} with role {item.get('role')!r}")
            content = _parts(item.get("content"), where)
            if role == "assistant":
                if not isinstance(content, str):
                    raise Untranslatable(f"an image in the assistant message {where}")
                last = self.messages[-1] if self.messages else None
                if last is None or last.get("role") != "assistant" or last.get("content") is not None or last.get("tool_calls"):
                    last = None  # a new turn (text comes before the calls of its turn)
                self._assistant(fresh=last is None)["content"] = content
            else:
                self.messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}  # fmt: skip
            self._assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts(output, f"{where}.output")
            self.messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind == "reasoning":
            if item.get("encrypted_content"):
                raise Untranslatable(f"encrypted reasoning ({where})", "the chat upstream cannot read another model's encrypted reasoning")
            parts = [*(item.get("summary") or []), *(item.get("content") or [])]
            self._reasoning.append("\n\n".join(p.get("text") or "" for p in parts if isinstance(p, dict)))
        else:  # built-in tool calls and outputs, item references, ...
            raise Untranslatable(f"the input item type {kind!r} ({where})")


def _tools(tools: Any, out: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Function tools as chat functions; a namespace's functions (a group of
    tools, as Codex sends them) as functions of their own names, which the
    model calls by."""
    if not isinstance(tools, list):
        raise Untranslatable("tools that are not a list")
    out = [] if out is None else out
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            _tools(tool.get("tools") or [], out)
            continue
        if kind == "custom":
            raise Untranslatable(f"the custom tool {tool.get('name')!r}", "free-form tool input has no chat-completions form")
        if kind != "function":
            raise Untranslatable(f"the built-in tool {kind!r}", "only function tools can be offered")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        if any(other["function"].get("name") == function.get("name") for other in out):
            raise Untranslatable(f"two tools named {function.get('name')!r} (in different namespaces)")
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise Untranslatable(f"tool_choice {choice!r}")


def _text_format(text: Any, chat: dict[str, Any]) -> None:
    if not isinstance(text, dict):
        raise Untranslatable(f"text {text!r}")
    for key, value in text.items():
        if key == "format":
            kind = value.get("type") if isinstance(value, dict) else None
            if kind == "json_schema":
                schema = {k: value[k] for k in ("name", "schema", "strict", "description") if value.get(k) is not None}
                chat["response_format"] = {"type": "json_schema", "json_schema": schema}
            elif kind == "json_object":
                chat["response_format"] = {"type": "json_object"}
            elif kind != "text":
                raise Untranslatable(f"text.format {value!r}")
        elif key == "verbosity":
            if value not in (None, "medium"):  # the default: a model without the setting answers as it does
                raise Untranslatable(f"text.verbosity {value!r}")
        else:
            raise Untranslatable(f"text.{key}")


def responses_to_chat(request: Any) -> dict[str, Any]:
    """The chat-completions request for a Responses request; raises
    Untranslatable naming what has no chat form."""
    if not isinstance(request, dict) or not isinstance(request.get("input"), (str, list)):
        raise Untranslatable("a request without input (a string or a list of items)")
    chat: dict[str, Any] = {"model": request.get("model")}
    messages = _Messages()
    for key, value in request.items():
        if key in ("model", "input") or key in _IGNORED or value is None:
            continue
        if key == "instructions":
            messages.messages.append({"role": "system", "content": _parts(value, "instructions")})
        elif key == "max_output_tokens":
            chat["max_tokens"] = value
        elif key in ("temperature", "top_p", "parallel_tool_calls"):
            chat[key] = value
        elif key == "stream":
            chat["stream"] = value
            if value is True:  # usage comes in the last chunk: the agent's response.completed carries it
                chat["stream_options"] = {"include_usage": True}
        elif key == "tools":
            if value:
                chat["tools"] = _tools(value)
        elif key == "tool_choice":
            chat["tool_choice"] = _tool_choice(value)
        elif key == "reasoning":
            if not isinstance(value, dict):
                raise Untranslatable(f"reasoning {value!r}")
            if value.get("effort") is not None:
                chat["reasoning_effort"] = value["effort"]
            # `summary`: the bridge always gives the reasoning it gets as the summary
        elif key == "text":
            _text_format(value, chat)
        elif key == "include":
            refused = [v for v in value or () if v not in _INCLUDABLE]
            if refused:
                raise Untranslatable(f"include {refused!r}")
        elif key == "truncation":
            if value != "disabled":
                raise Untranslatable(f"truncation {value!r}", "the chat upstream does not drop context")
        elif key == "background":
            if value:
                raise Untranslatable("background mode")
        elif key == "top_logprobs":
            if value:
                raise Untranslatable("top_logprobs", "output text logprobs are not carried back")
        else:  # previous_response_id, conversation, prompt, max_tool_calls, ...
            raise Untranslatable(f"the field {key!r}")
    items = request["input"] if isinstance(request["input"], list) else [{"role": "user", "content": request["input"]}]
    for position, item in enumerate(items):
        messages.add(item, f"input[{position}]")
    chat["messages"] = messages.finish()
    return chat
