"""The normalisation rule engine and its presets, on request pairs shaped like
each agent's: two runs of one task that differ only in what changes from run
to run must normalise to the same key; different tasks must not. The texts
are made up here, only the shapes follow the agents."""

from __future__ import annotations

import copy
import json
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from llmtraj.replay.normalize import (
    ANY_INDEX,
    ANY_KEY,
    GENERIC,
    Normalizer,
    RuleError,
    load_rules,
    make_rule,
    normalizer_from_table,
    parse_path,
)

BUILTIN = Normalizer.builtin()


def normalized(headers, body, normalizer=BUILTIN, api="x"):
    preset = normalizer.preset_for(headers, json.dumps(body))
    return normalizer.rule_set(preset).normalize(api, body)


def assert_same(headers, first, second, normalizer=BUILTIN):
    a, b = normalized(headers, first, normalizer), normalized(headers, second, normalizer)
    assert a.key == b.key, f"{a.body}\n!=\n{b.body}"
    assert first != second  # the pair really differs before normalisation
    return a


# ------------------------------------------------------------ agents' shapes

CLAUDE_HEADERS = [("User-Agent", "claude-cli/9.9.9 (external, sdk-cli)"), ("X-Claude-Code-Session-Id", "s")]


def claude_request(*, home: str, day: str, hash_: str, user: str, task: str = "Make notes.txt"):
    tail = {"type": "text", "text": task, "cache_control": {"type": "ephemeral"}}
    return {
        "model": "some-model",
        "system": [
            {"type": "text", "text": f"x-billing: v=1.2.3.abc; entry=cli; cch={hash_};"},
            {"type": "text", "text": "An agent.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": f"Notes live in `{home}/.agent/projects/-{home[1:].replace('/', '-')}-work/notes/`.\n"
                                     f"Working directory: {home}/work\n"},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": f"<reminder>\nToday is {day}.\n</reminder>"},
                tail,
            ]},
        ],
        "metadata": {"user_id": f'{{"device_id":"{user}","session_id":"{user[:8]}"}}'},
        "tools": [{"name": "Bash", "description": "Runs a command.", "input_schema": {"type": "object"}}],
    }  # fmt: skip


def test_claude_code_runs_match_on_another_day_home_and_billing_hash():
    first = claude_request(home="/home/ann", day="2026-01-05", hash_="5a1f0", user="aa11")
    second = claude_request(home="/tmp/other/home", day="2026-01-06", hash_="c3e9d", user="bb22")
    result = assert_same(CLAUDE_HEADERS, first, second)
    assert result.preset == "claude-code"
    assert {"claude-billing-hash", "abs-path", "iso-date", "claude-user-id"} <= set(result.fired)


def test_claude_code_different_tasks_differ():
    first = claude_request(home="/home/ann", day="2026-01-05", hash_="5a1f0", user="aa11", task="Make notes.txt")
    second = claude_request(home="/home/ann", day="2026-01-05", hash_="5a1f0", user="aa11", task="Delete notes.txt")
    assert normalized(CLAUDE_HEADERS, first).key != normalized(CLAUDE_HEADERS, second).key


def test_billing_hash_rule_only_under_system_text():
    body = {"system": [{"type": "text", "text": "cch=abc12;"}], "messages": [{"role": "user", "content": "cch=abc12;"}]}
    out = normalized(CLAUDE_HEADERS, body).body
    assert out["system"][0]["text"] == "cch=<hash>;"
    assert out["messages"][0]["content"] == "cch=abc12;"


CODEX_HEADERS = [("user-agent", "codex_exec/9.9 (Linux; x86_64)"), ("originator", "codex_exec")]


def codex_request(*, ids: list[str], cwd: str, day: str, chunk: str, wall: str, session: str, task: str = "Make a.txt"):
    return {
        "model": "m",
        "input": [
            {"type": "message", "id": f"msg_{ids[0]}", "role": "developer",
             "content": [{"type": "input_text", "text": f"Skills root: `{cwd}/../home/.tool/skills`"}]},
            {"type": "message", "id": f"msg_{ids[1]}", "role": "user",
             "content": [{"type": "input_text", "text": f"<env>\n  <cwd>{cwd}</cwd>\n  <current_date>{day}</current_date>\n</env>"}]},
            {"type": "message", "id": f"msg_{ids[2]}", "role": "user", "content": [{"type": "input_text", "text": task}]},
            {"type": "function_call", "id": "fc_recorded_1", "name": "exec_command", "arguments": "{}", "call_id": "call_1"},
            {"type": "function_call_output", "id": f"fco_{ids[3]}", "call_id": "call_1",
             "output": f"Chunk ID: {chunk}\nWall time: {wall} seconds\nProcess exited with code 0\nOutput:\n"},
        ],
        "client_metadata": {"session_id": session, "turn_started_at_unix_ms": 1700000000000 + len(session)},
        "prompt_cache_key": session,
        "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}],
    }  # fmt: skip


def test_codex_runs_match_with_fresh_ids_metadata_and_tool_output_noise():
    first = codex_request(ids=["0193-a", "0193-b", "0193-c", "0193-d"], cwd="/srv/a/work", day="2026-02-01",
                          chunk="9f3a21", wall="0.0012", session="one")
    second = codex_request(ids=["0194-e", "0194-f", "0194-g", "0194-h"], cwd="/home/b/elsewhere", day="2026-02-02",
                           chunk="00bb17", wall="0.0000", session="two-two")
    result = assert_same(CODEX_HEADERS, first, second)
    assert result.preset == "codex"
    assert {"codex-item-id", "codex-client-metadata", "codex-chunk-id", "codex-wall-time"} <= set(result.fired)


def test_codex_tool_output_that_differs_in_substance_differs():
    first = codex_request(ids=list("abcd"), cwd="/w", day="2026-02-01", chunk="1", wall="0.1", session="s")
    second = copy.deepcopy(first)
    second["input"][4]["output"] = second["input"][4]["output"].replace("code 0", "code 1")
    assert normalized(CODEX_HEADERS, first).key != normalized(CODEX_HEADERS, second).key


def chat_request(system: str, tool_result: str, extra: dict | None = None):
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "fix it"},
                                        {"role": "tool", "tool_call_id": "call_1", "content": tool_result}],
            **(extra or {})}  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "preset", "first", "second"),
    [
        ([("User-Agent", "GeminiCLI/0.9.0 (linux; x64)")], "gemini-cli",
         chat_request("Today's date is Tuesday, March 3, 2026. I'm in /home/a/proj", "ok", {"user_prompt_id": "p1"}),
         chat_request("Today's date is Wednesday, March 4, 2026. I'm in /Users/b/proj", "ok", {"user_prompt_id": "p2"})),
        ([("User-Agent", "QwenCode/0.1.0 (linux; x64)")], "qwen-code",
         chat_request("Today is 2026-03-03.", "ok", {"metadata": {"sessionId": "a", "promptId": "b"}}),
         chat_request("Today is 2026-03-04.", "ok", {"metadata": {"sessionId": "c", "promptId": "d"}})),
        ([("User-Agent", "opencode/1.0.0"), ("x-opencode-session", "ses_1")], "opencode",
         chat_request("<env>\n Working directory: /home/a/p\n Today's date: Tue Mar 03 2026\n</env>", "ok",
                      {"prompt_cache_key": "ses_abcdefghijklmnopqrst"}),
         chat_request("<env>\n Working directory: /root/p\n Today's date: Wed Mar 04 2026\n</env>", "ok",
                      {"prompt_cache_key": "ses_zyxwvutsrqponmlkjih"})),
        ([("User-Agent", "OpenAI/Python 1.0")], "openhands",
         chat_request("You are OpenHands agent.", "[Command finished, pid 4242, took 1.25 seconds]"),
         chat_request("You are OpenHands agent.", "[Command finished, pid 977, took 0.75 seconds]")),
        ([("User-Agent", "OpenAI/Python 1.0")], "swe-agent",
         chat_request("SWE-agent at work in /tmp/tmpab12/repo", "process group 31337 started at 12:01:02"),
         chat_request("SWE-agent at work in /tmp/tmpzz99/repo", "process group 4711 started at 13:14:15")),
        ([("User-Agent", "litellm/1.0")], "mini-swe-agent",
         chat_request("Say COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT when done.", "<returncode>0</returncode> PID: 12"),
         chat_request("Say COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT when done.", "<returncode>0</returncode> PID: 98765")),
        ([("User-Agent", "OpenAI/Python 1.0"), ("X-Title", "Aider")], "aider",
         chat_request("Act as an expert software developer. Repo at /home/a/r", "ok", {"metadata": {"run": 1}}),
         chat_request("Act as an expert software developer. Repo at /home/b/r", "ok", {"metadata": {"run": 2}})),
    ],
)  # fmt: skip
def test_each_preset_is_detected_and_makes_two_runs_match(headers, preset, first, second):
    result = assert_same(headers, first, second)
    assert result.preset == preset


def test_presets_are_picked_by_user_agent_header_or_prompt():
    assert BUILTIN.preset_for([("user-agent", "claude-cli/2.0")]) == "claude-code"
    assert BUILTIN.preset_for({"X-Claude-Code-Session-Id": "x"}) == "claude-code"
    assert BUILTIN.preset_for([("user-agent", "codex_cli_rs/0.1")]) == "codex"
    assert BUILTIN.preset_for([("x-codex-window-id", "w")]) == "codex"
    assert BUILTIN.preset_for([("user-agent", "curl/8")], "nothing special") == GENERIC
    assert BUILTIN.preset_for([("user-agent", "OpenAI/Python")], '"You are OpenHands"') == "openhands"


def test_generic_rules_apply_to_unknown_agents():
    first = chat_request("Session 3f1b0c9e-1111-4a2b-9c3d-0123456789ab at 2026-04-01T10:00:00Z", "pid=4242 msg_0123456789abcdefABCD")
    second = chat_request("Session 7e6d5c4b-2222-4a2b-9c3d-ba9876543210 at 2026-04-02T11:30:05Z", "pid=17 msg_ZYXWVUTSRQPONMLKJI01")
    result = assert_same([("user-agent", "my-agent/1")], first, second)
    assert result.preset == GENERIC
    assert {"uuid", "iso-date", "pid", "prefixed-id"} <= set(result.fired)


def test_abs_path_spares_urls_and_relative_paths():
    rules = BUILTIN.rule_set(GENERIC)
    text = "see https://example.com/a/b and src/x/y.py and /home/u/p/q.txt, also and/or"
    assert rules.normalize("x", {"t": text}).body["t"] == (
        "see https://example.com/a/b and src/x/y.py and <path>, also and/or"
    )


def test_nothing_fires_on_a_stable_body_and_the_record_is_not_changed():
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    before = copy.deepcopy(body)
    result = normalized([("user-agent", "claude-cli/1")], body)
    assert result.fired == ()
    assert body == before
    assert result.body == body


def test_keys_are_order_insensitive():
    a = normalized([], {"b": 1, "a": {"y": 2, "x": 3}})
    b = normalized([], {"a": {"x": 3, "y": 2}, "b": 1})
    assert a.key == b.key


def test_raw_bodies_get_the_value_rules():
    rules = BUILTIN.rule_set(GENERIC)
    assert rules.normalize("x", None, raw="on 2026-01-01").key == rules.normalize("x", None, raw="on 2026-01-02").key


# ------------------------------------------------------------------- paths


def test_path_syntax():
    assert parse_path("input[*].id") == ("input", ANY_INDEX, "id")
    assert parse_path("messages[*].content[2].cache_control") == ("messages", ANY_INDEX, "content", 2, "cache_control")
    assert parse_path("*.x-codex-turn-metadata") == (ANY_KEY, "x-codex-turn-metadata")
    assert parse_path("[*].id") == (ANY_INDEX, "id")
    for bad in ("a..b", "a[x]", "", "a[*"):
        with pytest.raises(RuleError):
            parse_path(bad)


def test_drop_with_index_and_wildcards():
    normalizer = normalizer_from_table({"rules": [{"name": "second", "drop": "items[1]"},
                                                  {"name": "deep", "drop": "*.inner.secret"}]})  # fmt: skip
    out = normalized([], {"items": [1, 2, 3], "a": {"inner": {"secret": 1, "keep": 2}}}, normalizer)
    assert out.body == {"a": {"inner": {"keep": 2}}, "items": [1, 3]}
    assert set(out.fired) == {"second", "deep"}


# -------------------------------------------------------------- user rules


def test_user_rules_file_toml_adds_overrides_disables_and_scopes(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        """
disable = ["clock-time"]
[[agents]]
name = "my-agent"
user_agent = "^my-agent/"
[[rules]]
name = "ticket"
pattern = 'TICKET-\\d+'
placeholder = "TICKET-<n>"
agents = ["my-agent"]
[[rules]]
name = "abs-path"
pattern = '/srv/[a-z]+'
placeholder = "<srv>"
[[rules]]
name = "trace"
drop = "metadata.trace"
"""
    )
    normalizer = load_rules(path)
    mine = [("user-agent", "my-agent/2")]
    assert assert_same(mine, {"t": "TICKET-1 at /srv/abc", "metadata": {"trace": 1}},
                       {"t": "TICKET-22 at /srv/xyz", "metadata": {"trace": 2}}, normalizer).fired == (
        "abs-path", "ticket", "trace")  # fmt: skip
    other = [("user-agent", "curl/8")]
    assert normalized(other, {"t": "TICKET-1"}, normalizer).key != normalized(other, {"t": "TICKET-2"}, normalizer).key
    assert normalized(other, {"t": "12:00:00"}, normalizer).key != normalized(other, {"t": "12:00:01"}, normalizer).key
    assert normalized(other, {"t": "/home/a/b"}, normalizer).fired == ()  # the built-in abs-path is replaced
    assert any("my-agent" in line for line in normalizer.describe())


def test_user_rules_file_yaml(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: build\n    pattern: 'build #\\d+'\n    under: messages\n")
    normalizer = load_rules(path)
    a = normalized([], {"messages": ["build #1"], "x": "build #1"}, normalizer)
    b = normalized([], {"messages": ["build #2"], "x": "build #1"}, normalizer)
    assert a.key == b.key and a.body["x"] == "build #1"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": [{"name": "bad-re", "pattern": "("}]}, "rule 'bad-re': bad pattern"),
        ({"rules": [{"name": "both", "pattern": "a", "drop": "b"}]}, "rule 'both': give either drop"),
        ({"rules": [{"name": "group", "pattern": "a", "placeholder": "\\2"}]}, "rule 'group': placeholder"),
        ({"rules": [{"name": "empty", "pattern": "a*"}]}, "rule 'empty': pattern 'a*' matches the empty string"),
        ({"rules": [{"name": "path", "drop": "a[x]"}]}, "rule 'path': bad path"),
        ({"rules": [{"name": "who", "pattern": "a", "agents": ["nobody"]}]}, "rule 'who': unknown agent 'nobody'"),
        ({"rules": [{"name": "typo", "patern": "a"}]}, "rule 'typo': unknown key 'patern'"),
        ({"rules": [{"pattern": "a"}]}, "rule None: needs a name"),
        ({"disable": ["no-such-rule"]}, "disable: no rule named 'no-such-rule'"),
        ({"agents": [{"name": "x"}]}, "agent 'x': give user_agent"),
        ({"rule": []}, "unknown key 'rule'"),
    ],
)
def test_bad_rules_are_one_line_naming_the_rule(table, message):
    with pytest.raises(RuleError) as info:
        normalizer_from_table(table, "rules.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_rules_file(tmp_path):
    with pytest.raises(RuleError, match="cannot read it"):
        load_rules(tmp_path / "missing.toml")
    (tmp_path / "r.toml").write_text("rules = [")
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(tmp_path / "r.toml")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(RuleError, match="must end in"):
        load_rules(tmp_path / "r.json")


def test_make_rule_placeholder_defaults_to_name():
    rule = make_rule("build", pattern=r"b\d")
    assert rule.placeholder == "<build>"


def test_describe_lists_every_preset():
    text = "\n".join(BUILTIN.describe())
    for name in ("claude-code", "codex", "gemini-cli", "qwen-code", "opencode", "openhands", "swe-agent",
                 "mini-swe-agent", "aider", GENERIC):  # fmt: skip
        assert f"{name}" in text


def test_a_200kb_request_seen_before_normalises_fast():
    tools = [{"name": f"tool{i}", "description": f"Does thing {i}. " * 40, "input_schema": {"type": "object"}}
             for i in range(300)]  # fmt: skip
    def body(day):
        return claude_request(home="/home/ann", day=day, hash_="abc", user="u") | {"tools": tools}
    rules = BUILTIN.rule_set("claude-code")
    rules.normalize("x", body("2026-01-01"))  # at load: the recorded call
    live = [copy.deepcopy(body("2026-01-02")) for _ in range(5)]
    start = time.perf_counter()
    for b in live:
        rules.normalize("x", b)
    per_call = (time.perf_counter() - start) / len(live)
    assert per_call < 0.02  # loose for a shared CI machine; scripts/bench measures it properly


# -------------------------------------------- what is remembered changes nothing

# Strings each rule family rewrites, and some none does, JSON's awkward characters included.
_WORDS = ["2026-01-05", "2026-01-05T10:11:12Z", "Jan 5, 2026", "10:11:12", "/home/ann/work", "pid 123",
          "msg_0123456789abcdef0123", "123e4567-e89b-12d3-a456-426614174000", "cch=abc12;", "Chunk ID: 9f3a",
          "Wall time: 1.25 seconds", "took 3.25 s", "hello", "é ✓", 'a"b\\c', "\n", ""]  # fmt: skip
_KEYS = st.sampled_from(["id", "text", "output", "type", "input", "messages", "content", "system", "metadata",
                         "client_metadata", "user_id", "cache_control", "role", "a"])  # fmt: skip
_SCALARS = st.one_of(st.lists(st.sampled_from(_WORDS), max_size=3).map(" ".join), st.integers(-5, 2**70),
                     st.floats(allow_nan=False), st.booleans(), st.none())  # fmt: skip
_TREES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(_KEYS, c, max_size=5),
                      max_leaves=30)  # fmt: skip
_BODIES = st.dictionaries(_KEYS, _TREES, max_size=6)
_WITH_USER_RULES_TABLE = {"rules": [
    {"name": "first-content", "drop": "messages[0].content"},  # an index: items are told apart
    {"name": "second-system", "pattern": "hello", "placeholder": "<hi>", "under": "system[1]"},
    {"name": "deep", "drop": "input[*].content[*].cache_control"},  # a list inside followed items
    {"name": "texts", "pattern": "o", "placeholder": "0", "under": "*.text"},
]}  # fmt: skip
_WARM = {"builtin": BUILTIN, "user": normalizer_from_table(_WITH_USER_RULES_TABLE)}


def _plainly(rules, body):
    """What normalisation means, written as plainly as possible: the oracle
    the engine (paths followed as states, remembered items and strings,
    quick pre-checks) must agree with."""
    fired = set()

    def at(tokens, path):  # whether a rule's path names this place
        return len(tokens) == len(path) and all(
            t == p if type(t) in (str, int) else (type(p) is str) == (t is ANY_KEY) for t, p in zip(tokens, path)
        )

    def dropped(path):
        names = [r.name for r in rules if r.drop is not None and at(r.drop, path)]
        fired.update(names)
        return bool(names)

    def visit(node, path):
        if isinstance(node, dict):
            return {k: visit(node[k], (*path, k)) for k in sorted(node) if not dropped((*path, k))}
        if isinstance(node, list):
            return [visit(item, (*path, i)) for i, item in enumerate(node) if not dropped((*path, i))]
        if not isinstance(node, str):
            return node
        scoped = sorted((r for r in rules if r.under is not None and at(r.under, path[: len(r.under)])),
                        key=lambda r: len(r.under))  # fmt: skip
        for rule in [r for r in rules if r.pattern is not None and r.under is None] + scoped:
            node, n = rule.pattern.subn(rule.placeholder, node)
            if n:
                fired.add(rule.name)
        return node

    out = visit(body, ())
    return out, tuple(sorted(fired))


@settings(max_examples=max(300, settings.default.max_examples), deadline=None, suppress_health_check=list(HealthCheck))
@given(_BODIES, st.sampled_from([GENERIC, "claude-code", "codex", "qwen-code", "aider"]),
       st.sampled_from(sorted(_WARM)), st.lists(_BODIES, max_size=3))  # fmt: skip
@example({"id": "a", "text": "/home/ann/x"}, "codex", "builtin", [])  # one item, dropped from under input only
def test_a_warm_rule_set_normalises_as_a_plain_walk_does(body, preset, which, before):
    """List items and strings are remembered across calls; whatever was seen
    before, a body normalises as the plain definition says, and the key
    (joined from remembered items' JSON) is the normalised body's JSON."""
    rules = _WARM[which].rule_set(preset)
    for other in before:
        rules.normalize("x", other)
    for shape in (body, {"messages": [body, body], "input": [body, {"id": 1}, body]}):
        expected_body, expected_fired = _plainly(rules.rules, shape)
        for _ in range(2):  # the second time from what the first remembered, on fresh objects
            got = rules.normalize("x", json.loads(json.dumps(shape)))
            assert got.key == "x\njson\n" + to_json(expected_body).decode()
            assert got.fired == expected_fired and got.preset == preset
            assert json.dumps(got.body) == json.dumps(expected_body)
