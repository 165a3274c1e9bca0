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

import re
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

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


def engine_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON written by pydantic's serialiser, as vLLM and SGLang
    write theirs (their float and escape forms, unlike `core.jsontext.compact_json`,
    Python's), so a rewritten event reads as the engine's own."""
    return to_json(obj)


def hide_in_body(body: bytes, plan: CapturePlan) -> bytes:
    """A non-streamed response body as the agent gets it (unchanged bytes when
    nothing was to hide, or when it is not a JSON object)."""
    try:
        obj = from_json(body)
    except ValueError:
        return body
    if not isinstance(obj, dict) or _hide(obj, plan) is not True:
        return body
    return engine_json(obj)


# The fast way through one compact data line (what vLLM and SGLang send): the
# event is split at each hidden key and put together again with the values
# cut out, the byte after a key's colon saying what follows. A key's closing
# quote cannot match inside a JSON string (it would be escaped there), and in
# both engines' choices `logprobs` is followed by `finish_reason`. The logprobs
# are cut first: their objects (no id keys in either engine) are then not
# scanned again for the ids. Anything else (a spaced key, a value of another
# kind) is parsed and written anew.
# Only methods that take their arguments without parsing a format (split,
# partition, join, slices) are used per event: in CPython 3.11 `find`, `rfind`
# and `startswith` cost about 1,000 instructions a call before they look at a
# byte, more than scanning the event, and `needle in data` more still (it
# tries the needle as an int first, raising and clearing a TypeError).
_IDS = b'token_ids":'  # the end of "token_ids" and of "prompt_token_ids"
_IDS_NULL = _IDS + b"null"
_LOGPROBS, _AFTER_LOGPROBS = b'"logprobs":', b',"finish_reason":'
_LOGPROBS_NULL = _LOGPROBS + b"null" + _AFTER_LOGPROBS
_NULL_LOGPROBS = b"null" + _AFTER_LOGPROBS  # a logprobs value that stays
_NULL_LOGPROBS_END = len(_NULL_LOGPROBS)
_USAGE, _NO_CHOICES = b'"usage":', b'"choices":[]'
# how vLLM's usual event ends after its ids: with the usage the proxy asked for, or none
_TOKEN_EVENT_ENDS = (b'}],"usage":null}\n\n', b"}]}\n\n")
_FINISHING = b'"finish_reason":"'
_DATA_OBJECT = b"data: {"
_LIST, _OBJECT, _NULL = b"[{n"  # (ints) what may follow a key's colon
_FINGERPRINT = re.compile(rb',"system_fingerprint":("(?:[^"\\]|\\.)*")')
_DATA = re.compile(rb"data: ?(\{.*\})(\r?\n\r?\n)\Z", re.S)


def _shown_parsed(raw: bytes, plan: CapturePlan) -> bytes | object:
    """An SSE event as the agent gets it, parsed and written anew when it
    changes (the same object when unchanged), or _DROP."""
    match = _DATA.match(raw)
    if match is None:  # [DONE], comments, multi-line data: nothing of ours
        return raw
    try:
        obj = from_json(match.group(1))
    except ValueError:
        return raw
    change = _hide(obj, plan) if isinstance(obj, dict) else False
    return change if change is _DROP else b"data: " + engine_json(obj) + match.group(2) if change else raw


class StreamHider:
    """Fed a response stream's bytes as they arrive, returns the bytes the agent
    gets: every whole event, rewritten when it carries what the agent did not
    ask for, the same bytes otherwise; the unfinished tail waits for its end.

    When the proxy asked for the usage event, a choice's last event (its
    finish_reason) waits for the next event: vLLM then puts its
    `system_fingerprint` on the usage event instead, and the agent, which did
    not ask for usage, gets it where vLLM would have put it.

    It runs on the proxy's loop for every event of a captured stream, so the
    usual chunk (one whole compact event, as engines send them token by token)
    takes a short way: no buffer, a split per hidden family, one join each; and
    vLLM's usual event, when the proxy asked for both its ids and logprobs (what
    an agent that asks for neither gets), the shortest: four partitions, one
    join (`_token_event`), also when several events come in one chunk."""

    def __init__(self, plan: CapturePlan) -> None:
        self._plan = plan
        hidden = plan.hidden
        self._ids, self._logprobs, self._usage = TOKEN_IDS in hidden, LOGPROBS in hidden, USAGE in hidden
        self._remove_ids = plan.engine == "sglang"  # SGLang leaves the key out; vLLM sends null
        self._token_events = self._logprobs and self._ids and not self._remove_ids  # vLLM's usual events: the shortest way
        self._tail = b""
        self._held: tuple[bytes, bool] | None = None  # a finishing event as shown, and whether rewritten
        self._position = 0
        self.rewritten: list[int] = []  # positions in the stream the agent got
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes in; bytes for the agent out (b"" at the end of the stream flushes what waits)."""
        if not self._tail and data.partition(b"\n")[2] == b"\n":  # the usual chunk: one whole event on one line
            if self._token_events and self._held is None and (shown := self._token_event(data)) is not None:
                return shown
            return self._event(data, True)
        if not data:
            tail, self._tail = self._tail, b""
            return self._release() + tail  # a cut-off last event goes as it came
        buf = self._tail + data if self._tail else data
        out: list[bytes] = []
        start = 0
        crlf = b"\r" in buf
        while True:  # each blank line ends an event (LF or CRLF line ends)
            lf = buf.find(b"\n\n", start)
            stop = lf + 2 if lf != -1 else -1
            if crlf and (other := buf.find(b"\n\r\n", start)) != -1 and (lf == -1 or other < lf):
                stop = other + 3
            if stop == -1:
                break
            raw = buf[start:stop]
            one_line = raw.find(b"\n") >= len(raw) - 4
            # (events that come together, as from an engine that got ahead of its reader, take the short way too)
            if one_line and self._token_events and self._held is None and (shown := self._token_event(raw)) is not None:
                out.append(shown)
            else:
                out.append(self._event(raw, one_line))
            start = stop
        self._tail = buf[start:]
        return b"".join(out)

    def _token_event(self, event: bytes) -> bytes | None:
        """vLLM's usual event (one whole data line), when the proxy asked for its
        ids and logprobs: one choice whose logprobs object and id list end the
        event, nothing else of ours in it. Shown as `_event` would show it, in
        fewer calls: four partitions and one join (b"" while a finishing event
        is held); None for any other event."""
        if event[:7] != _DATA_OBJECT:
            return None
        head, key, rest = event.partition(_LOGPROBS)
        if not key or rest[0] != _OBJECT:
            return None
        _, key, rest = rest.partition(_AFTER_LOGPROBS)
        reasons, ids, rest = rest.partition(_IDS)  # the finish and stop reasons
        if not key or not ids or rest[0] != _LIST:
            return None
        _, key, end = rest.partition(b"]")
        if end not in _TOKEN_EVENT_ENDS or head.find(_IDS) != -1 or reasons.find(_LOGPROBS) != -1:
            return None
        shown = b"".join((head, _LOGPROBS_NULL, reasons, _IDS_NULL, end))
        self.rewritten.append(self._position)
        self._position += 1
        if self._usage and reasons[:1] == b'"':  # it finishes its choice: held, as in `_event`
            self._held = (shown, True)
            return b""
        return shown

    def _release(self, fingerprint: bytes | None = None) -> bytes:
        if self._held is None:
            return b""
        (event, rewritten), self._held = self._held, None
        if fingerprint is not None and b'"system_fingerprint":' not in event:
            end = event.rfind(b"}")
            event = event[:end] + b',"system_fingerprint":' + fingerprint + event[end:]
            if not rewritten:
                self.rewritten.append(self._position - 1)
        return event

    def _event(self, raw: bytes, one_line: bool) -> bytes:
        shown = None
        if one_line and raw[:7] == _DATA_OBJECT:
            shown = self._hide_compact(raw)
        if shown is None:
            shown = _shown_parsed(raw, self._plan)
        if shown is _DROP:
            self.dropped += 1
            fingerprint = _FINGERPRINT.search(raw)
            return self._release(fingerprint.group(1) if fingerprint else None)
        released = self._release() if self._held is not None else b""
        changed = shown is not raw
        if changed:
            self.rewritten.append(self._position)
        self._position += 1
        if self._usage and shown.partition(_FINISHING)[1]:
            self._held = (shown, changed)
            return released
        return released + shown if released else shown

    def _hide_compact(self, event: bytes) -> bytes | object | None:
        """`event` (one compact data line) without what the agent did not ask
        for: the same object when nothing changes, _DROP for an event the agent
        would not have got at all, None when this cannot tell without parsing."""
        if self._usage:
            _, key, usage = event.rpartition(_USAGE)  # a top-level key, after the choices
            if key:
                follows = usage[0]
                if follows == _OBJECT:
                    return _DROP if _NO_CHOICES in event else None
                if follows != _NULL:
                    return None
        if self._logprobs:  # first: the ids are then looked for in what is left
            parts = event.split(_LOGPROBS)
            if len(parts) == 2:  # one choice, the usual: no loop (with the ids below, 0.2 µs an event less)
                part = parts[1]
                if part[0] == _OBJECT:
                    _, after, part = part.partition(_AFTER_LOGPROBS)
                    if not after:
                        return None
                    event = parts[0] + _LOGPROBS_NULL + part
                elif part[:_NULL_LOGPROBS_END] != _NULL_LOGPROBS:
                    return None
            elif len(parts) > 2:
                changed = False
                for i in range(1, len(parts)):
                    part = parts[i]
                    if not part:  # two keys in a row: not JSON (the parser says so)
                        return None
                    follows = part[0]
                    if follows == _OBJECT:
                        _, after, parts[i] = part.partition(_AFTER_LOGPROBS)
                        if not after:
                            return None
                        changed = True
                    elif part[:_NULL_LOGPROBS_END] == _NULL_LOGPROBS:
                        parts[i] = part[_NULL_LOGPROBS_END:]
                    else:
                        return None
                if changed:
                    event = _LOGPROBS_NULL.join(parts)
        if self._ids:
            parts = event.split(_IDS)
            if len(parts) == 2 and not self._remove_ids:  # vLLM's one choice, as above
                part = parts[1]
                follows = part[0]
                if follows == _LIST:
                    _, end, part = part.partition(b"]")
                    if not end:
                        return None
                    event = parts[0] + _IDS_NULL + part
                elif follows != _NULL:
                    return None
            elif len(parts) > 1:
                changed = False
                remove = self._remove_ids
                for i in range(1, len(parts)):
                    part = parts[i]
                    if not part:  # (as above)
                        return None
                    follows = part[0]
                    if follows == _LIST:
                        _, end, parts[i] = part.partition(b"]")
                        if not end:
                            return None
                        changed = True
                        if remove:  # the key goes with the comma before it
                            parts[i - 1], comma, _ = parts[i - 1].rpartition(b',"')
                            if not comma:
                                return None
                    elif follows == _NULL and not remove:
                        parts[i] = part[4:]
                    else:
                        return None
                if changed:
                    event = (b"" if remove else _IDS_NULL).join(parts)
        return event
