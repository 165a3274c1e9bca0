"""Overriding a session's system prompt: which version a session gets (one
reference, or an A/B split by a stable hash of the session id), and the request
with its system prompt replaced, in each API's shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

from .matching import PromptIndex, match_prompt, system_message_indexes, system_segments
from .registry import PromptError, PromptRef, PromptRegistry, PromptVersion, parse_ref, text_hash

AGENT_ARM = "none"  # an A/B arm that keeps the agent's own prompt


@dataclass(frozen=True)
class Arm:
    ref: PromptRef | None  # None: the agent's own prompt
    weight: float

    def __str__(self) -> str:
        return AGENT_ARM if self.ref is None else str(self.ref)


@dataclass(frozen=True)
class Assignment:
    """`NAME@LABEL`, `NAME/VERSION`, or an A/B split `REF=WEIGHT,REF=WEIGHT,...`
    (`none=WEIGHT`: sessions that keep the agent's prompt)."""

    arms: tuple[Arm, ...]

    def arm_for(self, session: str) -> Arm:
        """The same arm for a session id every time, in every process."""
        if len(self.arms) == 1:
            return self.arms[0]
        point = int.from_bytes(hashlib.sha256(session.encode()).digest()[:8], "big") / 2**64
        point *= sum(arm.weight for arm in self.arms)
        for arm in self.arms:
            point -= arm.weight
            if point < 0:
                return arm
        return self.arms[-1]

    def __str__(self) -> str:
        if len(self.arms) == 1:
            return str(self.arms[0])
        return ",".join(f"{arm}={arm.weight:g}" for arm in self.arms)


def parse_assignment(text: str) -> Assignment:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise PromptError("an override names a prompt: NAME@LABEL, NAME/VERSION, or REF=WEIGHT,REF=WEIGHT for an A/B split")
    arms = []
    for part in parts:
        ref_text, _, weight_text = part.partition("=")
        if len(parts) > 1 and not weight_text:
            raise PromptError(f"A/B arm {part!r} has no weight; write REF=WEIGHT, e.g. {part}=50")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = -1.0
        if not weight > 0 or weight == float("inf"):
            raise PromptError(f"A/B arm {part!r}: the weight must be a number above 0")
        ref = None if ref_text.strip() == AGENT_ARM else parse_ref(ref_text)
        arms.append(Arm(ref, weight))
    return Assignment(tuple(arms))


def check_assignment(assignment: Assignment, registry: PromptRegistry) -> None:
    """PromptError (one line) if an arm names a prompt, label or version the registry does not have."""
    for arm in assignment.arms:
        if arm.ref is not None:
            registry.get(arm.ref)


@dataclass(frozen=True)
class Override:
    """The version a session's calls are sent with."""

    ref: str  # what chose it: the arm's reference
    version: PromptVersion


def replace_system_prompt(api: str, request: dict[str, Any], override: Override, index: PromptIndex | None) -> str | None:
    """Puts the override's text in place of the request's system prompt (in
    place); returns the hash of the agent's own system prompt (None if it had
    none). When the agent sends its prompt in several pieces (Anthropic blocks,
    several system messages) and one of them is a registered prompt, only that
    piece is replaced: the others (Claude Code's billing header, say) stay. A
    template's variables are filled from the agent's prompt when it is a
    version of the same prompt."""
    segments = system_segments(api, request)
    original_hash, values, piece = None, {}, None
    if segments:
        whole, found, piece = match_prompt(segments, index)
        original_hash = text_hash(whole)
        if found is not None and found.version.name == override.version.name:
            values = found.variables
    text = override.version.template.render(values)
    if api == "chat.completions":
        request["messages"] = _with_system_message(request.get("messages"), text, piece)
    elif api == "anthropic.messages":
        system = request.get("system")
        if isinstance(system, list) and piece is not None:
            blocks = [b for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
            blocks[piece]["text"] = text
        else:
            # keep the agent's prompt caching mark: the new prefix is cached as the old one was
            cache = next((b["cache_control"] for b in system if isinstance(b, dict) and "cache_control" in b), None) \
                if isinstance(system, list) else None  # fmt: skip
            request["system"] = [{"type": "text", "text": text, "cache_control": cache}] if cache else text
    elif api == "responses":
        # its pieces: the instructions (if any), then the system/developer input items
        first_input = 1 if isinstance(request.get("instructions"), str) else 0
        if piece is not None and piece >= first_input:
            request["input"] = _with_system_message(request["input"], text, piece - first_input)
        elif first_input or not system_message_indexes(request.get("input")):
            request["instructions"] = text
        else:
            request["input"] = _with_system_message(request["input"], text, None)
    return original_hash


def _with_system_message(messages: Any, text: str, piece: int | None) -> list:
    """The messages with their system/developer messages replaced by one (at the
    first one's place, with its role), or only the `piece`-th of them; or a
    system message put first."""
    messages = messages if isinstance(messages, list) else []
    system = system_message_indexes(messages)
    if not system:
        return [{"role": "system", "content": text}, *messages]
    if piece is not None:
        at = system[piece]
        return [*messages[:at], {"role": messages[at]["role"], "content": text}, *messages[at + 1 :]]
    kept = [m for i, m in enumerate(messages) if i not in system]
    kept.insert(system[0], {"role": messages[system[0]]["role"], "content": text})
    return kept


def rewrite_request(api: str, body: bytes, override: Override, index: PromptIndex | None) -> tuple[bytes, str | None] | None:
    """(the request body with the override's system prompt, the hash of the
    agent's own), or None for a body that is not a JSON object. On the proxy's
    loop, so the common case (the system prompt one JSON string) replaces that
    string in the bytes as they are: serialising a long conversation again
    costs ten times more than parsing it."""
    try:
        request = from_json(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    segments = system_segments(api, request)
    original_hash = replace_system_prompt(api, request, override, index)
    if len(segments) == 1:
        new = system_segments(api, request)
        for encoded in {json.dumps(segments[0]).encode(), json.dumps(segments[0], ensure_ascii=False).encode()}:
            at = body.find(encoded)
            if at >= 0 and at == body.rfind(encoded) and len(new) == 1:
                spliced = body[:at] + json.dumps(new[0], ensure_ascii=False).encode() + body[at + len(encoded):]
                if from_json(spliced) == request:  # the string was the prompt's own, not a copy inside another
                    return spliced, original_hash
    return to_json(request), original_hash
