"""Capture on request: what the upstream request gets added so the engine
returns token ids and logprobs, and taking out again, event by event, what the
agent did not ask for.

The agent then receives what the engine would have sent it without the added
fields: vLLM sends a field it was not asked for as `null` (so it is set to
null), SGLang leaves its id fields out (so they are removed); the usage-only
event of a stream is dropped when only the proxy asked for it. Events that
need no change pass as the very same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

ENGINES = ("vllm", "sglang")
CAPTURE_APIS = ("chat.completions", "completions")

# What may be hidden from the agent again: families of fields the proxy asked for.
TOKEN_IDS, LOGPROBS, USAGE = "token_ids", "logprobs", "usage"


@dataclass(frozen=True)
class CapturePlan:
    """For one call: the fields added upstream, and what the agent gets without."""

    engine: str
    added: dict[str, Any]
    hidden: frozenset[str]

    def note(self) -> dict[str, Any]:
        return {"engine": self.engine, "added": self.added, "hidden": sorted(self.hidden)}


def plan_capture(api: str, request: Any, engine: str = "vllm") -> CapturePlan | None:
    """What to add to `request` (the agent's JSON body) for `engine`; None when
    the call cannot carry tokens (another API, a body that is not an object)."""
    if api not in CAPTURE_APIS or not isinstance(request, dict):
        return None
    chat = api == "chat.completions"
    stream = request.get("stream") is True
    added: dict[str, Any] = {}
    hidden: set[str] = set()
    if engine == "sglang":
        # SGLang refuses ids in chat streams; its chat wants prompt ids asked for apart
        id_flags = [] if chat and stream else ["return_token_ids", "return_prompt_token_ids"] if chat else ["return_token_ids"]
    else:
        id_flags = ["return_token_ids"]
    if id_flags and not any(request.get(flag) for flag in id_flags):
        added.update(dict.fromkeys(id_flags, True))
        hidden.add(TOKEN_IDS)
    if (not request.get("logprobs")) if chat else request.get("logprobs") is None:
        added["logprobs"] = True if chat else 0  # the sampled token's logprob; no alternatives
        hidden.add(LOGPROBS)
    if stream:  # a stream's usage is what the completion token count is checked against
        options = request.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            added["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            hidden.add(USAGE)
    return CapturePlan(engine, added, frozenset(hidden)) if added else None


_DROP = object()


def _hide(obj: dict[str, Any], plan: CapturePlan) -> Any:
    """`obj` (a chunk or a whole response) without what the agent did not ask
    for, changed in place: True if something changed, _DROP for an event the
    agent would not have got at all."""
    changed = False
    hidden = plan.hidden
    remove_ids = plan.engine == "sglang"

    def clear(holder: dict[str, Any], key: str, remove: bool) -> None:
        nonlocal changed
        if holder.get(key) is not None or (remove and key in holder):
            if remove:
                del holder[key]
            else:
                holder[key] = None
            changed = True

    choices = obj.get("choices")
    if USAGE in hidden and obj.get("usage") is not None:
        if not choices:
            return _DROP  # the usage-only event: only the proxy asked for it
        obj["usage"] = None
        changed = True
    if TOKEN_IDS in hidden:
        clear(obj, "prompt_token_ids", remove_ids)
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if TOKEN_IDS in hidden:
            clear(choice, "token_ids", remove_ids)
            clear(choice, "prompt_token_ids", remove_ids)
        if LOGPROBS in hidden:
            clear(choice, "logprobs", False)  # both engines send `"logprobs": null` when not asked
    return changed


def compact_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the engines' own pydantic serialisation writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def hide_in_body(body: bytes, plan: CapturePlan) -> bytes:
    """A non-streamed response body as the agent gets it (unchanged bytes when
    nothing was to hide, or when it is not a JSON object)."""
    try:
        obj = from_json(body)
    except ValueError:
        return body
    if not isinstance(obj, dict) or _hide(obj, plan) is not True:
        return body
    return compact_json(obj)


_BLOCK_END = re.compile(rb"\r?\n\r?\n")
_DATA = re.compile(rb"data: ?(\{.*\})(\r?\n\r?\n)\Z", re.S)


class StreamHider:
    """Fed a response stream's bytes as they arrive, returns the bytes the agent
    gets: every whole event, rewritten when it carries what the agent did not
    ask for, the same bytes otherwise; the unfinished tail waits for its end.

    When the proxy asked for the usage event, a choice's last event (its
    finish_reason) waits for the next event: vLLM then puts its
    `system_fingerprint` on the usage event instead, and the agent, which did
    not ask for usage, gets it where vLLM would have put it."""

    def __init__(self, plan: CapturePlan) -> None:
        self._plan = plan
        self._tail = b""
        self._held: tuple[dict[str, Any], bytes, bytes | None] | None = None  # a finishing event: (it, its line end, its bytes if unchanged)
        self._position = 0
        self.rewritten: list[int] = []  # positions in the stream the agent got
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes in; bytes for the agent out (b"" at the end of the stream flushes what waits)."""
        if not data:
            tail, self._tail = self._tail, b""
            return self._release() + tail  # a cut-off last event goes as it came
        buf = self._tail + data if self._tail else data
        out: list[bytes] = []
        start = 0
        for end in _BLOCK_END.finditer(buf):
            out.append(self._event(buf[start : end.end()]))
            start = end.end()
        self._tail = buf[start:]
        return b"".join(out)

    def _release(self, fingerprint: Any = None) -> bytes:
        if self._held is None:
            return b""
        (obj, end, raw), self._held = self._held, None
        if fingerprint is not None and "system_fingerprint" not in obj:
            obj["system_fingerprint"] = fingerprint
            if raw is not None:
                self.rewritten.append(self._position - 1)
                raw = None
        return raw if raw is not None else b"data: " + compact_json(obj) + end

    def _event(self, raw: bytes) -> bytes:
        match = _DATA.match(raw)
        if match is None:  # [DONE], comments, multi-line data: nothing of ours
            self._position += 1
            return self._release() + raw
        try:
            obj = from_json(match.group(1))
        except ValueError:
            obj = None
        change = _hide(obj, self._plan) if isinstance(obj, dict) else False
        if change is _DROP:
            self.dropped += 1
            return self._release(obj.get("system_fingerprint"))
        released = self._release()
        if change:
            self.rewritten.append(self._position)
        if USAGE in self._plan.hidden and isinstance(obj, dict) and _finishing(obj):
            self._held = (obj, match.group(2), None if change else raw)
            self._position += 1
            return released
        if change:
            raw = b"data: " + compact_json(obj) + match.group(2)
        self._position += 1
        return released + raw


def _finishing(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)
