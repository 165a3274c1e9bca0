"""Overriding a session's system prompt: which version a session gets (one
reference, or an A/B split by a stable hash of the session id), and the request
with its system prompt replaced, in each API's shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

from .matching import SYSTEM_ROLES, PromptIndex, system_segments
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
    none). A template's variables are filled from the agent's prompt when it
    is a version of the same prompt."""
    segments = system_segments(api, request)
    original_hash = None
    values: dict[str, str] = {}
    if segments:
        whole, found = index.match_segments(segments) if index is not None else ("\n\n".join(segments), None)
        original_hash = text_hash(whole)
        if found is not None and found.version.name == override.version.name:
            values = found.variables
    text = override.version.template.render(values)
    if api == "chat.completions":
        request["messages"] = _with_system_message(request.get("messages"), text)
    elif api == "anthropic.messages":
        system = request.get("system")
        # keep the agent's prompt caching mark: the new prefix is cached as the old one was
        cache = next((b["cache_control"] for b in system if isinstance(b, dict) and "cache_control" in b), None) \
            if isinstance(system, list) else None  # fmt: skip
        request["system"] = [{"type": "text", "text": text, "cache_control": cache}] if cache else text
    elif api == "responses":
        if "instructions" not in request and any(
            isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in request.get("input") or ()
        ):
            request["input"] = _with_system_message(request["input"], text)
        else:
            request["instructions"] = text
    return original_hash


def _with_system_message(messages: Any, text: str) -> list:
    """The messages with their system/developer messages replaced by one (at the
    first one's place, with its role), or a system message put first."""
    messages = messages if isinstance(messages, list) else []
    first = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES), None)
    if first is None:
        return [{"role": "system", "content": text}, *messages]
    kept = [m for m in messages if not (isinstance(m, dict) and m.get("role") in SYSTEM_ROLES)]
    kept.insert(first, {"role": messages[first]["role"], "content": text})
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
