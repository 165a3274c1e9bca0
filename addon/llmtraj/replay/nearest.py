"""How close two requests are, for the replay's `nearest` rung and for
explaining a miss. Knows nothing of mitmproxy.

Two requests are comparable when they have the same shape: the same API and
model, the same roles in order and the same tool calls (by name) in order.
Their similarity is that of their texts as multisets of words (every string
of the normalised body), from 0 to 1: linear in the size of the bodies, so a
200 KB conversation is compared in milliseconds, not the seconds a diff takes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

THRESHOLD = 0.8  # below this, no recorded call is "nearest" enough to be served
_WORD = re.compile(r"\w+|[^\w\s]")


def shape(api: str, body: Any) -> tuple:
    """(api, model, roles in order, tool-call names in order) of a chat-like
    body of any of the APIs (messages, input items, contents)."""
    if not isinstance(body, dict):
        return (api, None, (), ())
    roles, tools = [], []
    for item in _items(body):
        if not isinstance(item, dict):
            continue
        role = item.get("role") or item.get("type")
        if isinstance(role, str):
            roles.append(role)
        for call in _tool_calls(item):
            tools.append(call)
    return (api, body.get("model"), tuple(roles), tuple(tools))


def _items(body: dict) -> list:
    for key in ("messages", "input", "contents"):
        value = body.get(key)
        if isinstance(value, list):
            return value
    return []


def _tool_calls(item: dict) -> Iterator[str]:
    if item.get("type") in ("function_call", "custom_tool_call") and isinstance(item.get("name"), str):
        yield item["name"]  # Responses
    for call in item.get("tool_calls") or []:  # chat completions
        if isinstance(call, dict) and isinstance((call.get("function") or {}).get("name"), str):
            yield call["function"]["name"]
    content = item.get("content")
    if isinstance(content, list):  # Anthropic Messages
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("name"), str):
                yield block["name"]


def words(body: Any) -> Counter:
    """The words (and punctuation marks) of every string in a body."""
    counts: Counter = Counter()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            counts.update(_WORD.findall(node))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif node is not None:
            counts[str(node)] += 1

    walk(body)
    return counts


def similarity(a: Counter, b: Counter) -> float:
    """|a ∩ b| / |a ∪ b| of two word multisets; 1.0 for two empty ones."""
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 1.0
