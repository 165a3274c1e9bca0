"""mitmweb (and mitmproxy console) support: LLM calls shown as the chat they
carry, marked and commented, and a cap on the flows kept.

- `ChatView`, the content view "LLM chat": a chat-completions response,
  streamed or not, shown as the completion it adds up to (reasoning, content,
  tool calls with their arguments, finish reason, usage) instead of raw SSE
  events, folded by the recorder's own SSE parser and aggregator. It is the
  view mitmweb picks for the responses of LLM calls. It is written for both
  contentview APIs: mitmproxy 12's `Contentview` (text) and 11's `View`
  (styled lines).
- `WebChatView`, the addon that registers it. It also keeps a copy of the
  streamed bodies of LLM calls: llm-traj streams every one of them (the
  recorder's tee, replay's loopback), and mitmproxy keeps no body of a
  streamed response, so the view would have nothing to show.
- `WebAnnotations` marks and comments LLM flows (session, call index, mode,
  replay rung, a call held for an anti-call driver, failures), and with
  `llm_traj_web_max_flows` drops the oldest flows, so that a long run does not
  grow mitmweb's memory without bound.

Both act only where a `view` addon keeps flows (mitmweb, mitmproxy console),
not in mitmdump, except for the marks and comments, which a flow file written
by mitmdump keeps too. Both go after every other llm-traj addon: they read
what those put in `flow.metadata["llm_traj"]`, and `WebChatView` wraps the
response stream the recorder has set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Any

from mitmproxy import contentviews, ctx, exceptions, hooks, http
from mitmproxy.contentviews.base import TViewLine

from ..apis import ApiShape, api_for
from ..core.sse import SSEParser
from ..recording.builder import parse_json_body
from ..tokens.normalise import summary, tokens_from_response
from .anticalling import CALL_ID_KEY
from .options import LlmTrajOptions
from .routing import CALL_KEY, llm_call

MAX_FLOWS_OPTION = "llm_traj_web_max_flows"
_PRIORITY = 3  # above JSON (1) and GraphQL (2): the view mitmweb picks for LLM responses
# mitmproxy 12 views return text and stay registered (`remove` is gone); 11's return styled lines
_TEXT_VIEWS = hasattr(contentviews, "Contentview")

MARK_HELD = ":hourglass_flowing_sand:"
MARK_FAILED = ":x:"
MARK_MISS = ":warning:"
MARK_REPLAYED = ":repeat:"
MARK_CALL = ":memo:"
_OUR_MARKS = {MARK_HELD, MARK_FAILED, MARK_MISS, MARK_REPLAYED, MARK_CALL}


def _api_of(flow: Any) -> ApiShape | None:
    """The API shape of a flow's call: from routing's tag, or for an untagged
    flow (a flow file of another proxy) from its request."""
    if not isinstance(flow, http.HTTPFlow):
        return None
    call = llm_call(flow)
    return call.api if call is not None else api_for(flow.request.method, flow.request.path.split("?", 1)[0])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _block(title: str, text: str) -> Iterator[TViewLine]:
    yield [("header", f"{title}:")]
    for line in text.splitlines() or [""]:
        yield [("text", f"  {line}")]


def _arguments(arguments: Any) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):  # not (valid) JSON: as the model wrote it
        return _text(arguments)


def completion_lines(completion: dict[str, Any], problems: Iterable[str] = (), tokens: dict[str, Any] | None = None) -> Iterator[TViewLine]:
    """A chat completion (or an error body) as content view lines, with the
    token counts when the engine sent token ids."""
    head = "  ".join(f"{key}: {completion[key]}" for key in ("model", "id") if completion.get(key))
    if head:
        yield [("header", head)]
    if "error" in completion and "choices" not in completion:
        yield from _block("error", _text(completion["error"]))
    choices = [c for c in completion.get("choices") or [] if isinstance(c, dict)]
    for choice in choices:
        if len(choices) > 1:
            yield [("header", f"── choice {choice.get('index')}")]
        message = choice.get("message") or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning")  # vLLM/DeepSeek, OpenRouter
        if reasoning:
            yield from _block("reasoning", _text(reasoning))
        if message.get("content"):
            yield from _block("content", _text(message["content"]))
        if message.get("refusal"):
            yield from _block("refusal", _text(message["refusal"]))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            yield from _block(f"tool call {fn.get('name')} ({call.get('id')})", _arguments(fn.get("arguments")))
        yield [("header", "finish reason: "), ("text", str(choice.get("finish_reason")))]
    if completion.get("usage"):
        yield [("header", "usage: "), ("text", json.dumps(completion["usage"], ensure_ascii=False))]
    if tokens is not None:
        yield [("header", "tokens: "), ("text" if tokens["complete"] else "error", summary(tokens))]
    for problem in problems:
        yield [("error", f"problem: {problem}")]


def chat_lines(data: bytes, content_type: str | None, flow: Any, http_message: Any) -> Iterator[TViewLine] | None:
    """The response of an LLM call as the chat it carries; None for anything else."""
    api = _api_of(flow)
    if api is None or http_message is not flow.response or not data:
        return None
    if content_type == "text/event-stream":
        parser, aggregator = SSEParser(), api.new_aggregator()
        blocks = parser.feed(data) + parser.finish()
        for block in blocks:
            aggregator.add(block)
        completion, problems = aggregator.result(), aggregator.problems
        origin = [[("header", f"a stream of {sum(b.data is not None for b in blocks)} events")]]
    else:
        (completion, _), problems, origin = parse_json_body(data), [], []
    if not isinstance(completion, dict):
        return None
    return chain(origin, completion_lines(api.chat_view(completion), problems, tokens_from_response(api.name, completion)))


def _render_priority(data: bytes, flow: Any, http_message: Any) -> float:
    is_llm_response = isinstance(flow, http.HTTPFlow) and http_message is flow.response and llm_call(flow)
    return _PRIORITY if data and is_llm_response else 0


if _TEXT_VIEWS:

    class ChatView(contentviews.Contentview):
        name = "LLM chat"

        def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
            lines = chat_lines(data, metadata.content_type, metadata.flow, metadata.http_message)
            if lines is None:
                raise ValueError("not the response of an LLM call")  # mitmproxy shows why, or the raw view
            return "\n".join("".join(text for _, text in line) for line in lines)

        def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
            return _render_priority(data, metadata.flow, metadata.http_message)

else:

    class ChatView(contentviews.View):  # type: ignore[no-redef]
        name = "LLM chat"

        def __call__(
            self, data: bytes, *, content_type: str | None = None, flow=None, http_message=None, **unknown_metadata
        ):
            lines = chat_lines(data, content_type, flow, http_message)
            return None if lines is None else (self.name, lines)  # None: mitmproxy falls back to the raw view

        def render_priority(self, data: bytes, *, flow=None, http_message=None, **unknown_metadata) -> float:
            return _render_priority(data, flow, http_message)


def _view_addon():
    """The addon that keeps flows for a UI; None in mitmdump. Its hooks run
    after those of script addons (mitmweb and console add it after the
    script loader), so what we change in `response` or `error` is sent to the
    UI with the flow."""
    return ctx.master.addons.get("view")


class WebChatView:
    def __init__(self) -> None:
        self.view = ChatView()
        self._keep_bodies = False
        self._bodies: dict[str, list[bytes]] = {}  # by flow id, while streaming

    def load(self, loader) -> None:
        contentviews.add(self.view)

    def running(self) -> None:
        self._keep_bodies = _view_addon() is not None

    def done(self) -> None:
        if not _TEXT_VIEWS:
            contentviews.remove(self.view)

    def serves_flows(self) -> bool:
        return self._keep_bodies

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        inner = flow.response.stream
        if not (self._keep_bodies and inner and llm_call(flow) is not None):
            return
        kept = self._bodies[flow.id] = []
        # With token capture the view keeps what the engine sent, token ids
        # included (the agent got it without them), so it can count them.
        captured = "capture" in flow.metadata[CALL_KEY]

        def keep(data: bytes):
            out = inner(data) if callable(inner) else data
            # a callable may return a list of chunks, empty for none (b"" would end a chunked body)
            kept.append(data if captured else out if isinstance(out, bytes) else b"".join(out))
            return out

        flow.response.stream = keep

    def response(self, flow: http.HTTPFlow) -> None:
        self._store(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._store(flow)  # what arrived before the call broke off

    def _store(self, flow: http.HTTPFlow) -> None:
        kept = self._bodies.pop(flow.id, None)
        if kept is not None and flow.response is not None:
            # As sent, content-encoding included; the views decode it. The
            # body went out already: this only changes what the UI shows.
            flow.response.raw_content = b"".join(kept)


class WebAnnotations:
    def __init__(self, options: LlmTrajOptions) -> None:
        self._options = options
        self._max_flows = 0
        self._view = None
        self._saving = False  # flows go to a file (-w), where the marks and comments are kept

    def load(self, loader) -> None:
        loader.add_option(
            MAX_FLOWS_OPTION, int, 1000,
            "mitmweb / mitmproxy console: keep at most this many flows, dropping the oldest finished "
            "ones, so that a long run does not grow without bound (0: no limit).",
        )  # fmt: skip

    def serves_flows(self) -> bool:
        """Only a UI or a flow file shows the marks and comments."""
        return self._view is not None or self._saving

    def configure(self, updated: set[str]) -> None:
        if "save_stream_file" in updated:
            self._saving = bool(ctx.options.save_stream_file)
        if MAX_FLOWS_OPTION not in updated:
            return
        value = ctx.options.llm_traj_web_max_flows
        if value < 0:
            raise exceptions.OptionsError(f"{MAX_FLOWS_OPTION}={value} is negative; use a number of flows, or 0 for no limit")
        self._max_flows = value

    def running(self) -> None:
        self._view = _view_addon()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        view = self._view
        if view is None or not self._max_flows:
            return
        incoming = 0 if view.get_by_id(flow.id) else 1  # the view adds it after this hook
        excess = view.store_count() + incoming - self._max_flows
        if excess > 0:
            # Oldest first, as they came. A flow still in flight stays: removing it would kill it.
            view.remove(list(islice((f for f in view.resolve("@all") if not f.live), excess)))

    # After the other llm-traj addons' `request` (session, index, replay rung,
    # held), and again when the call ends.
    def request(self, flow: http.HTTPFlow) -> None:
        if self._annotate(flow) and self._view is not None:
            # The view has no `request` hook: without this the UI would show
            # the marks, a held call's above all, only once the call ends.
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def _annotate(self, flow: http.HTTPFlow) -> bool:
        """Whether the flow is an LLM call (and so was annotated)."""
        info = flow.metadata.get(CALL_KEY)
        if info is None:
            return False
        index = f" #{info['index']}" if "index" in info else ""
        parts = [f"llm-traj {info['session']}{index}"]
        settings = self._options.settings
        if settings is not None:
            parts.append(settings.mode)
        rung = info.get("replay")
        if rung:
            parts.append("replay miss" if rung == "miss" else f"replayed ({rung} match)")
        # Anti-call mode holds a call (tagged with its id) until a driver answers it.
        held_as = info.get(CALL_ID_KEY) if flow.response is None and flow.error is None else None
        failed = flow.error is not None or (flow.response is not None and flow.response.status_code >= 400)
        if held_as is not None:
            parts.append(f"HELD as {held_as}: waiting for a driver")
        flow.comment = ", ".join(parts)
        if not flow.marked or flow.marked in _OUR_MARKS:  # never overwrite a user's mark
            flow.marked = (
                MARK_HELD if held_as is not None else MARK_FAILED if failed else MARK_MISS if rung == "miss"
                else MARK_REPLAYED if rung else MARK_CALL
            )  # fmt: skip
        return True
