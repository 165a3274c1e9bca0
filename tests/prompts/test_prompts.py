"""The registry, templates, matching each API's system prompt, and the override's request rewrite."""

from __future__ import annotations

import json

import pytest
from llmtraj.prompts.matching import PromptIndex, prompt_tag, system_segments
from llmtraj.prompts.override import Override, parse_assignment, replace_system_prompt, rewrite_request
from llmtraj.prompts.registry import PromptError, PromptRegistry, parse_ref, text_hash
from llmtraj.prompts.tagging import PromptTagger
from llmtraj.prompts.template import TemplateError, parse_template

HELPFUL = "You are a helpful assistant for {{company}}. Today is {{date}}."
TERSE = "You are terse. You work for {{company}} and today is {{date}}."


@pytest.fixture
def registry(tmp_path):
    with PromptRegistry(tmp_path / "prompts.sqlite") as registry:
        registry.add("greet", HELPFUL, message="first", labels=["production"])
        registry.add("greet", TERSE, message="terser", labels=["staging"])
        registry.add("coder", "You write Python. Be exact.")
        yield registry


def test_versions_labels_and_errors(registry, tmp_path):
    assert [v.version for v in registry.versions("greet")] == [1, 2]
    assert registry.get("greet").version == 2 and registry.get("greet@production").version == 1
    assert registry.get("greet@production").label == "production"
    assert registry.get("greet/2").labels == ("latest", "staging")
    again, created = registry.add("greet", TERSE)
    assert (again.version, created) == (2, False)
    registry.set_label("greet", 2, "production")
    assert registry.get("greet@production").version == 2
    with pytest.raises(PromptError, match="no version 7; it has 1-2"):
        registry.get("greet/7")
    with pytest.raises(PromptError, match="no label 'canary'"):
        registry.get("greet@canary")
    with pytest.raises(PromptError, match="no prompt named 'nope'"):
        registry.get("nope")
    with pytest.raises(PromptError, match="latest"):
        registry.set_label("greet", 1, "latest")
    with pytest.raises(PromptError, match="placeholder"):
        registry.add("bad", "Hello {{not a name}}")
    with pytest.raises(PromptError, match="not a prompt reference"):
        parse_ref("a@b/c")
    # another connection (the proxy, the writer) sees the same registry, and its changes
    with PromptRegistry(tmp_path / "prompts.sqlite", create=False) as other:
        before = other.data_version()
        registry.add("coder", "You write Rust.")
        assert other.data_version() != before and other.get("coder").version == 2


def test_template_parse_and_render():
    template = parse_template("Hi {{ name }}, {{greeting}} {{name}}!")
    assert template.variables == ("name", "greeting", "name")
    assert template.render({"name": "Ann", "greeting": "hello"}) == "Hi Ann, hello Ann!"
    assert template.pattern().fullmatch("Hi Bo, hey Bo!") is not None
    assert template.pattern().fullmatch("Hi Bo, hey Al!") is None  # a repeated variable repeats its value
    for bad in ("{{a}}{{b}}", "x {{a", "x }} y", "{{}}"):
        with pytest.raises(TemplateError):
            parse_template(bad)


def test_matching_exact_template_none(registry):
    index = PromptIndex(registry.all_versions())
    exact = index.match("You write Python. Be exact.")
    assert (exact.version.name, exact.version.version, exact.match) == ("coder", 1, "exact")
    filled = index.match("You are terse. You work for ACME and today is Monday.")
    assert (filled.version.version, filled.match, filled.variables) == (2, "template", {"company": "ACME", "date": "Monday"})
    assert index.match("You are terse. You work for ACME and today is Monday. PS") is None
    assert prompt_tag(["Something else"], index) == {
        "name": None, "version": None, "label": None, "match": "none", "variables": {}, "hash": text_hash("Something else"),
    }  # fmt: skip
    # a prompt in several blocks (Claude Code's): one registered block is enough
    tag = prompt_tag(["x-billing-header: abc", "You write Python. Be exact."], index)
    assert (tag["name"], tag["version"], tag["label"], tag["match"]) == ("coder", 1, "latest", "exact")
    assert prompt_tag([], index) == {"name": None, "version": None, "label": None, "match": "none", "variables": {}, "hash": None}


def test_system_segments_of_every_api():
    assert system_segments("chat.completions", {"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "A"}]}, {"role": "user", "content": "u"},
        {"role": "system", "content": "B"}]}) == ["A", "B"]  # fmt: skip
    assert system_segments("anthropic.messages", {"system": "S", "messages": []}) == ["S"]
    assert system_segments("anthropic.messages", {"system": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]}) == ["S1", "S2"]
    assert system_segments("responses", {"instructions": "I", "input": [{"role": "developer", "content": "D"}]}) == ["I", "D"]
    assert system_segments("responses", {"input": "just text"}) == []
    assert system_segments("completions", {"prompt": "p"}) == []


def test_ab_split_is_stable_and_weighted():
    assignment = parse_assignment("greet/1=1, greet/2=3")
    arms = [str(assignment.arm_for(f"s{i}")) for i in range(2000)]
    assert arms == [str(assignment.arm_for(f"s{i}")) for i in range(2000)]
    assert 0.70 < arms.count("greet/2") / len(arms) < 0.80
    assert str(parse_assignment("none=1,greet@staging=1").arms[0]) == "none"
    for bad, message in (("greet/1,greet/2", "no weight"), ("greet/1=0,greet/2=1", "above 0"), ("", "names a prompt")):
        with pytest.raises(PromptError, match=message):
            parse_assignment(bad)


def test_override_rewrites_each_api_and_keeps_variables(registry):
    index = PromptIndex(registry.all_versions())
    override = Override("greet/2", registry.get("greet/2"))
    agent = "You are a helpful assistant for ACME. Today is Monday."
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "developer", "content": agent}]}
    assert replace_system_prompt("chat.completions", chat, override, index) == text_hash(agent)
    sent = "You are terse. You work for ACME and today is Monday."
    assert chat["messages"] == [{"role": "user", "content": "hi"}, {"role": "developer", "content": sent}]
    anthropic = {"system": [{"type": "text", "text": agent, "cache_control": {"type": "ephemeral"}}]}
    replace_system_prompt("anthropic.messages", anthropic, override, index)
    assert anthropic["system"] == [{"type": "text", "text": sent, "cache_control": {"type": "ephemeral"}}]
    # a prompt in pieces, one of them registered (Claude Code's blocks): only that piece is replaced
    blocks = {"system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1"},
                         {"type": "text", "text": agent, "cache_control": {"type": "ephemeral"}}]}  # fmt: skip
    replace_system_prompt("anthropic.messages", blocks, override, index)
    assert blocks["system"] == [{"type": "text", "text": "x-anthropic-billing-header: cc=1"},
                                {"type": "text", "text": sent, "cache_control": {"type": "ephemeral"}}]  # fmt: skip
    two = {"messages": [{"role": "system", "content": "Be safe."}, {"role": "developer", "content": agent}, *[{"role": "user", "content": "u"}]]}
    replace_system_prompt("chat.completions", two, override, index)
    assert two["messages"] == [{"role": "system", "content": "Be safe."}, {"role": "developer", "content": sent}, {"role": "user", "content": "u"}]
    unknown = {"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "u"}, {"role": "system", "content": "B"}]}
    replace_system_prompt("chat.completions", unknown, override, index)
    assert unknown["messages"] == [{"role": "system", "content": TERSE}, {"role": "user", "content": "u"}]
    mixed = {"instructions": "Be safe.", "input": [{"role": "developer", "content": agent}, {"role": "user", "content": "u"}]}
    replace_system_prompt("responses", mixed, override, index)
    assert mixed == {"instructions": "Be safe.", "input": [{"role": "developer", "content": sent}, {"role": "user", "content": "u"}]}
    responses = {"input": "hi"}
    assert replace_system_prompt("responses", responses, override, index) is None
    assert responses["instructions"] == "You are terse. You work for {{company}} and today is {{date}}."


def test_tagger_follows_registry_changes(registry):
    tagger = PromptTagger(registry.path)
    request = {"messages": [{"role": "system", "content": "You write Go."}]}
    assert tagger.tag("chat.completions", request)["match"] == "none"
    registry.add("coder", "You write Go.", labels=["canary"])
    tag = tagger.tag("chat.completions", request, {"override": "coder@canary", "original_hash": "sha256:x"})
    assert tag == {"name": "coder", "version": 2, "label": "canary", "match": "exact", "variables": {},
                   "hash": text_hash("You write Go."), "override": "coder@canary", "original_hash": "sha256:x"}  # fmt: skip


def test_rewrite_request_keeps_every_other_byte(registry):
    index = PromptIndex(registry.all_versions())
    override = Override("coder/1", registry.get("coder/1"))
    agent = "You are a helpful assistant for Café ✓. Today is Monday."
    # the body as an SDK may send it: its own spacing, non-ASCII escaped
    body = ('{"model": "m", "messages": [{"role": "system", "content": %s}, {"role": "user", "content": "h\\u00e9"}],'
            ' "temperature": 0.5}') % json.dumps(agent)  # fmt: skip
    rewritten, original = rewrite_request("chat.completions", body.encode(), override, index)
    assert rewritten == body.replace(json.dumps(agent), json.dumps("You write Python. Be exact.")).encode() and original == text_hash(agent)
    # the agent's prompt copied into a user message too: the body is made again, the copy left alone
    copied = {"messages": [{"role": "system", "content": agent}, {"role": "user", "content": agent}]}
    rewritten, _ = rewrite_request("chat.completions", json.dumps(copied).encode(), override, index)
    assert json.loads(rewritten)["messages"] == [{"role": "system", "content": "You write Python. Be exact."}, {"role": "user", "content": agent}]
    assert rewrite_request("chat.completions", b"not json", override, index) is None
    assert rewrite_request("chat.completions", b"[1]", override, index) is None


def test_no_registry_no_tag(tmp_path):
    assert PromptTagger(tmp_path / "missing.sqlite").tag("chat.completions", {"messages": [{"role": "system", "content": "x"}]}) is None
    assert not (tmp_path / "missing.sqlite").exists()
