"""Whether a session's calls extend one another token for token: call N+1's
prompt ids should start with call N's prompt ids plus its completion ids (the
agent sent back what the model produced, rendered by the same template).
Where they do not, the first differing position and a likely cause. Linear
chains of calls (what a trainer gets as one sample) break where this does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _sequence(tokens: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, choice 0's completion ids) of a call, if it has both."""
    if not isinstance(tokens, dict) or not isinstance(tokens.get("prompt_ids"), list):
        return None
    choices = tokens.get("choices") or []
    first = next((c for c in choices if c.get("index", 0) == 0), None)
    if first is None or not isinstance(first.get("completion_ids"), list):
        return None
    return tokens["prompt_ids"], first["completion_ids"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where `b` does not continue `a` (None: `b` starts with all of `a`)."""
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(b) >= len(a) else len(b)


def likely_cause(prompt: list[int], completion: list[int], next_prompt: list[int], position: int) -> str:
    if position >= len(prompt):
        return ("the previous answer came back as other tokens: a template that drops earlier reasoning, "
                "or text re-tokenized differently")  # fmt: skip
    if len(next_prompt) < len(prompt):
        return "the conversation got shorter: a compaction or a truncated history"
    return "an earlier part of the conversation changed: a side call or an edited history"


def continuity(calls: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """For each call with token ids after the session's first one (`calls`: (index,
    tokens) in order): whether it continues the call before it."""
    report = []
    previous: tuple[int, list[int], list[int]] | None = None
    for index, tokens in calls:
        sequence = _sequence(tokens)
        if sequence is None:
            continue
        prompt, completion = sequence
        if previous is not None:
            before, prev_prompt, prev_completion = previous
            position = first_difference(prev_prompt + prev_completion, prompt)
            entry: dict[str, Any] = {"index": index, "previous": before, "continues": position is None}
            if position is not None:
                entry["position"] = position
                entry["cause"] = likely_cause(prev_prompt, prev_completion, prompt, position)
            report.append(entry)
        previous = (index, prompt, completion)
    return report


@dataclass
class Chain:
    """Calls of one session that each extend the one before, as a trainer's sample."""

    calls: list[int]
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)  # 1: the model produced it; 0: tool, user, template
    response_logprobs: list[float] = field(default_factory=list)

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_turn(self, index: int, prompt: list[int], completion: list[int], logprobs: list[float] | None) -> None:
        between = prompt[len(self.sequence) :]
        self.response_ids += between + completion
        self.response_mask += [0] * len(between) + [1] * len(completion)
        self.response_logprobs += [0.0] * len(between) + (list(logprobs) if logprobs else [0.0] * len(completion))
        self.calls.append(index)


def chains(calls: list[tuple[int, Any]]) -> list[Chain]:
    """The linear chains of a session's calls (`calls`: (index, tokens) in order). A
    call continues the latest chain whose tokens its prompt starts with (so a side
    call in between starts a chain of its own and does not break the main one)."""
    found: list[Chain] = []
    for index, tokens in calls:
        sequence = _sequence(tokens)
        if sequence is None:
            continue
        prompt, completion = sequence
        logprobs = next((c.get("logprobs") for c in tokens["choices"] if c.get("index", 0) == 0), None)
        chain = next((c for c in reversed(found) if first_difference(c.sequence, prompt) is None), None)
        if chain is None:
            chain = Chain(calls=[], prompt_ids=list(prompt))
            found.append(chain)
        chain.add_turn(index, prompt, completion, logprobs)
    return found
