"""The mitmproxy edge in-process, with mitmproxy's own test helpers (taddons,
tflow): the hook dispatcher, options validated with mitmproxy's rollback, the
commands, and each mode's hooks driven as mitmproxy drives them (streamed
bodies fed through the `stream` callables the addon installs). The e2e tests
run the same addon in a real mitmdump."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import httpx
import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook, HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook,
)  # fmt: skip
from mitmproxy.test import taddons, tflow, tutils

from llmtraj.anticall import AntiCallClient
from llmtraj.apis import API_BY_NAME
from llmtraj.mitm.addon import LlmTraj, _chain, make_addons
from llmtraj.mitm.routing import CALL_KEY

from ..conftest import wait_records

CHAT = API_BY_NAME["chat.completions"]
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# --- the dispatcher ----------------------------------------------------------------


class Part:
    """A part that notes its calls, failing (sync or async) where told to."""

    def __init__(self, name: str, calls: list[str], fail: str | None = None, is_async: bool = False,
                 serving: bool = True) -> None:  # fmt: skip
        self.name, self.calls, self.fail, self.is_async, self.serving = name, calls, fail, is_async, serving

    def serves_flows(self) -> bool:
        return self.serving

    def request(self, flow):
        if not self.is_async:
            return self._act(flow)

        async def later():
            await asyncio.sleep(0)
            self._act(flow)

        return later()

    def _act(self, flow) -> None:
        self.calls.append(self.name)
        if self.fail == "error":
            raise RuntimeError(f"{self.name} broke")
        if self.fail == "options":
            raise exceptions.OptionsError(f"{self.name}: bad option")
        if self.fail == "halt":
            raise exceptions.AddonHalt()


def test_a_failing_part_skips_no_other_part(caplog):
    calls: list[str] = []
    parts = [Part("a", calls, fail="error"), Part("b", calls, is_async=True, fail="error"), Part("c", calls, is_async=True),
             Part("d", calls, fail="error"), Part("e", calls)]  # fmt: skip
    chain = _chain("request", [p.request for p in parts])
    with caplog.at_level(logging.ERROR, logger="llm_traj"):
        pending = chain(tflow.tflow())
        assert calls == ["a"]  # b's answer is awaited before the parts after it run
        run(pending)
    assert calls == ["a", "b", "c", "d", "e"]
    failed = [r.getMessage() for r in caplog.records]
    assert failed == ["llm-traj: request hook of Part failed"] * 3 and all(r.exc_info for r in caplog.records)


def test_running_freezes_what_start_up_built():
    """Once the proxy runs, what it built at start-up is out of the cyclic
    collector's passes (they walked it on every call's hot path)."""
    made_at_start_up = {"options": [1, 2, 3]}
    addon = LlmTraj([])
    gc.unfreeze()
    try:
        assert any(obj is made_at_start_up for obj in gc.get_objects())
        addon.running()
        assert gc.get_freeze_count() > 0
        assert not any(obj is made_at_start_up for obj in gc.get_objects())  # frozen: in no generation
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("fail,exc", [("options", exceptions.OptionsError), ("halt", exceptions.AddonHalt)])
def test_options_error_and_addon_halt_reach_mitmproxy(is_async, fail, exc):
    calls: list[str] = []
    chain = _chain("request", [Part("a", calls, is_async=is_async).request,
                               Part("b", calls, fail=fail, is_async=is_async).request, Part("c", calls).request])  # fmt: skip
    with pytest.raises(exc):
        result = chain(tflow.tflow())
        if result is not None:
            run(result)
    assert calls == ["a", "b"]  # as mitmproxy's safecall: the event stops there


class Switch:
    """A part serving flows only while `llm_traj_mode` is replay."""

    def __init__(self, calls: list[str]) -> None:
        self.calls, self.on = calls, False

    def load(self, loader):
        loader.add_option("llm_traj_mode", str, "record", "mode")

    def configure(self, updated):
        if "llm_traj_mode" in updated:
            if ctx.options.llm_traj_mode == "bad":
                raise exceptions.OptionsError("llm_traj_mode=bad is not a mode")
            self.on = ctx.options.llm_traj_mode == "replay"

    def serves_flows(self) -> bool:
        return self.on

    def request(self, flow):
        self.calls.append("switch")


def test_configure_rebuilds_the_flow_hooks_and_rolls_back_a_bad_value(caplog):
    calls: list[str] = []
    addon = LlmTraj([Switch(calls), Part("always", calls)])

    async def main():
        with taddons.context(addon) as tctx:
            addon.request(tflow.tflow())
            tctx.configure(addon, llm_traj_mode="replay")
            addon.request(tflow.tflow())
            with caplog.at_level(logging.ERROR, logger="llm_traj"):
                tctx.configure(addon, llm_traj_mode="bad")  # before `running`: one line, not an exception
            assert [r.getMessage() for r in caplog.records] == ["llm-traj: llm_traj_mode=bad is not a mode"]
            tctx.configure(addon, llm_traj_mode="replay")
            await tctx.master.running()
            with pytest.raises(exceptions.OptionsError, match="llm_traj_mode=bad"):
                tctx.configure(addon, llm_traj_mode="bad")  # running: mitmproxy rolls it back
            assert tctx.options.llm_traj_mode == "replay"
            addon.request(tflow.tflow())
            tctx.configure(addon, llm_traj_mode="record")
            addon.request(tflow.tflow())
            await tctx.master.done()

    run(main())
    assert calls == ["always", "switch", "always", "switch", "always", "always"]
    # (with "bad" set before `running`, the chains were rebuilt as they were: still serving)


# --- the whole addon, as mitmproxy runs it -------------------------------------------------


def chat_flow(path: str = "/v1/chat/completions", body: dict = REQUEST) -> http.HTTPFlow:
    request = tutils.treq(method=b"POST", scheme=b"https", host="upstream.test", port=443, path=path.encode(),
                          headers=http.Headers(content_type="application/json"), content=json.dumps(body).encode())  # fmt: skip
    return tflow.tflow(req=request)


def get_flow(path: str, host: str = "address", port: int = 22) -> http.HTTPFlow:
    return tflow.tflow(req=tutils.treq(method=b"GET", host=host, port=port, path=path.encode(), headers=http.Headers(),
                                       content=b""))  # fmt: skip


async def exchange(tctx: taddons.context, flow: http.HTTPFlow, upstream: http.Response | None = None) -> http.HTTPFlow:
    """One call through every addon's hooks, bodies streamed through the
    addon's `stream` callables as mitmproxy streams them; `upstream` answers
    unless an addon did."""
    trigger = tctx.master.addons.trigger_event
    await trigger(HttpRequestHeadersHook(flow))
    if flow.response is None and callable(flow.request.stream):
        for piece in (flow.request.raw_content, b""):
            flow.request.stream(piece)
    if flow.response is None:
        await trigger(HttpRequestHook(flow))
    if flow.response is None and upstream is not None:
        body = upstream.raw_content
        flow.response = upstream
        await trigger(HttpResponseHeadersHook(flow))
        if callable(flow.response.stream):
            for piece in (body, b""):
                flow.response.stream(piece)
        await trigger(HttpResponseHook(flow))
    return flow


class Proxy:
    """The addon as `mitmdump -s addon/llm_traj.py` loads it, in taddons, running."""

    def __init__(self, **options) -> None:
        self.addon = make_addons()[0]
        self.options = options

    async def __aenter__(self) -> taddons.context:
        self.tctx = taddons.context(Proxyserver(), self.addon)
        self.tctx.configure(self.addon, **self.options)
        await self.tctx.master.running()
        return self.tctx

    async def __aexit__(self, *exc) -> None:
        await self.tctx.master.done()  # (also takes mitmproxy's log handler off this loop)


def completion(text: str) -> http.Response:
    return http.Response.make(200, json.dumps(CHAT.completion_from_text(REQUEST, text)), {"content-type": "application/json"})


def test_record_then_replay_in_process(tmp_path, caplog):
    async def record():
        async with Proxy(llm_traj_path=str(tmp_path)) as tctx:
            assert tctx.options.connection_strategy == "eager"  # record mode keeps the user's (here mitmproxy's) value
            flow = await exchange(tctx, chat_flow("/s/one/v1/chat/completions"), completion("hello"))
            assert flow.request.path == "/v1/chat/completions" and flow.metadata[CALL_KEY]["session"] == "one"

    run(record())
    (recorded,) = wait_records(tmp_path / "one.jsonl", 1)
    assert recorded.request == REQUEST and recorded.response["choices"][0]["message"]["content"] == "hello"

    async def replay():
        async with Proxy(llm_traj_path=str(tmp_path), llm_traj_mode="replay") as tctx:
            assert tctx.options.connection_strategy == "lazy"
            flow = await exchange(tctx, chat_flow("/s/one/v1/chat/completions"))
            assert flow.is_replay == "response" and flow.metadata[CALL_KEY]["replay"] == "exact"
            assert json.loads(flow.response.content)["choices"][0]["message"]["content"] == "hello"
            miss = await exchange(tctx, chat_flow("/s/one/v1/chat/completions", {**REQUEST, "model": "other"}))
            assert miss.response.status_code == 400 and miss.is_replay is None
            report = await exchange(tctx, get_flow("/llm-traj/replay-report"))
            assert json.loads(report.response.content)["sessions"]["one"]["served"] == 1
            lines = tctx.master.commands.call("llm_traj.replay.report")
            assert lines.startswith("replay report: 1 of 1 recorded calls served, 1 misses")
            with pytest.raises(exceptions.OptionsError, match="connection_strategy=eager: llm_traj_mode=replay"):
                tctx.configure(tctx.master.addons.get("llmtraj"), connection_strategy="eager")
            assert tctx.options.connection_strategy == "lazy"

    with caplog.at_level(logging.INFO, logger="llm_traj"):
        run(replay())
    assert "llm-traj: connection_strategy=lazy, as llm_traj_mode=replay answers calls without an upstream connection" \
        in [r.getMessage() for r in caplog.records]  # fmt: skip


def test_a_bad_value_at_runtime_is_refused_and_recording_goes_on(tmp_path):
    async def main():
        async with Proxy(llm_traj_path=str(tmp_path), llm_traj_retries=2) as tctx:
            for name, value, message in [
                ("llm_traj_retries", "99", "llm_traj_retries=99 must be between 0 and 20"),
                ("llm_traj_mode", "fast", "llm_traj_mode='fast' is not a mode"),
                ("llm_traj_control_port", "70000", "llm_traj_control_port is only used with llm_traj_mode=anticall"),
                ("llm_traj_control_port", "x", "(?i)not an integer"),
                ("llm_traj_upstream_idle_timeout", "-1", r"llm_traj_upstream_idle_timeout='-1' is not a number of seconds >= 0 \(0: no limit\)"),
                ("llm_traj_upstream_idle_timeout", "soon", "llm_traj_upstream_idle_timeout='soon' is not a number of seconds"),
            ]:
                with pytest.raises(exceptions.CommandError, match=message):
                    tctx.master.commands.call("set", name, value)  # what `:set` runs in the console
            assert (tctx.options.llm_traj_retries, tctx.options.llm_traj_mode, tctx.options.llm_traj_control_port) == (2, "record", 0)
            await exchange(tctx, chat_flow(), completion("still recorded"))

    run(main())
    (record,) = wait_records(tmp_path / "default.jsonl", 1)
    assert record.response["choices"][0]["message"]["content"] == "still recorded"


def test_anticall_in_process_with_its_commands(tmp_path):
    async def main():
        async with Proxy(llm_traj_path=str(tmp_path), llm_traj_mode="anticall") as tctx:
            commands = tctx.master.commands
            flow = await exchange(tctx, chat_flow("/s/a/v1/chat/completions"))
            assert flow.request.host == "127.0.0.1" and flow.response is None  # pointed at the loopback server
            (line,) = commands.call("llm_traj.calls.held")
            assert line.startswith("a:1 chat.completions pending, held ")
            async with AntiCallClient.from_control_file(tmp_path / "control.json") as driver, httpx.AsyncClient() as http_client:
                event = await driver.get_request("a", 5)
                assert event.request == REQUEST
                await driver.send_response(event, "from the driver")
                answered = await http_client.post(flow.request.url)  # as mitmproxy would connect to it
                assert answered.json()["choices"][0]["message"]["content"] == "from the driver"
                second = await exchange(tctx, chat_flow("/s/a/v1/chat/completions"))
                commands.call("llm_traj.session.end", "a")
                refused = await http_client.post(second.request.url)
                assert refused.status_code == 410
                assert commands.call("llm_traj.calls.held") == []
                with pytest.raises(exceptions.CommandError, match="session"):
                    commands.call("llm_traj.session.end", "../x")
            with pytest.raises(exceptions.CommandError, match="not replaying"):
                commands.call("llm_traj.replay.report")

    run(main())


def test_endpoints_and_routing(tmp_path):
    config = tmp_path / "upstreams.toml"
    config.write_text('[providers.local]\nbase_url = "http://127.0.0.1:9/v1"\n\n[models.m]\nprovider = "local"\n')

    async def main():
        async with Proxy(llm_traj_path=str(tmp_path / "t"), llm_traj_config=str(config)) as tctx:
            assert tctx.options.connection_strategy == "lazy"  # a configured route needs it, even in record mode
            health = await exchange(tctx, get_flow("/llm-traj/health"))
            assert json.loads(health.response.content)["routes"] == [{"name": "local", "url": "http://127.0.0.1:9/v1"}]
            assert (await exchange(tctx, get_flow("/v1/models"))).response is None  # another host's (HTTPS_PROXY)
            models = json.loads((await exchange(tctx, get_flow("/v1/models", "127.0.0.1", 9))).response.content)
            assert [m["id"] for m in models["data"]] == ["m"]
            unknown = await exchange(tctx, get_flow("/v1/models/nope", "127.0.0.1", 9))
            assert unknown.response.status_code == 404
            report = await exchange(tctx, get_flow("/llm-traj/replay-report"))
            assert report.response is None  # not replaying: not ours to answer
            routed = await exchange(tctx, chat_flow())
            assert routed.request.url == "http://127.0.0.1:9/v1/chat/completions"  # mitmproxy forwards it there
            assert routed.metadata[CALL_KEY]["upstream"] == {"route": "local", "url": routed.request.url}
            unconfigured = await exchange(tctx, chat_flow(body={**REQUEST, "model": "other"}))
            assert unconfigured.response.status_code == 404
            assert json.loads(unconfigured.response.content)["error"]["code"] == "model_not_found"
            bad_session = await exchange(tctx, chat_flow("/s/..x/v1/chat/completions"))
            assert bad_session.response.status_code == 400
            assert json.loads(bad_session.response.content)["error"]["code"] == "invalid_session"

    run(main())


def test_commands_are_collected_by_mitmproxy():
    async def main():
        with taddons.context(make_addons()[0]) as tctx:
            await tctx.master.done()
            return set(tctx.master.commands.commands)

    names = run(main())
    assert {"llm_traj.session.end", "llm_traj.calls.held", "llm_traj.replay.report"} <= names


def test_unknown_option_names_are_still_caught(tmp_path, caplog):
    async def main():
        addon = make_addons()[0]
        with taddons.context(Proxyserver(), addon) as tctx:
            tctx.options.update_defer(llm_traj_sesion="x")
            tctx.configure(addon, llm_traj_path=str(tmp_path))
            with caplog.at_level(logging.ERROR, logger="llm_traj"):
                await tctx.master.running()
            await tctx.master.done()

    run(main())
    (message,) = [r.getMessage() for r in caplog.records if r.name == "llm_traj"]
    assert message.startswith("llm-traj: unknown option(s) llm_traj_sesion; known: llm_traj_")
    assert " llm_traj_session," in message  # the name it was probably meant to be is listed


def test_flow_metadata_is_json(tmp_path):
    """What the parts put in `flow.metadata["llm_traj"]` (shown in mitmweb, saved by -w) is JSON-able."""

    async def main():
        async with Proxy(llm_traj_path=str(tmp_path)) as tctx:
            flow = await exchange(tctx, chat_flow(), completion("x"))
            return flow.metadata[CALL_KEY]

    info = run(main())
    assert json.loads(json.dumps(info)) == info and set(info) == {"session", "api", "index"}


def test_a_body_of_known_length_passes_whole_and_is_handed_over_with_its_last_byte(tmp_path):
    """The recorder's stream function passes a JSON answer on as it came (no
    byte held back to be sent as a second piece), and has handed the capture to
    the writer before that last byte goes to the agent."""
    from llmtraj.mitm.recording import Recorder

    async def main():
        async with Proxy(llm_traj_path=str(tmp_path)) as tctx:
            (recorder,) = [p for p in tctx.master.addons.get("llmtraj").parts if isinstance(p, Recorder)]
            trigger = tctx.master.addons.trigger_event
            flow = chat_flow()
            await trigger(HttpRequestHeadersHook(flow))
            for piece in (flow.request.raw_content, b""):
                flow.request.stream(piece)
            await trigger(HttpRequestHook(flow))
            flow.response = completion("hello")
            body = flow.response.raw_content
            await trigger(HttpResponseHeadersHook(flow))
            head, last = body[:-1], body[-1:]
            assert flow.response.stream(head) == head and recorder._sink.sent == 0
            assert flow.response.stream(last) == last and recorder._sink.sent == 1
            assert not flow.response.stream(b"")
            await trigger(HttpResponseHook(flow))
            assert recorder._sink.sent == 1

    run(main())
    (recorded,) = wait_records(tmp_path / "default.jsonl", 1)
    assert recorded.complete and recorded.response["choices"][0]["message"]["content"] == "hello"


def test_a_mitmproxy_whose_internals_moved_keeps_its_own_error_pages(monkeypatch, caplog):
    """An internal `proxy_errors` patches that this mitmproxy lacks is left alone, with a warning (the agent
    gets mitmproxy's page), the others are patched; an HTTP/2 error it cannot place gets mitmproxy's page."""
    from mitmproxy.proxy.layers.http import _http1, _http2

    from llmtraj.mitm import proxy_errors

    monkeypatch.delattr(_http1, "make_error_response")
    original = _http2.Http2Server._handle_event
    errors = proxy_errors.OpenAIShapedProxyErrors()
    with caplog.at_level(logging.WARNING, "llm_traj"):
        errors.load(None)
    try:
        assert "has no mitmproxy.proxy.layers.http._http1.make_error_response" in caplog.text
        assert not hasattr(_http1, "make_error_response") and _http2.Http2Server._handle_event is not original
    finally:
        errors.done()
    assert _http2.Http2Server._handle_event is original
    assert proxy_errors._stream_answer(object(), 1) is None
