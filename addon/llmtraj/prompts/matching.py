"""Finding a call's system prompt in its request, in each API's shape, and which
registered version it is: the exact text first (looked up by length, then
compared: no hashing of a long text), then the templates, with their
placeholders as wildcards. The index is built once per registry change."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .registry import PromptVersion, text_hash
from .template import parse_template

SYSTEM_ROLES = ("system", "developer")
APIS_WITH_SYSTEM_PROMPT = ("chat.completions", "anthropic.messages", "responses")  # legacy completions has none


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n\n".join(texts) if texts else None
    return None


def system_message_indexes(messages: Any) -> list[int]:
    """Where the system/developer messages with text are in a list of messages."""
    if not isinstance(messages, list):
        return []
    return [
        i for i, m in enumerate(messages)
        if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES and _text_of(m.get("content")) is not None
    ]  # fmt: skip


def _system_messages(messages: Any) -> list[str]:
    return [_text_of(messages[i]["content"]) for i in system_message_indexes(messages)]


def system_segments(api: str, request: Any) -> list[str]:
    """The system prompt of a request, in its pieces: chat `system`/`developer`
    messages, Anthropic `system` (a string or text blocks), Responses
    `instructions` and `system`/`developer` input items. Empty without one."""
    if not isinstance(request, dict):
        return []
    if api == "chat.completions":
        return _system_messages(request.get("messages"))
    if api == "anthropic.messages":
        system = request.get("system")
        if isinstance(system, str):
            return [system]
        if isinstance(system, list):
            return [b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
        return []
    if api == "responses":
        instructions = request.get("instructions")
        segments = [instructions] if isinstance(instructions, str) else []
        return segments + _system_messages(request.get("input"))
    return []


@dataclass(frozen=True, slots=True)
class PromptMatch:
    version: PromptVersion
    match: str  # exact | template
    variables: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Compiled:
    version: PromptVersion
    prefix: str
    suffix: str
    min_length: int
    pattern: re.Pattern[str]
    groups: tuple[tuple[str, str], ...]  # (variable, regex group)


class PromptIndex:
    """Every registered version, ready to match a text against."""

    def __init__(self, versions: list[PromptVersion]) -> None:
        self._by_length: dict[int, list[PromptVersion]] = {}
        self._templates: list[_Compiled] = []
        # newest first: a text registered twice (a reverted prompt) is its newest version
        for version in sorted(versions, key=lambda v: (v.name, -v.version)):
            self._by_length.setdefault(len(version.text), []).append(version)
            template = parse_template(version.text)
            if template.variables:
                self._templates.append(_Compiled(
                    version, template.prefix, template.suffix, sum(len(p) for p in template.pieces[::2]),
                    template.pattern(), template.groups(),
                ))  # fmt: skip

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_length.values())

    def match(self, text: str) -> PromptMatch | None:
        for version in self._by_length.get(len(text), ()):
            if version.text == text:
                return PromptMatch(version, "exact", {})
        length = len(text)
        for t in self._templates:
            # the literal ends rule out almost every template before the regex runs
            if length >= t.min_length and text.startswith(t.prefix) and text.endswith(t.suffix):
                m = t.pattern.fullmatch(text)
                if m is not None:
                    return PromptMatch(t.version, "template", {name: m.group(group) for name, group in t.groups})
        return None

    def match_segments(self, segments: list[str]) -> tuple[str, PromptMatch | None, int | None]:
        """(the system prompt's text, its match, which piece matched): the whole
        joined prompt first (piece None), then each piece alone (an agent may
        send its prompt in several blocks, only one of them registered)."""
        whole = "\n\n".join(segments)
        found = self.match(whole)
        if found is None and len(segments) > 1:
            for piece, segment in enumerate(segments):
                if (found := self.match(segment)) is not None:
                    return whole, found, piece
        return whole, found, None


def match_prompt(segments: list[str], index: PromptIndex | None) -> tuple[str, PromptMatch | None, int | None]:
    """`PromptIndex.match_segments`, or no match without an index."""
    if index is None:
        return "\n\n".join(segments), None, None
    return index.match_segments(segments)


def prompt_tag(segments: list[str], index: PromptIndex | None) -> dict[str, Any] | None:
    """The record's `prompt` for a call with these system prompt pieces (without
    any: match `none` and no hash)."""
    if not segments:
        return {"name": None, "version": None, "label": None, "match": "none", "variables": {}, "hash": None}
    whole, found, _ = match_prompt(segments, index)
    if found is None:
        return {"name": None, "version": None, "label": None, "match": "none", "variables": {}, "hash": text_hash(whole)}
    version = found.version
    return {
        "name": version.name, "version": version.version, "label": version.label, "match": found.match,
        "variables": found.variables, "hash": text_hash(whole),
    }  # fmt: skip
