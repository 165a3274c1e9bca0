"""Upstream routing end to end: a real mitmdump with an `llm_traj_config`, two
stand-in upstreams, the real openai SDK (its own retries off, so the proxy's
are what is seen)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from llmtraj.cli.proxy_process import ADDON_SCRIPT, ProxyProcess, mitm_program
from llmtraj.testing.standin import StandinUpstream, make_self_signed_cert
from openai import OpenAI

from ..conftest import wait_records
from ..sdk_http import broken_stream_error

REAL_KEY = "sk-real-provider-key-0123456789"
DUMMY_KEY = "sk-agent-dummy-key-42"
FAST_BACKOFF = "backoff = {initial = 0.01, max = 0.02}"


@pytest.fixture(scope="module")
def upstream_a():
    with StandinUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def upstream_b():
    with StandinUpstream() as up:
        yield up


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def routed(upstream_a, upstream_b, tmp_path_factory, monkeypatch_module):
    """A proxy routing `gpt-a` (alias `a-alias`, rewritten to `standin-text`)
    to upstream A with the real key injected, anything else to B (the default
    route), which retries twice."""
    monkeypatch_module.setenv("LLM_TRAJ_TEST_A_KEY", REAL_KEY)
    root = tmp_path_factory.mktemp("routed")
    config = write_config(root / "upstreams.toml", f"""
default_route = "b"

[providers.a]
base_url = "{upstream_a.url}/v1"
api_key_env = "LLM_TRAJ_TEST_A_KEY"

[providers.b]
base_url = "{upstream_b.url}/v1"
kind = "vllm"
retries = 2
{FAST_BACKOFF}

[models."gpt-a"]
provider = "a"
upstream_model = "standin-text"
aliases = ["a-alias"]
context_length = 128000
tools = true
vision = false

[models."Qwen/Qwen3-32B"]
provider = "b"
upstream_model = "standin-tools"
streaming = true
""")
    # The reverse target is neither upstream: every LLM call must be routed by the config.
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_path": root / "traj", "llm_traj_config": config}) as proxy:
        proxy.traj = root / "traj"
        yield proxy


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def client(proxy, session: str, **kw) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=DUMMY_KEY, max_retries=0, **kw)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stream", [False, True])
def test_routes_by_model_with_the_real_key_and_the_upstream_model(routed, upstream_a, upstream_b, session, stream):
    before_a, before_b = len(upstream_a.requests), len(upstream_b.requests)
    reply = client(routed, session).chat.completions.create(model="a-alias", messages=MESSAGES, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.choices[0].message.content
    assert text.startswith("Hello! I am the standin upstream")
    assert len(upstream_a.requests) == before_a + 1 and len(upstream_b.requests) == before_b
    seen = upstream_a.requests[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {REAL_KEY}"  # the agent's dummy replaced
    assert json.loads(seen.body)["model"] == "standin-text"  # rewritten for the upstream

    [record] = wait_records(routed.traj / f"{session}.jsonl", 1)
    assert record.request["model"] == "a-alias"  # the record keeps the call as the agent made it
    assert record.upstream.route == "a" and record.upstream.url == f"{upstream_a.url}/v1/chat/completions"
    assert record.upstream.model == "standin-text"
    assert record.stream is stream and record.response["choices"][0]["message"]["content"] == text
    raw = (routed.traj / f"{session}.jsonl").read_bytes()
    assert REAL_KEY.encode() not in raw and DUMMY_KEY.encode() not in raw
    assert REAL_KEY not in routed.output()  # nor logged


def test_other_models_take_the_default_route_with_the_agents_key(routed, upstream_b, session):
    reply = client(routed, session).chat.completions.create(model="standin-reasoning", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello there, from the reasoning scenario."
    assert upstream_b.requests[-1].header("authorization") == f"Bearer {DUMMY_KEY}"  # no key configured for b
    assert json.loads(upstream_b.requests[-1].body)["model"] == "standin-reasoning"


def test_a_model_name_with_a_slash_routes_and_is_listed(routed, upstream_b, session):
    reply = client(routed, session).chat.completions.create(model="Qwen/Qwen3-32B", messages=MESSAGES)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert json.loads(upstream_b.requests[-1].body)["model"] == "standin-tools"
    model = client(routed, session).models.retrieve("Qwen/Qwen3-32B")
    assert model.id == "Qwen/Qwen3-32B" and model.owned_by == "b"


def test_models_are_listed_from_the_registry(routed, session):
    models = client(routed, session).models.list()
    assert [m.id for m in models] == ["gpt-a", "Qwen/Qwen3-32B"]
    gpt_a = client(routed, session).models.retrieve("gpt-a")
    assert gpt_a.owned_by == "a"
    assert gpt_a.model_extra["capabilities"] == {"context_length": 128000, "tools": True, "vision": False}
    assert gpt_a.model_extra["aliases"] == ["a-alias"]
    with pytest.raises(openai.NotFoundError) as exc:
        client(routed, session).models.retrieve("nope")
    assert exc.value.body["code"] == "model_not_found" and "gpt-a" in exc.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_transient_429_is_retried_before_anything_reaches_the_agent(routed, upstream_b, session, stream):
    headers = {"x-standin-fail-first": "2", "x-standin-fail-status": "429", "x-standin-fail-key": session}
    before = len(upstream_b.requests)
    reply = client(routed, session).chat.completions.create(
        model="standin-text", messages=MESSAGES, stream=stream, extra_headers=headers
    )
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.choices[0].message.content
    assert text.startswith("Hello! I am the standin upstream")
    assert len(upstream_b.requests) == before + 3
    [record] = wait_records(routed.traj / f"{session}.jsonl", 1)
    assert record.status == 200 and record.complete and record.stream is stream
    assert [a.status for a in record.upstream.attempts] == [429, 429, 200]
    assert record.upstream.attempts[0].waited == 0 and all(a.waited > 0 for a in record.upstream.attempts[1:])


def test_a_persisting_500_is_returned_as_500_after_the_configured_attempts(routed, upstream_b, session):
    headers = {"x-standin-fail-first": "99", "x-standin-fail-key": session}
    before = len(upstream_b.requests)
    with pytest.raises(openai.InternalServerError) as exc:
        client(routed, session).chat.completions.create(model="standin-text", messages=MESSAGES, extra_headers=headers)
    assert exc.value.status_code == 500
    assert exc.value.body["message"].startswith("standin: transient failure 3 of 99")  # the upstream's own body
    assert len(upstream_b.requests) == before + 3  # 1 + retries = 2
    [record] = wait_records(routed.traj / f"{session}.jsonl", 1)
    assert record.status == 500 and [a.status for a in record.upstream.attempts] == [500, 500, 500]


def test_unknown_model_without_default_route_is_a_clear_404(upstream_a, tmp_path, session):
    config = write_config(tmp_path / "u.yaml", f"""
providers:
  a: {{base_url: "{upstream_a.url}/v1"}}
models:
  gpt-a: {{provider: a, upstream_model: standin-text}}
""")
    with ProxyProcess(upstream=upstream_a.url, options={"llm_traj_path": tmp_path / "t", "llm_traj_config": config}) as proxy:
        with pytest.raises(openai.NotFoundError) as exc:
            client(proxy, session).chat.completions.create(model="gpt-b", messages=MESSAGES)
        assert exc.value.body["code"] == "model_not_found"
        assert "'gpt-b'" in exc.value.body["message"] and "gpt-a" in exc.value.body["message"]
        ok = client(proxy, session).chat.completions.create(model="gpt-a", messages=MESSAGES)
        assert ok.choices[0].message.content.startswith("Hello!")


def test_retry_after_is_honoured(upstream_a, tmp_path, session):
    config = write_config(tmp_path / "u.toml", f"""
retries = 1
{FAST_BACKOFF}
[providers.a]
base_url = "{upstream_a.url}/v1"
""".replace("[providers.a]", 'default_route = "a"\n[providers.a]'))
    with ProxyProcess(upstream=upstream_a.url, options={"llm_traj_path": tmp_path / "t", "llm_traj_config": config}) as proxy:
        for key, value, at_least in (("x-standin-retry-after", "1", 1.0), ("x-standin-retry-after-ms", "400", 0.4)):
            headers = {"x-standin-fail-first": "1", "x-standin-fail-status": "503",
                       "x-standin-fail-key": session + key, key: value}  # fmt: skip
            started = time.monotonic()
            reply = client(proxy, session).chat.completions.create(model="standin-text", messages=MESSAGES, extra_headers=headers)
            assert reply.choices[0].message.content.startswith("Hello!")
            assert at_least <= time.monotonic() - started < at_least + 1.0
        records = wait_records(tmp_path / "t" / f"{session}.jsonl", 2)
        assert [r.upstream.attempts[1].waited for r in records] == [1.0, 0.4]


def test_llm_traj_retries_without_config_and_a_dead_upstream(tmp_path, session):
    """Connect errors are retried; the final failure is a truthful 502 naming it."""
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_path": tmp_path, "llm_traj_retries": 2}) as proxy:
        with pytest.raises(openai.APIStatusError) as exc:
            client(proxy, session).chat.completions.create(model="m", messages=MESSAGES)
        assert exc.value.status_code == 502
        assert "upstream unreachable" in exc.value.body["message"]
        [record] = wait_records(tmp_path / f"{session}.jsonl", 1)
        assert record.status is None and not record.complete and record.error.kind == "upstream_unreachable"
        assert len(record.upstream.attempts) == 3
        assert all(a.status is None and "unreachable" in a.error for a in record.upstream.attempts)
        assert record.request["model"] == "m"  # the body is kept: it was read whole


def test_timeouts_first_byte_and_idle(upstream_a, tmp_path, session):
    config = write_config(tmp_path / "u.toml", f"""
default_route = "a"
[providers.a]
base_url = "{upstream_a.url}/v1"
timeouts = {{first_byte = 0.3, idle = 0.3}}
""")
    with ProxyProcess(upstream=upstream_a.url, options={"llm_traj_path": tmp_path / "t", "llm_traj_config": config}) as proxy:
        slow = {"x-standin-delay-ms": "800"}
        with pytest.raises(openai.APIStatusError) as exc:
            client(proxy, session).chat.completions.create(model="standin-text", messages=MESSAGES, extra_headers=slow)
        assert exc.value.status_code == 504 and "first_byte timeout" in exc.value.body["message"]
        # A stream whose head came but whose events stall: cut off, recorded incomplete with why.
        with pytest.raises(broken_stream_error()):
            stream = client(proxy, session).chat.completions.create(model="standin-text", messages=MESSAGES,
                                                                     stream=True, extra_headers=slow)  # fmt: skip
            list(stream)
        first, second = wait_records(tmp_path / "t" / f"{session}.jsonl", 2)
        assert first.status is None and first.error.kind == "upstream_timeout" and "first_byte" in first.upstream.error
        assert second.status == 200 and not second.complete and "idle timeout" in second.upstream.error
        assert second.error.kind == "upstream_timeout" and second.error.message == second.upstream.error
        assert "idle timeout" in proxy.output()


def test_health_reports_mode_and_upstream_reachability(routed, upstream_a):
    health = json.load(urllib.request.urlopen(f"{routed.url}/llm-traj/health"))
    assert health["status"] == "ok" and health["mode"] == "record"
    assert {r["name"] for r in health["routes"]} == {"a", "b"}
    assert "upstreams" not in health
    checked = json.load(urllib.request.urlopen(f"{routed.url}/health?upstreams"))
    assert all(u["reachable"] for u in checked["upstreams"]) and checked["status"] == "ok"
    assert REAL_KEY not in json.dumps(checked)


def test_health_is_503_when_an_upstream_is_down(tmp_path):
    config = write_config(tmp_path / "u.toml", 'default_route = "dead"\n[providers.dead]\nbase_url = "http://127.0.0.1:9/v1"\n')
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_path": tmp_path, "llm_traj_config": config}) as proxy:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{proxy.url}/llm-traj/health?upstreams")
        report = json.load(exc.value)
        assert exc.value.code == 503 and report["status"] == "degraded"
        assert report["upstreams"][0]["reachable"] is False and report["upstreams"][0]["error"]


@pytest.mark.parametrize(
    ("text", "suffix", "expected"),
    [
        ('[providers.a]\nbase_url = "ftp://x"\n', ".toml", "providers.a.base_url: 'ftp://x' is not an http(s) URL"),
        ('[providers.a]\nbase_url = "http://x"\nbase = 1\n', ".toml", "providers.a.base: unknown key"),
        ('[providers.a]\nbase_url = "http://x"\napi_key_env = "LLM_TRAJ_SURELY_UNSET"\n', ".toml",
         "environment variable LLM_TRAJ_SURELY_UNSET (api_key_env) is not set"),
        ("models:\n  m: {provider: nope}\n", ".yaml", "models.m: provider 'nope' is not under [providers]"),
        ("providers: [", ".yaml", "not valid YAML"),
        ("x = ", ".toml", "not valid TOML"),
    ],
)
def test_config_errors_stop_startup_with_one_line(tmp_path, text, suffix, expected):
    config = write_config(tmp_path / f"bad{suffix}", text)
    result = subprocess.run(
        [mitm_program(), "-p", "0", "--listen-host", "127.0.0.1", "-s", str(ADDON_SCRIPT),
         "--set", f"llm_traj_path={tmp_path}", "--set", f"llm_traj_config={config}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "llm-traj:" in line]
    assert len(lines) == 1 and expected in lines[0] and str(config) in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr


def test_regular_mode_routes_by_model_too(upstream_a, tmp_path, monkeypatch, session):
    """Through HTTPS_PROXY the agent names its own host (an HTTPS upstream here);
    the config still sends the call to the model's route, with the real key."""
    cert, key = make_self_signed_cert(tmp_path)
    monkeypatch.setenv("LLM_TRAJ_TEST_A_KEY", REAL_KEY)
    config = write_config(tmp_path / "u.toml", f"""
[providers.a]
base_url = "{upstream_a.url}/v1"
api_key_env = "LLM_TRAJ_TEST_A_KEY"
[models.routed]
provider = "a"
upstream_model = "standin-text"
""")
    confdir = tmp_path / "mitm"
    with StandinUpstream(tls=(cert, key)) as named, ProxyProcess(
        options={"llm_traj_path": tmp_path / "traj", "llm_traj_config": config, "confdir": confdir,
                 "ssl_insecure": "true"}  # the named host's certificate is self-signed
    ) as proxy:
        trust = ssl.create_default_context(cafile=confdir / "mitmproxy-ca-cert.pem")
        agent = OpenAI(base_url=f"{named.url}/v1", api_key=DUMMY_KEY, max_retries=0,
                       http_client=httpx.Client(proxy=proxy.url, verify=trust))  # fmt: skip
        reply = agent.chat.completions.create(model="routed", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("Hello!")
        assert named.requests == []  # the host the agent named never saw the call
        assert upstream_a.requests[-1].header("authorization") == f"Bearer {REAL_KEY}"
        [record] = wait_records(tmp_path / "traj" / "default.jsonl", 1)
        assert record.url.startswith(named.url) and record.upstream.url == f"{upstream_a.url}/v1/chat/completions"
        # /v1/models is answered from the config only for a configured upstream's host
        assert [m.id for m in agent.models.list()][0] == "standin-text"  # the named host's own list
        configured = OpenAI(base_url=f"{upstream_a.url}/v1", api_key=DUMMY_KEY, max_retries=0,
                            http_client=httpx.Client(proxy=proxy.url))  # fmt: skip
        assert [m.id for m in configured.models.list()] == ["routed"]


def test_anthropic_route_gets_its_key_as_x_api_key(upstream_a, tmp_path, monkeypatch, session):
    monkeypatch.setenv("LLM_TRAJ_TEST_ANT_KEY", REAL_KEY)
    config = write_config(tmp_path / "u.yaml", f"""
providers:
  claude: {{base_url: "{upstream_a.url}/v1", kind: anthropic, api_key_env: LLM_TRAJ_TEST_ANT_KEY}}
models:
  sonnet: {{provider: claude, upstream_model: standin-text}}
""")
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_path": tmp_path, "llm_traj_config": config}) as proxy:
        agent = anthropic.Anthropic(base_url=f"{proxy.url}/s/{session}", auth_token=DUMMY_KEY, max_retries=0)
        message = agent.messages.create(model="sonnet", max_tokens=64, messages=MESSAGES)
        assert message.content[0].text.startswith("The capital of France")
        seen = upstream_a.requests[-1]
        assert seen.path == "/v1/messages" and seen.header("x-api-key") == REAL_KEY
        assert seen.header("authorization") is None  # the agent's bearer token is not passed on
        [record] = wait_records(tmp_path / f"{session}.jsonl", 1)
        assert record.api == "anthropic.messages" and record.request["model"] == "sonnet"
        assert REAL_KEY not in (tmp_path / f"{session}.jsonl").read_text()


@pytest.mark.parametrize("stream", [False, True])
def test_saved_flows_hold_the_agents_key_not_the_injected_one(upstream_a, tmp_path, monkeypatch, stream):
    """`mitmdump -w` writes a flow once it is done: by then the injected key is
    gone from it again (mitmweb shows the same flow)."""
    from mitmproxy import io

    monkeypatch.setenv("LLM_TRAJ_TEST_A_KEY", REAL_KEY)
    config = write_config(tmp_path / "u.toml", f'default_route = "a"\n[providers.a]\nbase_url = "{upstream_a.url}/v1"\n'
                                               'api_key_env = "LLM_TRAJ_TEST_A_KEY"\n')  # fmt: skip
    flows = tmp_path / "flows.mitm"
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_path": tmp_path, "llm_traj_config": config},
                      extra_args=["-w", str(flows)]) as proxy:  # fmt: skip
        reply = client(proxy, "saved").chat.completions.create(model="standin-text", messages=MESSAGES, stream=stream)
        list(reply) if stream else None
        assert upstream_a.requests[-1].header("authorization") == f"Bearer {REAL_KEY}"
    with open(flows, "rb") as fh:
        [flow] = list(io.FlowReader(fh).stream())
    assert flow.request.headers["authorization"] == f"Bearer {DUMMY_KEY}"
    assert REAL_KEY.encode() not in flows.read_bytes()


def test_other_requests_in_reverse_mode_follow_their_model_or_the_default_route(routed, upstream_a, upstream_b):
    """Embeddings, files and the like are not recorded, but in reverse mode they
    are meant for the model endpoint too: they take the model's route, else the
    default one (the proxy's own reverse target here is a dead port)."""
    embeddings = httpx.post(f"{routed.url}/v1/embeddings", json={"model": "gpt-a", "input": "x"},
                            headers={"authorization": f"Bearer {DUMMY_KEY}"})  # fmt: skip
    assert embeddings.status_code == 404 and "Unknown request URL: POST /v1/embeddings" in embeddings.text  # A's own answer
    seen = upstream_a.requests[-1]
    assert seen.path == "/v1/embeddings" and seen.header("authorization") == f"Bearer {REAL_KEY}"
    assert json.loads(seen.body)["model"] == "standin-text"
    files = httpx.get(f"{routed.url}/v1/files")
    assert files.status_code == 404 and upstream_b.requests[-1].path == "/v1/files"


def test_many_concurrent_calls_through_a_retrying_route(routed, session):
    """Route b retries, so its calls go through llm-traj's own client behind the
    loopback server: 40 at once, streamed and not, all arrive whole."""
    from openai import AsyncOpenAI

    async def main():
        agent = AsyncOpenAI(base_url=f"{routed.url}/s/{session}/v1", api_key=DUMMY_KEY, max_retries=0)

        async def one(i: int) -> str:
            if i % 2:
                chunks = await agent.chat.completions.create(model="standin-text", messages=MESSAGES, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            reply = await agent.chat.completions.create(model="standin-text", messages=MESSAGES)
            return reply.choices[0].message.content

        texts = await asyncio.gather(*(one(i) for i in range(40)))
        await agent.close()
        return texts

    texts = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(set(texts)) == 1 and texts[0].startswith("Hello! I am the standin upstream")
    records = wait_records(routed.traj / f"{session}.jsonl", 40)
    bad = [(r.index, r.stream, r.status, r.complete, r.error, len(r.events or []), r.response) for r in records
           if not (r.complete and r.status == 200 and [a.status for a in r.upstream.attempts] == [200])]  # fmt: skip
    assert bad == []
    assert sorted(r.index for r in records) == list(range(1, 41))
