"""The upstream config and registry, and the retry arithmetic, without a proxy."""

from __future__ import annotations

import random

import httpx
import pytest
from llmtraj.upstreams.client import backoff_delay, forward_headers, retry_after
from llmtraj.upstreams.config import ConfigError, parse_config
from llmtraj.upstreams.registry import (
    RetryPolicy,
    Route,
    UnknownModel,
    build_registry,
    load_registry,
    models_list,
)

CONFIG = """
default_route = "openai"
retries = 1
[providers.openai]
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_KEY"
retry_statuses = [429]
[providers.claude]
base_url = "https://api.anthropic.com/v1"
kind = "anthropic"
api_key_env = "CLAUDE_KEY"
optional = true
[models."gpt-4o"]
provider = "openai"
aliases = ["4o"]
retries = 3
timeouts = {first_byte = 5}
[models.sonnet]
provider = "claude"
[models.qwen]
base_url = "http://gpu-7:8000/v1"
kind = "vllm"
context_length = 32768
"""


def registry(environ=None, text=CONFIG, retries=0):
    return build_registry(parse_config(text, ".toml"), retries=retries, environ={"OPENAI_KEY": "sk-o"} if environ is None else environ)


def test_models_route_by_name_and_alias_others_to_the_default():
    reg = registry()
    assert reg.target("4o").model.name == "gpt-4o" and reg.target("4o").route.name == "openai"
    assert reg.target("qwen").route.base_url == "http://gpu-7:8000/v1"
    default = reg.target("gpt-5")
    assert default.model is None and default.route.name == "openai"
    assert reg.target(None).route.name == "openai"  # no model named: the default route too


def test_optional_provider_without_its_key_is_left_out_with_its_models():
    reg = registry()
    assert reg.model("sonnet") is None
    assert any("claude" in s for s in reg.skipped) and any("sonnet" in s for s in reg.skipped)
    with_key = registry({"OPENAI_KEY": "sk-o", "CLAUDE_KEY": "sk-ant"})
    route = with_key.target("sonnet").route
    assert route.auth_headers() == [("x-api-key", "sk-ant")]
    assert with_key.target("gpt-4o").route.auth_headers() == [("authorization", "Bearer sk-o")]
    assert with_key.target("qwen").route.auth_headers() == []  # no key configured: the agent's is forwarded


def test_required_key_missing_is_a_config_error():
    with pytest.raises(ConfigError, match="providers.openai: environment variable OPENAI_KEY"):
        registry({})


def test_retry_settings_layer_model_over_provider_over_top_level():
    reg = registry()
    gpt = reg.target("gpt-4o").route.policy
    assert (gpt.retries, gpt.statuses, gpt.first_byte_timeout) == (3, (429,), 5)
    assert gpt.needs_client
    other = reg.target("other").route.policy
    assert (other.retries, other.statuses, other.first_byte_timeout) == (1, (429,), None)
    qwen = reg.target("qwen").route.policy
    assert (qwen.retries, qwen.statuses) == (1, (429, 500, 502, 503))
    no_retries = registry(text=CONFIG.replace("retries = 1\n", "", 1))
    assert no_retries.target("qwen").route.policy == RetryPolicy()  # the llm_traj_retries default: 0
    assert not no_retries.target("qwen").route.policy.needs_client
    assert registry(text=CONFIG.replace("retries = 1\n", "", 1), retries=2).target("qwen").route.policy.retries == 2


def test_unknown_model_without_default_names_the_known_ones():
    reg = registry(text=CONFIG.replace('default_route = "openai"\n', ""))
    with pytest.raises(UnknownModel) as exc:
        reg.target("gpt-5")
    assert "'gpt-5'" in str(exc.value) and "4o, gpt-4o, qwen" in str(exc.value)


@pytest.mark.parametrize(
    ("base", "path", "url"),
    [
        ("https://api.openai.com/v1", "/v1/chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("https://api.openai.com/v1", "/chat/completions?x=1", "https://api.openai.com/v1/chat/completions?x=1"),
        ("https://api.anthropic.com/v1", "/v1/messages", "https://api.anthropic.com/v1/messages"),
        ("http://gpu:8000/v1", "/v1?a", "http://gpu:8000/v1?a"),
        ("http://gpu:8000", "/v1/completions", "http://gpu:8000/completions"),
        ("http://gpu:8000/v1", "/v10/x", "http://gpu:8000/v1/v10/x"),
    ],
)
def test_request_paths_map_onto_the_base_url_after_their_v1(base, path, url):
    assert Route("r", base).url_for(path) == url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[providers.a]\nbase_url = "http://x"\nretry_statuses = [200]', "200 is not an HTTP error status"),
        ('[providers.a]\nbase_url = "http://x:99999"', "has a bad port"),
        ('[providers.a]\nbase_url = "http://x"\nkind = "gemini"', "providers.a.kind"),
        ('[models.m]\nprovider = "a"\nbase_url = "http://x"', "give either provider"),
        ('[providers.a]\nbase_url = "http://x"\n[models.m]\nprovider = "a"\naliases = ["n"]\n[models.n]\nprovider = "a"',
         "the name 'n' is also used by models.m"),
        ('default_route = "z"', "default_route 'z' is not under [providers]"),
        ("retries = 99", "retries: Input should be less than or equal to 20"),
        ('[providers.a]\nbase_url = "http://x"\nsampling = {fixed = {temprature = 1}}', "temprature: not a sampling key"),
        ('[providers.a]\nbase_url = "http://x"\nsampling = {allow = ["max_tokens", "tools"]}', "tools: not a sampling key"),
    ],
)
def test_config_errors_are_one_line_naming_the_problem(text, message):
    with pytest.raises(ConfigError) as exc:
        build_registry(parse_config(text, ".toml"), environ={})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_yaml_and_toml_give_the_same_registry_and_files_are_named_in_errors(tmp_path):
    yaml = tmp_path / "u.yml"
    yaml.write_text("default_route: p\nproviders:\n  p: {base_url: 'http://h/v1'}\nmodels:\n  m: {provider: p, tools: true}\n")
    toml = tmp_path / "u.toml"
    toml.write_text('default_route = "p"\n[providers.p]\nbase_url = "http://h/v1"\n[models.m]\nprovider = "p"\ntools = true\n')
    assert models_list(load_registry(yaml), 1) == models_list(load_registry(toml), 1)
    assert models_list(load_registry(toml), 1)["data"] == [
        {"id": "m", "object": "model", "created": 1, "owned_by": "p", "capabilities": {"tools": True}}
    ]
    with pytest.raises(ConfigError, match=r"u\.json: the file name must end in"):
        (tmp_path / "u.json").write_text("{}")
        load_registry(tmp_path / "u.json")
    with pytest.raises(ConfigError, match="missing.toml: cannot read it"):
        load_registry(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one first
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "-4"}, 0.0),
    ],
)
def test_retry_after(headers, seconds):
    now = 1445412480.0  # 07:28:00 that day
    assert retry_after(httpx.Headers(headers), now=now) == seconds


def test_backoff_grows_exponentially_with_jitter_under_the_cap():
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=4.0)
    rng = random.Random(7)
    for retry, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0]):
        delays = {backoff_delay(retry, policy, rng) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1


def test_forwarded_headers_drop_hop_by_hop_and_keep_encodings_as_the_agent_asked():
    kept = forward_headers([("Host", "x"), ("Connection", "keep-alive"), ("Content-Length", "3"), ("X-A", "1")])
    assert kept == [("X-A", "1"), ("accept-encoding", "identity")]
    assert forward_headers([("Accept-Encoding", "gzip")]) == [("Accept-Encoding", "gzip")]


def test_failures_without_a_response_say_what_happened():
    from llmtraj.upstreams.client import _failure

    policy = RetryPolicy(connect_timeout=2, first_byte_timeout=30)
    cases = [  # (the record's error kind, also the agent's error code)
        (httpx.ConnectTimeout("timed out"), "connection not made within 2 s (connect timeout)", "upstream_timeout"),
        (TimeoutError(), "no response within 30 s (first_byte timeout)", "upstream_timeout"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "unreachable: [Errno 111] Connection refused", "upstream_unreachable"),
        (httpx.RemoteProtocolError("Server disconnected"), "failed before responding: Server disconnected", "upstream_disconnected"),
    ]
    for exc, message, kind in cases:
        failure = _failure(exc, policy)
        assert failure.kind == kind and message in failure.message


def test_capture_and_sampling_layer_model_over_provider():
    text = """
default_route = "engine"
[providers.engine]
base_url = "http://gpu-7:8000/v1"
kind = "sglang"
capture_tokens = true
sampling = {allow = ["max_tokens"], fixed = {temperature = 1.0}}
[models.judge]
provider = "engine"
capture_tokens = false
[models.policy]
provider = "engine"
sampling = {fixed = {seed = 0}}
"""
    reg = registry(environ={}, text=text)
    assert reg.captures_tokens
    default, judge, policy = reg.target("other").route, reg.target("judge").route, reg.target("policy").route
    assert (default.capture_tokens, judge.capture_tokens, policy.capture_tokens) == (True, False, True)
    assert default.kind == "sglang" and default.sampling.allow == {"max_tokens"} and judge.sampling == default.sampling
    assert policy.sampling.allow is None and policy.sampling.fixed == {"seed": 0}
    assert not registry().captures_tokens
