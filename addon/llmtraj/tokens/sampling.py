"""Sampling control for RL, per route (`sampling` in `llm_traj_config`): which
sampling keys the agent may set (`allow`: the others it sets are taken out)
and the values the proxy imposes (`fixed`, e.g. temperature, top_p, seed).
What was taken out and imposed is recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The request keys that steer sampling (OpenAI's, and vLLM's and SGLang's
# extensions; `structured_outputs`: vLLM's constrained decoding, a regex or schema).
SAMPLING_KEYS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "n", "max_tokens", "max_completion_tokens", "stop",
    "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
    "ignore_eos", "best_of", "structured_outputs",
})  # fmt: skip


@dataclass(frozen=True)
class SamplingPolicy:
    allow: frozenset[str] | None = None  # None: the agent may set any
    fixed: dict[str, Any] = field(default_factory=dict)

    def apply(self, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the request to send, the note for the record: `removed` keys with the
        agent's values, `fixed` values imposed); the note is empty when nothing changed."""
        removed = {}
        if self.allow is not None:
            removed = {k: v for k, v in request.items() if k in SAMPLING_KEYS and k not in self.allow and k not in self.fixed}
        fixed = {k: v for k, v in self.fixed.items() if request.get(k, _UNSET) != v}
        if not removed and not fixed:
            return request, {}
        sent = {k: v for k, v in request.items() if k not in removed}
        sent.update(self.fixed)
        note: dict[str, Any] = {}
        if removed:
            note["removed"] = removed
        if fixed:
            note["fixed"] = fixed
        return sent, note


_UNSET = object()
