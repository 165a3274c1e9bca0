"""mitmweb support with mitmproxy's own test helpers: the "LLM chat" content
view on the stand-in's real responses, annotations of LLM flows, the body copy
of streamed calls, and the flow cap on a real `View`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from llmtraj.mitm.anticalling import CALL_ID_KEY
from llmtraj.mitm.options import LlmTrajOptions, Settings
from llmtraj.mitm.routing import CALL_KEY
from llmtraj.mitm.webview import (
    MARK_CALL,
    MARK_FAILED,
    MARK_HELD,
    MARK_REPLAYED,
    ChatView,
    WebAnnotations,
    WebChatView,
)
from llmtraj.testing.standin import ANSWER, FIXTURES, REASONING, TEXT
from mitmproxy import contentviews
from mitmproxy.exceptions import OptionsError
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

MESSAGES = [{"role": "user", "content": "Say hello"}]


def standin_body(upstream, scenario: str, stream: bool) -> tuple[bytes, str]:
    body = {"model": f"standin-{scenario}", "messages": MESSAGES, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}  # fmt: skip
    r = httpx.post(f"{upstream.url}/v1/chat/completions", json=body)
    return r.content, r.headers["content-type"]


def llm_flow(content: bytes = b"", content_type: str = "application/json", tagged: bool = True, **info):
    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = "POST", "/v1/chat/completions"
    flow.response.headers["content-type"] = content_type
    flow.response.content = content
    if tagged:
        flow.metadata[CALL_KEY] = {"session": "s1", "api": "chat.completions", **info}
    return flow


TEXT_VIEWS = hasattr(contentviews, "prettify_message")  # mitmproxy 12's contentview API


def registered_view():
    return contentviews.registry.get(ChatView.name.lower()) if TEXT_VIEWS else contentviews.get(ChatView.name)


@pytest.fixture
def chat_view():
    """The view registered by its addon, and unregistered again where mitmproxy can (11; 12 has no
    removal: a reloaded addon's view replaces the old one under the same name)."""
    addon = WebChatView()
    with taddons.context(addon) as tctx:
        assert registered_view() is addon.view
        yield addon
        tctx.master.addons.remove(addon)
    if not TEXT_VIEWS:
        assert registered_view() is None


def shown(flow, message=None, view: str = "auto") -> tuple[str, str]:
    """(the view's name, its text) of what mitmweb shows for the message (the response by default)."""
    message = flow.response if message is None else message
    if TEXT_VIEWS:
        result = contentviews.prettify_message(message, flow, view_name=view)
        return result.view_name, result.text
    description, lines, error = contentviews.get_message_content_view(view, message, flow)
    assert error is None
    return description, "\n".join("".join(text for _, text in line) for line in lines)


def test_stream_shown_as_the_completion(upstream, chat_view):
    description, text = shown(llm_flow(*standin_body(upstream, "tools", stream=True), index=1))
    assert description == "LLM chat" and text.startswith("a stream of ")
    assert "data:" not in text
    assert "tool call get_weather (call_standin_0):" in text
    assert '    "city": "Paris",' in text  # the arguments as indented JSON
    assert "tool call get_time (call_standin_1):" in text
    assert "finish reason: tool_calls" in text
    assert '"prompt_tokens": 10' in text and "model: standin-tools" in text

    _, text = shown(llm_flow(*standin_body(upstream, "reasoning", stream=True)))
    assert text.index("reasoning:") < text.index(REASONING.split()[0]) < text.index("content:") < text.index(ANSWER)


def test_json_completion_and_error(upstream, chat_view):
    description, text = shown(llm_flow(*standin_body(upstream, "text", stream=False)))
    assert description == "LLM chat"
    assert f"content:\n  {TEXT}" in text and "finish reason: stop" in text
    _, text = shown(llm_flow(*standin_body(upstream, "n", stream=True)))
    assert "── choice 0" in text and "── choice 1" in text
    _, text = shown(llm_flow(*standin_body(upstream, "error500", stream=False)))
    assert "error:" in text and "simulated 500" in text


def test_stream_problems_are_shown(chat_view):
    body = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: {"error":{"message":"overloaded"}}\n\n'
    _, text = shown(llm_flow(body, "text/event-stream"))
    assert "content:\n  Hi" in text and "problem: error event:" in text and "overloaded" in text


STREAMS = FIXTURES


@pytest.mark.parametrize(
    ("api", "path", "folder", "expected"),
    [
        ("anthropic.messages", "/v1/messages", "anthropic",
         ["reasoning:\n  The user asks", "content:\n  Let me look up Apple", "tool call get_stock_price (toolu_",
          '"ticker": "AAPL"', "finish reason: tool_calls"]),
        ("responses", "/v1/responses", "responses",
         ["reasoning:\n  **Listing directory contents**", "content:\n  I'll list", "tool call shell (call_"]),
    ],
)  # fmt: skip
def test_other_apis_are_shown_as_chat(chat_view, api, path, folder, expected):
    name = "thinking_tool_use" if folder == "anthropic" else "reasoning_function_call"
    for content, content_type in (((STREAMS / folder / f"{name}.sse").read_bytes(), "text/event-stream"),
                                  ((STREAMS / folder / f"{name}.expected.json").read_bytes(), "application/json")):  # fmt: skip
        flow = llm_flow(content, content_type, api=api)
        flow.request.path = path
        description, text = shown(flow)
        assert description == "LLM chat"
        assert all(part in text for part in expected), text


def test_other_flows_keep_their_views(upstream, chat_view):
    content, content_type = standin_body(upstream, "text", stream=False)
    untagged = llm_flow(content, content_type, tagged=False)
    assert shown(untagged)[0] == "JSON"  # not picked for flows llm-traj did not route
    description, text = shown(untagged, view=ChatView.name)
    assert description == "LLM chat" and f"content:\n  {TEXT}" in text  # but there when chosen
    tagged = llm_flow(content, content_type)
    assert shown(tagged, tagged.request)[0] != "LLM chat"
    other = tflow.tflow(resp=True)
    other.response.content = content
    description, text = shown(other, view=ChatView.name)
    assert "Couldn't parse" in description + text  # not a chat completions call


def test_streamed_bodies_are_kept_for_the_view():
    view, chat_view = View(), WebChatView()
    with taddons.context(view, chat_view) as tctx:
        chat_view.running()
        flow = llm_flow(index=1)
        flow.response.content = None  # streamed: mitmproxy keeps no body
        flow.response.stream = lambda data: data.replace(b"x", b"y")  # the recorder's tee, say
        view.add([flow])
        chat_view.responseheaders(flow)
        assert flow.response.stream(b"data: x\n\n") == b"data: y\n\n"  # still passes what the tee returns
        assert flow.response.stream(b"") == b""
        chat_view.response(flow)
        assert flow.response.raw_content == b"data: y\n\n"
        tctx.master.addons.remove(chat_view)


def test_token_capture_keeps_the_engines_bytes_and_the_view_counts_the_tokens(upstream):
    view, chat_view = View(), WebChatView()
    with taddons.context(view, chat_view) as tctx:
        chat_view.running()
        flow = llm_flow(index=1, capture={"engine": "vllm"})
        flow.response.content = None
        flow.response.headers["content-type"] = "text/event-stream"
        flow.response.stream = lambda data: [data.replace(b"[1", b"[9")] if data else []  # the rewriting: a list
        view.add([flow])
        chat_view.responseheaders(flow)
        body = {"model": "standin-text", "messages": MESSAGES, "stream": True, "return_token_ids": True,
                "logprobs": True, "stream_options": {"include_usage": True}}  # fmt: skip
        engine = httpx.post(f"{upstream.url}/v1/chat/completions", json=body).content
        assert flow.response.stream(engine) != [engine] and flow.response.stream(b"") == []  # the agent's, as listed
        chat_view.response(flow)
        assert flow.response.raw_content == engine
        _, text = shown(flow)
        assert "tokens: prompt 10, completion 13 (complete)" in text
        tctx.master.addons.remove(chat_view)


def test_no_body_copy_without_a_view(chat_view):
    chat_view.running()  # mitmdump: no view addon
    flow = llm_flow(index=1)
    flow.response.stream = True
    chat_view.responseheaders(flow)
    assert flow.response.stream is True


@pytest.fixture
def options(tmp_path: Path) -> LlmTrajOptions:
    options = LlmTrajOptions()
    options.settings = Settings(mode="replay", path=tmp_path, default_session="default")
    return options


def test_annotations(options, tmp_path):
    annotations = WebAnnotations(options)
    view = View()
    with taddons.context(view, annotations):
        annotations.running()
        replayed = llm_flow(index=3, replay="exact")
        view.add([replayed])
        annotations.response(replayed)
        assert replayed.comment == "llm-traj s1 #3, replay, replayed (exact match)"
        assert replayed.marked == MARK_REPLAYED

        options.settings = Settings(mode="anticall", path=tmp_path, default_session="default")
        held = tflow.tflow()
        held.metadata[CALL_KEY] = {"session": "s2", "api": "chat.completions", "index": 1, CALL_ID_KEY: "s2:1"}
        view.add([held])
        sent = []

        def on_update(flow):  # the signal keeps a weak reference to a function
            sent.append(flow)

        view.sig_view_update.connect(on_update)
        annotations.request(held)
        assert held.comment == "llm-traj s2 #1, anticall, HELD as s2:1: waiting for a driver"
        assert held.marked == MARK_HELD
        assert sent == [held]  # shown at once, not when the call ends
        held.response = tflow.tresp()
        annotations.response(held)  # answered
        assert held.marked == MARK_CALL and "HELD" not in held.comment

        failed = llm_flow(index=2)
        failed.response.status_code = 500
        annotations.response(failed)
        assert failed.marked == MARK_FAILED

        user_marked = llm_flow(index=4)
        user_marked.marked = ":star:"
        annotations.response(user_marked)
        assert user_marked.marked == ":star:" and user_marked.comment.startswith("llm-traj s1 #4")

        other = tflow.tflow(resp=True)
        annotations.response(other)
        assert other.marked == "" and other.comment == ""


def test_flow_cap_drops_the_oldest_finished_flows(options):
    annotations = WebAnnotations(options)
    view = View()
    with taddons.context(view, annotations) as tctx:
        tctx.configure(annotations, llm_traj_web_max_flows=5)
        annotations.running()
        flows = [tflow.tflow(resp=True) for _ in range(12)]
        for flow in flows:
            flow.live = flow is flows[1]  # one old call still in flight
        for flow in flows:
            annotations.requestheaders(flow)  # before the view's hook adds the flow, as in mitmweb
            view.add([flow])
        assert view.store_count() == 5
        assert [f.id for f in view.resolve("@all")] == [flows[1].id] + [f.id for f in flows[-4:]]

        tctx.configure(annotations, llm_traj_web_max_flows=0)  # no limit
        for flow in [tflow.tflow(resp=True) for _ in range(3)]:
            annotations.requestheaders(flow)
            view.add([flow])
        assert view.store_count() == 8


def test_flow_cap_needs_a_view(options):
    annotations = WebAnnotations(options)
    with taddons.context(annotations) as tctx:
        tctx.configure(annotations, llm_traj_web_max_flows=1)
        annotations.running()
        assert not annotations.serves_flows()  # mitmdump: no view to trim, so no hook runs
        annotations.requestheaders(tflow.tflow(resp=True))


def test_negative_flow_cap_is_refused_and_rolled_back(options):
    annotations = WebAnnotations(options)
    with taddons.context(annotations) as tctx:
        tctx.configure(annotations, llm_traj_web_max_flows=5)
        with pytest.raises(OptionsError, match="llm_traj_web_max_flows=-1 is negative; use a number of flows"):
            tctx.configure(annotations, llm_traj_web_max_flows=-1)
        assert tctx.options.llm_traj_web_max_flows == 5
