"""Properties of replay's canonicalisation (issue 15), with hypothesis: two
requests that differ only in what the rules take away (volatile strings the
generic rules replace: ids, dates, times, absolute paths, pids; fields a
preset drops; the fields matching ignores; key order, spacing and escapes of
the JSON) get the same normalised key, as replay computes it from the bytes
and headers of a live request; requests that differ in anything else get
different keys, normalised and exact."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.apis import API_BY_NAME
from llmtraj.replay.matching import DEFAULT_IGNORE, canonical_request
from llmtraj.replay.normalize import Normalizer

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
NORMALIZER = Normalizer.builtin()

# Text no rule touches: no digits, and none of the characters the patterns
# need (/ _ - = ; : < >), JSON's awkward ones welcome.
STABLE_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGXYZ é杭✓\"\\\n.,!?()", max_size=12)
STABLE_KEYS = st.sampled_from(["model", "messages", "content", "role", "text", "tools", "name", "type", "x", "é"])
# What the generic rules replace, by kind: each drawn anew per request.
VOLATILE = {
    "uuid": st.uuids().map(str),
    "date": st.dates().map(lambda d: d.isoformat()),
    "datetime": st.datetimes().map(lambda d: f"{d.date().isoformat()}T{d:%H:%M:%S}Z"),
    "written-date": st.tuples(st.sampled_from(["Jan", "March", "Sep."]), st.integers(1, 28), st.integers(1000, 9999)).map(
        lambda t: f"{t[0]} {t[1]}, {t[2]}"),
    "time": st.times().map(lambda t: t.strftime("%H:%M:%S")),
    "path": st.lists(st.text(alphabet="abcxyz.@+", min_size=1, max_size=6).filter(lambda s: s.strip(".")), min_size=2,
                     max_size=4).map(lambda parts: "/" + "/".join(parts)),
    "pid": st.integers(0, 10**7).map(lambda n: f"pid {n}"),
    **{f"{prefix}-id": st.text(alphabet="abcdefXYZ0123456789", min_size=16, max_size=24).map(f"{prefix}_".__add__)
       for prefix in ("msg", "call", "toolu", "resp")},  # the id changes, its prefix stays
    "billing-hash": st.text(alphabet="0123456789abcdef", min_size=1, max_size=12).map("cch={};".format),  # claude-code's, in system texts only
}  # fmt: skip
# Presets by the headers that pick them, with the fields each drops besides the ignored ones.
PRESETS = {
    "generic": ([("User-Agent", "python-httpx/0.28")], ()),
    "claude-code": ([("User-Agent", "claude-cli/2.0.1 (external, cli)")], ()),
    "codex": ([("User-Agent", "codex_cli_rs/0.50.0")], ("client_metadata",)),
}


def nested(keys: st.SearchStrategy[str], size: int):
    """Lists and objects of what `inner` makes, for st.recursive."""
    return lambda inner: st.lists(inner, max_size=size) | st.dictionaries(keys, inner, max_size=size)


ANYTHING = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), nested(st.text(max_size=4), 2),
                        max_leaves=5)


class Volatile:
    """A string with a volatile part between two stable ones."""

    def __init__(self, before: str, kind: str, after: str) -> None:
        self.before, self.kind, self.after = before, kind, after

    def __repr__(self) -> str:
        return f"Volatile({self.before!r}, {self.kind!r}, {self.after!r})"


STABLE_LEAF = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | STABLE_TEXT
LEAF = STABLE_LEAF | st.builds(Volatile, STABLE_TEXT, st.sampled_from(sorted(set(VOLATILE) - {"billing-hash"})), STABLE_TEXT)
TREE = st.recursive(LEAF, nested(STABLE_KEYS, 3), max_leaves=12)


@st.composite
def templates(draw) -> tuple[str, str, dict[str, Any]]:
    """(api, preset, a body whose Volatile leaves are yet to be drawn); codex's
    `input` items carry an `id` it drops, claude-code's system texts a billing hash."""
    preset = draw(st.sampled_from(sorted(PRESETS)))
    body = draw(st.dictionaries(STABLE_KEYS, TREE, max_size=4))
    if preset == "claude-code":
        billing = {"type": "text", "text": Volatile(draw(STABLE_TEXT), "billing-hash", draw(STABLE_TEXT))}
        body["system"] = [billing, *draw(st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": LEAF}), max_size=2))]
    if preset == "codex":
        body["input"] = draw(st.lists(st.dictionaries(st.sampled_from(["type", "role", "content"]), TREE, max_size=2), max_size=3))
    return draw(st.sampled_from(["chat.completions", "anthropic.messages", "responses"])), preset, body


def drawn(draw, node: Any) -> Any:
    if isinstance(node, Volatile):
        return f"{node.before} {draw(VOLATILE[node.kind])} {node.after}"
    if isinstance(node, list):
        return [drawn(draw, item) for item in node]
    if isinstance(node, dict):
        return {key: drawn(draw, value) for key, value in node.items()}
    return node


def request(draw, preset: str, template: dict[str, Any], spelling: int) -> bytes:
    """One run's request: volatile parts, dropped and ignored fields drawn
    anew, spelled one of three ways."""
    body = drawn(draw, template)
    for item in body.get("input", []):
        item["id"] = draw(ANYTHING)  # codex's input[*].id
    for field in (*PRESETS[preset][1], *DEFAULT_IGNORE):
        if draw(st.booleans()):
            body[field] = draw(ANYTHING)
    if spelling == 0:
        return json.dumps(body, ensure_ascii=False).encode()
    if spelling == 1:
        return json.dumps(reversed_keys(body), indent=1).encode()  # \u escapes, other order, spaces
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).replace("/", "\\/").encode()


def reversed_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: reversed_keys(node[key]) for key in reversed(node)}
    if isinstance(node, list):
        return [reversed_keys(item) for item in node]
    return node


def keys(api: str, preset: str, body: bytes) -> tuple[str, str]:
    """(exact key, normalised key) of a live request, as replay makes them."""
    shape, headers = API_BY_NAME[api], PRESETS[preset][0]
    live = canonical_request(shape, body, headers, frozenset(DEFAULT_IGNORE))
    picked = NORMALIZER.preset_for(live.headers, live.key)
    assert picked == preset
    return live.key, NORMALIZER.rule_set(picked).normalize(live.api, live.body).key


def changed(draw, node: Any) -> Any:
    """`node` with one stable part changed: a leaf, a key, an item."""
    if isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        return {**node, key: changed(draw, node[key])}
    if isinstance(node, list) and node and draw(st.booleans()):
        at = draw(st.integers(0, len(node) - 1))
        return [*node[:at], changed(draw, node[at]), *node[at + 1 :]]
    if isinstance(node, dict):
        key = draw(STABLE_KEYS.filter(lambda k: k not in node) | st.sampled_from(sorted(node) or ["x"]))
        return {k: v for k, v in node.items() if k != key} if key in node else {**node, key: draw(STABLE_LEAF)}
    if isinstance(node, list):
        return node[:-1] if node and draw(st.booleans()) else [*node, draw(STABLE_LEAF)]
    if isinstance(node, Volatile):
        return Volatile(node.before + draw(STABLE_TEXT.filter(bool)), node.kind, node.after)
    return draw(STABLE_LEAF.filter(lambda other: json.dumps(other) != json.dumps(node)))


@SETTINGS
@given(templates(), st.data())
def test_requests_that_differ_only_in_what_the_rules_take_away_match(template, data):
    api, preset, body = template
    first, second = (request(data.draw, preset, body, spelling) for spelling in data.draw(st.tuples(*[st.integers(0, 2)] * 2)))
    assert keys(api, preset, first)[1] == keys(api, preset, second)[1]


def changed_body(draw, body: dict[str, Any]) -> dict[str, Any]:
    """A body with one stable part changed (an `input` item stays an object)."""
    items = body.get("input")
    if items and draw(st.booleans()):
        at = draw(st.integers(0, len(items) - 1))
        return {**body, "input": [*items[:at], changed(draw, items[at]), *items[at + 1 :]]}
    rest = changed(draw, {k: v for k, v in body.items() if k != "input"})
    return rest if items is None else {**rest, "input": items}


@SETTINGS
@given(templates(), st.data())
def test_requests_that_differ_in_anything_else_do_not_match(template, data):
    api, preset, body = template
    other = changed_body(data.draw, body)
    first, second = request(data.draw, preset, body, 0), request(data.draw, preset, other, data.draw(st.integers(0, 2)))
    exact, normalized = keys(api, preset, first)
    other_exact, other_normalized = keys(api, preset, second)
    assert normalized != other_normalized and exact != other_exact
