"""Normalisation for replay matching: the parts of a request that change from
run to run of the same agent on the same task (ids, dates, home paths, pids,
per-call hashes) are dropped or replaced by placeholders, in the recorded and
the live request alike, before they are compared. The record itself is never
changed. Knows nothing of mitmproxy.

A rule either drops a field by path or rewrites strings by regex:

    drop    input[*].id                      fields; `*` any key, `[*]` any list item, `[2]` one item
    value   pattern + placeholder            every string, or only strings under `under` (a path)

Rules come in presets, one per agent, picked per call from what the agent
sends (its user-agent, its own headers, or, for agents that send neither,
words of its prompt); the `generic` rules apply to every call. A user file
(`llm_traj_replay_rules`, TOML or YAML) adds rules, overrides built-in ones by
name, switches them off, and declares agents of its own.

Rules are compiled once per preset. Normalising a body walks it once, and
what an agent sends again on every call (the prompt, the tools, the history)
is not walked again: the items of its outermost lists are remembered by their
JSON text, so each costs a serialisation in C and a dict lookup; strings are
remembered too, so a string seen before costs a lookup, not a regex pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_core import to_json

GENERIC = "generic"  # the rules every call gets, and the name of calls of no known agent
_CACHE_LIMIT = 50_000  # distinct strings remembered per rule set before it starts afresh
_ITEMS_LIMIT = 8_000_000  # bytes of list items' JSON remembered per rule set before it starts afresh


class RuleError(ValueError):
    """A rule or rules file that cannot be used, in one line."""


# ----------------------------------------------------------------- paths


class _Any:
    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


ANY_KEY, ANY_INDEX = _Any("*"), _Any("[*]")
Token = str | int | _Any
_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[(?:\*|\d+)\])*)")


def parse_path(text: str) -> tuple[Token, ...]:
    """`messages[*].content[0].text` -> ('messages', ANY_INDEX, 'content', 0, 'text')."""
    tokens: list[Token] = []
    rest = text.strip()
    if rest.startswith("["):  # a body that is a list
        rest = "*" + rest
        skip_first = True
    else:
        skip_first = False
    for part in rest.split("."):
        m = _SEGMENT.fullmatch(part)
        if not m:
            raise RuleError(f"bad path {text!r}: use keys and [*] / [N] joined by dots, e.g. input[*].id")
        name, indexes = m.groups()
        if not skip_first:
            tokens.append(ANY_KEY if name == "*" else name)
        skip_first = False
        for index in re.findall(r"\[(\*|\d+)\]", indexes):
            tokens.append(ANY_INDEX if index == "*" else int(index))
    if not tokens:
        raise RuleError(f"bad path {text!r}: empty")
    return tuple(tokens)


def _path_text(tokens: tuple[Token, ...]) -> str:
    out = ""
    for token in tokens:
        if token is ANY_INDEX or isinstance(token, int):
            out += f"[{token if isinstance(token, int) else '*'}]"
        else:
            out += ("." if out else "") + str(token)
    return out


# ----------------------------------------------------------------- rules


@dataclass(frozen=True, eq=False)
class Rule:
    """One rule: `drop` a field, or replace what `pattern` matches in strings
    (all of them, or those at or below `under`) by `placeholder` (a
    `re.sub` template: `\\1` keeps a group)."""

    name: str
    drop: tuple[Token, ...] | None = None
    pattern: re.Pattern[str] | None = None
    placeholder: str = ""
    under: tuple[Token, ...] | None = None
    agents: frozenset[str] | None = None  # presets it belongs to; None: every call
    quick: re.Pattern[str] | None = None  # found in every string `pattern` matches, and fast to search for

    @property
    def path(self) -> tuple[Token, ...] | None:
        return self.drop if self.drop is not None else self.under

    def describe(self) -> str:
        if self.drop is not None:
            return f"drop {_path_text(self.drop)}"
        where = f" under {_path_text(self.under)}" if self.under is not None else ""
        return f"{self.pattern.pattern} -> {self.placeholder}{where}"


def make_rule(
    name: str,
    *,
    drop: str | None = None,
    pattern: str | None = None,
    placeholder: str | None = None,
    under: str | None = None,
    agents: Iterable[str] | None = None,
    quick: str | None = None,
) -> Rule:
    """A rule from its written form; RuleError names the rule."""
    try:
        if not name or not isinstance(name, str):
            raise RuleError("a rule needs a name")
        if (drop is None) == (pattern is None):
            raise RuleError("give either drop (a path) or pattern (a regex), not both")
        if drop is not None:
            if placeholder is not None or under is not None:
                raise RuleError("placeholder and under go with pattern, not drop")
            return Rule(name, drop=parse_path(drop), agents=_agents(agents))
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise RuleError(f"bad pattern {pattern!r}: {exc}") from None
        if compiled.search(""):
            raise RuleError(f"pattern {pattern!r} matches the empty string")
        placeholder = f"<{name}>" if placeholder is None else placeholder
        _check_template(placeholder, compiled)
        return Rule(name, pattern=compiled, placeholder=placeholder, under=None if under is None else parse_path(under),
                    agents=_agents(agents), quick=None if quick is None else re.compile(quick))  # fmt: skip
    except RuleError as exc:
        raise RuleError(f"rule {name!r}: {exc}") from None


def _check_template(placeholder: str, pattern: re.Pattern[str]) -> None:
    """A group the placeholder names must exist (else every call would fail)."""
    for number, name in re.findall(r"\\(?:(\d+)|g<([^>]*)>)", placeholder):
        if number and int(number) > pattern.groups:
            raise RuleError(f"placeholder {placeholder!r} refers to group {number}, the pattern has {pattern.groups}")
        if name and not (name in pattern.groupindex or (name.isdigit() and int(name) <= pattern.groups)):
            raise RuleError(f"placeholder {placeholder!r} refers to group {name!r}, which the pattern lacks")


def _agents(agents: Iterable[str] | None) -> frozenset[str] | None:
    if agents is None:
        return None
    if isinstance(agents, str) or not all(isinstance(a, str) for a in agents):
        raise RuleError("agents must be a list of preset names")
    return frozenset(agents)


# --------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """An agent: how its calls are recognised, and the rules they get."""

    name: str
    title: str
    user_agent: re.Pattern[str] | None = None  # searched in the User-Agent header
    headers: tuple[str, ...] = ()  # any of these (lower-case) header names present
    markers: tuple[str, ...] = ()  # or any of these strings in the body (agents that send no header of their own)
    rules: tuple[str, ...] = ()  # names of its rules, besides the generic ones

    def detected_by(self) -> str:
        ways = []
        if self.user_agent is not None:
            ways.append(f"user-agent /{self.user_agent.pattern}/")
        ways += [f"header {h}" for h in self.headers]
        ways += [f"body contains {m!r}" for m in self.markers]
        return ", ".join(ways) or "-"

    def matches(self, headers: Mapping[str, str], text: str) -> bool:
        if self.user_agent is not None and self.user_agent.search(headers.get("user-agent", "")):
            return True
        if any(h in headers for h in self.headers):
            return True
        return any(m in text for m in self.markers)


_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?"
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,?"

# The rule library: name -> written form. Generic ones apply to every call.
BUILTIN_RULES: dict[str, dict[str, Any]] = {
    # generic
    "uuid": {"pattern": r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
             "placeholder": "<uuid>", "quick": r"-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"},
    "iso-date": {"pattern": r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b",
                 "placeholder": "<date>", "quick": r"-\d\d-\d\d"},
    "written-date": {"pattern": rf"\b(?:{_DAY} )?(?:{_MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}|\d{{1,2}} {_MONTH},? \d{{4}})\b",
                     "placeholder": "<date>", "quick": r" \d{4}\b"},
    "clock-time": {"pattern": r"\b\d{2}:\d{2}:\d{2}(?:\.\d+)?\b", "placeholder": "<time>", "quick": r":\d\d:\d\d"},
    # Absolute paths (home, working directory, temp dirs); `/` first for a fast scan,
    # then: not inside a URL, a relative path or a word.
    "abs-path": {"pattern": r"/(?<![\w.~:/\\-]/)(?:[\w.@+-]+/)+[\w.@+-]*", "placeholder": "<path>"},
    "pid": {"pattern": r"(?i)\b(pid|pgid|process group(?: id)?|process id)([ :=#]+)\d+", "placeholder": r"\1\2<pid>",
            "quick": r"(?i)pid|process"},
    "prefixed-id": {"pattern": r"\b(msg|fc|fco|call|toolu|resp|rs|chatcmpl|req|ses|prt|run|evt|item)_[A-Za-z0-9-]{16,}\b",
                    "placeholder": r"\1_<id>", "quick": r"_[A-Za-z0-9-]{16}"},
    # Claude Code
    "claude-user-id": {"drop": "metadata.user_id"},
    "claude-billing-hash": {"pattern": r"cch=[0-9a-f]+;", "placeholder": "cch=<hash>;", "under": "system[*].text"},
    # Codex
    "codex-client-metadata": {"drop": "client_metadata"},
    "codex-prompt-cache-key": {"drop": "prompt_cache_key"},
    "codex-item-id": {"drop": "input[*].id"},
    "codex-chunk-id": {"pattern": r"\bChunk ID: [0-9a-f]+", "placeholder": "Chunk ID: <id>", "under": "input[*].output"},
    "codex-wall-time": {"pattern": r"\bWall time: [0-9.]+ seconds", "placeholder": "Wall time: <s> seconds",
                        "under": "input[*].output"},
    # Gemini CLI, Qwen Code (a Gemini CLI fork)
    "gemini-session-id": {"drop": "session_id"},
    "gemini-prompt-id": {"drop": "user_prompt_id"},
    "qwen-session-id": {"drop": "metadata.sessionId"},
    "qwen-prompt-id": {"drop": "metadata.promptId"},
    # opencode
    "opencode-cache-key": {"drop": "prompt_cache_key"},
    "opencode-provider-cache-key": {"drop": "promptCacheKey"},
    # litellm-based agents (OpenHands, SWE-agent, mini-swe-agent, aider)
    "litellm-metadata": {"drop": "metadata"},
    "elapsed-seconds": {"pattern": r"\b(took|in|elapsed:?|runtime:?) [0-9]+\.[0-9]+ ?(s|sec|seconds)\b",
                        "placeholder": r"\1 <s> \2", "quick": r"\d\.\d+ ?s"},
}  # fmt: skip

GENERIC_RULES = ("uuid", "iso-date", "written-date", "clock-time", "abs-path", "pid", "prefixed-id")
_LITELLM = ("litellm-metadata", "elapsed-seconds")

BUILTIN_PRESETS: tuple[Preset, ...] = (
    Preset("claude-code", "Claude Code", re.compile(r"^claude-cli/"), ("x-claude-code-session-id",),
           rules=("claude-user-id", "claude-billing-hash")),
    Preset("codex", "Codex", re.compile(r"^codex"), ("x-codex-turn-metadata", "x-codex-window-id"),
           rules=("codex-client-metadata", "codex-prompt-cache-key", "codex-item-id", "codex-chunk-id",
                  "codex-wall-time")),
    Preset("gemini-cli", "Gemini CLI", re.compile(r"^GeminiCLI/"), rules=("gemini-session-id", "gemini-prompt-id")),
    Preset("qwen-code", "Qwen Code", re.compile(r"^QwenCode/"),
           rules=("qwen-session-id", "qwen-prompt-id", "gemini-prompt-id")),
    Preset("opencode", "opencode", re.compile(r"(?i)\bopencode/"), ("x-opencode-session", "x-opencode-request"),
           rules=("opencode-cache-key", "opencode-provider-cache-key")),
    Preset("openhands", "OpenHands", re.compile(r"(?i)openhands"), markers=("OpenHands",), rules=_LITELLM),
    Preset("mini-swe-agent", "mini-swe-agent", re.compile(r"(?i)mini-swe-agent"),
           markers=("mini-swe-agent", "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"), rules=_LITELLM),
    Preset("swe-agent", "SWE-agent", re.compile(r"(?i)swe-agent"), markers=("SWE-agent",), rules=_LITELLM),
    Preset("aider", "aider", re.compile(r"(?i)\baider\b"), markers=("Act as an expert software developer",),
           rules=_LITELLM),
)  # fmt: skip


# ---------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class Normalized:
    """A body as normalised matching sees it: `key` is compared, `body` shows
    a difference, `fired` names the rules that changed something."""

    key: str
    body: Any
    fired: tuple[str, ...]
    preset: str


class RuleSet:
    """The rules of one preset, compiled: a body is normalised by one walk."""

    def __init__(self, preset: str, rules: Iterable[Rule]) -> None:
        self.preset = preset
        self.rules = tuple(rules)
        self._global = tuple(r for r in self.rules if r.pattern is not None and r.under is None)
        # (rule, position in its path) pairs still being followed at the root
        self._roots = tuple((r, 0) for r in self.rules if r.path is not None)
        self._caches: dict[tuple[Rule, ...], dict[str, Any]] = {}  # per rule tuple: string -> _rewrite's entry
        # per (states, rules) a list item is normalised under: its JSON -> (normalised, its JSON, rules fired)
        self._items: dict[tuple, dict[bytes, tuple[Any, bytes, tuple[str, ...]]]] = {}
        self._items_bytes = 0
        self._steps: dict[tuple, dict[Any, tuple]] = {}  # _step's answers, by states and key
        self._index_free: dict[tuple, bool] = {}

    def normalize(self, api: str, body: Any, raw: str | None = None) -> Normalized:
        fired: set[str] = set()
        if raw is not None:
            text = self._rewritten(raw, self._global, fired)
            return Normalized(f"{api}\nraw\n{text}", text, tuple(sorted(fired)), self.preset)
        texts: _Texts = {}
        out = self._walk(body, self._roots, self._global, fired, texts)
        key = f"{api}\njson\n" + _json(out, texts).decode()
        return Normalized(key, out, tuple(sorted(fired)), self.preset)

    def _walk(self, node: Any, states: tuple, scoped: tuple[Rule, ...], fired: set[str], texts: _Texts) -> Any:
        """A normalised copy of a node (keys sorted), while path rules are
        still being followed (`states`)."""
        if not states:
            return self._plain(node, scoped, fired, texts)
        if isinstance(node, dict):
            out = {}
            for key in sorted(node):
                following, added, dropped = self._step(states, key)
                if dropped:
                    fired.update(dropped)
                    continue
                out[key] = self._walk(node[key], following, _with(scoped, added), fired, texts)
            return out
        if isinstance(node, list):
            if self._any_index(states):
                following, added, dropped = self._step(states, ANY_INDEX)  # the same for every item
                if dropped:
                    fired.update(dropped)
                    return []
                child = _with(scoped, added)
                return self._list(node, (following, child), fired, texts,
                                  lambda item, into: self._walk(item, following, child, into, texts))  # fmt: skip
            out_list = []
            for i, item in enumerate(node):
                following, added, dropped = self._step(states, i)
                if dropped:
                    fired.update(dropped)
                    continue
                out_list.append(self._walk(item, following, _with(scoped, added), fired, texts))
            return out_list
        if isinstance(node, str):
            return self._plain(node, scoped, fired, texts)
        return node

    def _step(self, states: tuple, key: Any) -> tuple[tuple, tuple[Rule, ...], tuple[str, ...]]:
        """(the states a child follows, the rules whose `under` it reaches, the
        drop rules that remove it) for a child by key, index or ANY_INDEX
        (any index); worked out once per state set and key."""
        by_key = self._steps.get(states)
        if by_key is None:
            by_key = self._steps[states] = {}
        memo = by_key.get(key)
        if memo is not None:
            return memo
        index = type(key) is int or key is ANY_INDEX
        following, added, dropped = [], [], []
        for rule, position in states:
            token = rule.path[position]
            if index:
                hit = token is ANY_INDEX or (type(token) is int and token == key)
            else:
                hit = token is ANY_KEY or (type(token) is str and token == key)
            if not hit:
                continue
            if position + 1 < len(rule.path):
                following.append((rule, position + 1))
            elif rule.drop is not None:
                dropped.append(rule.name)
            else:
                added.append(rule)
        memo = by_key[key] = (tuple(following), tuple(added), tuple(dropped))
        return memo

    def _any_index(self, states: tuple) -> bool:
        """Whether no state names a list index: then every item steps alike."""
        found = self._index_free.get(states)
        if found is None:
            found = self._index_free[states] = all(type(rule.path[position]) is not int for rule, position in states)
        return found

    def _plain(self, node: Any, rules: tuple[Rule, ...], fired: set[str], texts: _Texts) -> Any:
        """A subtree no path rule reaches: its strings rewritten by `rules`,
        the items of its outermost lists remembered."""
        kind = type(node)
        if kind is dict:
            return {key: self._plain(node[key], rules, fired, texts) for key in sorted(node)}
        if kind is list:
            return self._list(node, ((), rules), fired, texts, lambda item, into: self._rewritten(item, rules, into))
        return self._rewritten(node, rules, fired)

    def _rewritten(self, node: Any, rules: tuple[Rule, ...], fired: set[str]) -> Any:
        if not rules:
            return _sorted_copy(node)
        cache = self._caches.get(rules)
        if cache is None:
            cache = self._caches[rules] = {}
        return _rewrite_tree(node, rules, cache, fired)

    def _list(
        self, items: list, where: tuple, fired: set[str], texts: _Texts, normalize: Callable[[Any, set[str]], Any]
    ) -> list:
        """A list's items normalised by `normalize`, and their JSON noted in
        `texts` for the key. An object or list item whose JSON was normalised
        before at an equal place (`where`: the states and rules it is
        normalised under) is taken from then: JSON keeps key order and
        number types, so equal text is an equal item."""
        known = self._items.get(where)
        if known is None:
            known = self._items[where] = {}
        out, parts = [], []
        for item in items:
            if type(item) is not dict and type(item) is not list:
                done = normalize(item, fired)
                out.append(done)
                parts.append(to_json(done))
                continue
            text = to_json(item)
            entry = known.get(text)
            if entry is None:
                own: set[str] = set()
                lists = len(texts)
                done = normalize(item, own)
                entry = (done, to_json(done) if len(texts) == lists else _json(done, texts), tuple(own))
                if self._items_bytes + len(text) > _ITEMS_LIMIT:
                    for remembered in self._items.values():
                        remembered.clear()
                    self._items_bytes = 0
                known[text] = entry
                self._items_bytes += len(text)
            out.append(entry[0])
            parts.append(entry[1])
            if entry[2]:
                fired.update(entry[2])
        texts[id(out)] = (out, parts)
        return out


# Per normalisation: the lists _list made (by id; kept so the id stays theirs)
# and their items' JSON, from which the key is joined instead of serialised again.
_Texts = dict[int, tuple[list, list[bytes]]]


def _json(node: Any, texts: _Texts) -> bytes:
    """`to_json(node)`, with the lists in `texts` joined from their items' JSON."""
    kind = type(node)
    if kind is list:
        made = texts.get(id(node))
        return to_json(node) if made is None else b"[" + b",".join(made[1]) + b"]"
    if kind is dict:
        return b"{" + b",".join(to_json(key) + b":" + _json(value, texts) for key, value in node.items()) + b"}"
    return to_json(node)


def _with(scoped: tuple[Rule, ...], added: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return scoped if not added else scoped + tuple(r for r in added if r not in scoped)


def _rewrite_tree(node: Any, rules: tuple[Rule, ...], cache: dict, fired: set[str]) -> Any:
    """The hot path: a copy with keys sorted and strings rewritten; a string
    seen before costs a dict lookup."""
    kind = type(node)
    if kind is str:
        hit = cache.get(node)
        if hit is None:
            hit = _rewrite(node, rules, cache)
        if hit is _UNCHANGED:
            return node
        fired.update(hit[1])
        return hit[0]
    if kind is dict:
        return {key: _rewrite_tree(node[key], rules, cache, fired) for key in sorted(node)}
    if kind is list:
        return [_rewrite_tree(item, rules, cache, fired) for item in node]
    return node


_UNCHANGED = ()  # cached for a string no rule changes


def _rewrite(text: str, rules: tuple[Rule, ...], cache: dict) -> Any:
    """A string's entry in its rule set's cache: _UNCHANGED, or (the rewritten
    string, the names of the rules that changed it)."""
    out, names = text, []
    for rule in rules:
        if rule.quick is not None and rule.quick.search(out) is None:
            continue
        out, n = rule.pattern.subn(rule.placeholder, out)
        if n:
            names.append(rule.name)
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    entry = cache[text] = (out, tuple(names)) if names else _UNCHANGED
    return entry


def _sorted_copy(node: Any) -> Any:
    if type(node) is dict:
        return {key: _sorted_copy(node[key]) for key in sorted(node)}
    if type(node) is list:
        return [_sorted_copy(item) for item in node]
    return node


@dataclass
class Normalizer:
    """The presets and rules in force; picks a preset per call and keeps one
    compiled RuleSet per preset."""

    presets: tuple[Preset, ...] = BUILTIN_PRESETS
    rules: dict[str, Rule] = field(default_factory=dict)  # by name: the library, user rules applied
    generic: tuple[str, ...] = GENERIC_RULES
    source: str | None = None  # the user rules file, if any
    _sets: dict[str, RuleSet] = field(default_factory=dict, repr=False)

    @classmethod
    def builtin(cls) -> Normalizer:
        return cls(rules={name: make_rule(name, **spec) for name, spec in BUILTIN_RULES.items()})

    def preset_for(self, headers: Iterable[tuple[str, str]] | Mapping[str, str], text: str = "") -> str:
        """The preset of a call, from its headers (or its body text); `generic` if none."""
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        lower = {k.lower(): v for k, v in pairs}
        return next((p.name for p in self.presets if p.matches(lower, text)), GENERIC)

    def rule_set(self, preset: str) -> RuleSet:
        found = self._sets.get(preset)
        if found is None:
            found = self._sets[preset] = RuleSet(preset, self._rules_of(preset))
        return found

    def _rules_of(self, preset: str) -> list[Rule]:
        own = next((p.rules for p in self.presets if p.name == preset), ())
        chosen = []
        for name, rule in self.rules.items():
            if rule.agents is not None:
                if preset in rule.agents:
                    chosen.append(rule)
            elif name in self.generic or name in own:
                chosen.append(rule)
        return chosen

    def describe(self) -> list[str]:
        """The presets, how each is detected and its rules, for `llm-traj replay-rules`."""
        lines = [f"{GENERIC}: every call", *(f"    {n}: {self.rules[n].describe()}" for n in self._names(GENERIC))]
        for preset in self.presets:
            lines.append(f"{preset.name} ({preset.title}): {preset.detected_by()}")
            lines += [f"    {n}: {self.rules[n].describe()}" for n in self._names(preset.name) if n not in self.generic]
        if self.source:
            lines.append(f"(with the rules of {self.source})")
        return lines

    def _names(self, preset: str) -> list[str]:
        return [r.name for r in self._rules_of(preset)]


# ------------------------------------------------------------ user rules


def normalizer_from_table(data: Mapping[str, Any], source: str = "rules") -> Normalizer:
    """The built-in presets with a user's rules applied. The table:

        disable = ["abs-path"]                      # built-in rules switched off
        [[agents]]                                  # agents of one's own
        name = "my-agent"; user_agent = "^my-agent/"; headers = ["x-my-agent"]; markers = []
        [[rules]]                                   # added, or replacing a built-in rule of that name
        name = "ticket"; pattern = 'TICKET-\\d+'; placeholder = "TICKET-<n>"; under = "messages"; agents = ["my-agent"]
        [[rules]]
        name = "trace"; drop = "metadata.trace_id"
    """
    unknown = sorted(set(data) - {"disable", "agents", "rules"})
    if unknown:
        raise RuleError(f"{source}: unknown key {unknown[0]!r} (use disable, agents, rules)")
    base = Normalizer.builtin()
    rules, presets = dict(base.rules), list(base.presets)
    generic = list(base.generic)
    for i, spec in enumerate(_list(data, "agents", source)):
        presets.insert(i, _preset(spec, source, {p.name for p in presets}))
    known_presets = {p.name for p in presets} | {GENERIC}
    for spec in _list(data, "rules", source):
        if not isinstance(spec, Mapping):
            raise RuleError(f"{source}: each [[rules]] entry must be a table")
        name = spec.get("name")
        extra = sorted(set(spec) - {"name", "drop", "pattern", "placeholder", "under", "agents"})
        if extra:
            raise RuleError(f"{source}: rule {name!r}: unknown key {extra[0]!r}")
        try:
            rule = make_rule(**spec)
        except TypeError:
            raise RuleError(f"{source}: rule {name!r}: needs a name") from None
        except RuleError as exc:
            raise RuleError(f"{source}: {exc}") from None
        if rule.agents is not None and (bad := sorted(rule.agents - known_presets)):
            raise RuleError(f"{source}: rule {name!r}: unknown agent {bad[0]!r} (known: {', '.join(sorted(known_presets))})")
        if rule.agents is not None and GENERIC in rule.agents:  # generic means every call
            rule = Rule(rule.name, rule.drop, rule.pattern, rule.placeholder, rule.under, None)
        elif rule.agents is None and name not in rules:
            generic.append(name)  # a new rule with no agents: every call
        rules[name] = rule
    for name in _list(data, "disable", source):
        if name not in rules:
            raise RuleError(f"{source}: disable: no rule named {name!r}")
        del rules[name]
    return Normalizer(tuple(presets), rules, tuple(generic), source)


def _list(data: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise RuleError(f"{source}: {key} must be a list")
    return value


def _preset(spec: Any, source: str, taken: set[str]) -> Preset:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise RuleError(f"{source}: each [[agents]] entry needs a name")
    name = spec["name"]
    extra = sorted(set(spec) - {"name", "title", "user_agent", "headers", "markers"})
    if extra:
        raise RuleError(f"{source}: agent {name!r}: unknown key {extra[0]!r}")
    if name in taken or name == GENERIC:
        raise RuleError(f"{source}: agent {name!r} is already defined")
    try:
        user_agent = re.compile(spec["user_agent"]) if spec.get("user_agent") else None
    except re.error as exc:
        raise RuleError(f"{source}: agent {name!r}: bad user_agent pattern: {exc}") from None
    headers = tuple(h.lower() for h in spec.get("headers", []))
    markers = tuple(spec.get("markers", []))
    if user_agent is None and not headers and not markers:
        raise RuleError(f"{source}: agent {name!r}: give user_agent, headers or markers to recognise it")
    return Preset(name, spec.get("title", name), user_agent, headers, markers)


def load_rules(path: str | Path | None) -> Normalizer:
    """The normaliser for `llm_traj_replay_rules` (unset: the built-in presets)."""
    if not path:
        return Normalizer.builtin()
    from ..upstreams.config import ConfigError, read_table

    try:
        data = read_table(path)
    except ConfigError as exc:
        raise RuleError(str(exc)) from None
    return normalizer_from_table(data, str(Path(path).expanduser()))
