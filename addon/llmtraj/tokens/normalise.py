"""The record's `tokens` field, one shape whatever the engine sent:

    {"source": "vllm" | "sglang" | "anticall",
     "prompt_ids": [...],
     "choices": [{"index", "completion_ids", "logprobs", "finish_reason"}],
     "complete": bool, "problems": [...]}

vLLM puts a chat's prompt ids at the top level and each choice's ids in
`token_ids`; SGLang puts prompt ids in each choice; legacy completions have
them per choice on both. `complete` holds only when every choice's ids and
logprobs line up and their total equals the usage's completion tokens.
"""

from __future__ import annotations

from typing import Any


def _ints(value: Any) -> list[int] | None:
    return value if isinstance(value, list) and all(isinstance(v, int) for v in value) else None


def _chat_logprobs(logprobs: Any) -> list[float] | None:
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    return [entry.get("logprob") if isinstance(entry, dict) else None for entry in content]


def _text_logprobs(logprobs: Any) -> list[float] | None:
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    return values if isinstance(values, list) else None


def _engine_of(final: dict[str, Any], choices: list[Any]) -> str:
    fingerprint = final.get("system_fingerprint")
    if isinstance(fingerprint, str) and fingerprint.startswith("vllm"):
        return "vllm"
    if any(isinstance(c, dict) and "matched_stop" in c for c in choices):
        return "sglang"
    return "vllm"


def tokens_from_response(api: str, final: Any, engine: str | None = None) -> dict[str, Any] | None:
    """The `tokens` of an engine's final object (a response body or a stream's
    aggregate); None when it carries no token ids at all."""
    if api not in ("chat.completions", "completions") or not isinstance(final, dict):
        return None
    choices = final.get("choices") if isinstance(final.get("choices"), list) else []
    prompt_ids = _ints(final.get("prompt_token_ids"))
    read_logprobs = _chat_logprobs if api == "chat.completions" else _text_logprobs
    out = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        if prompt_ids is None:
            prompt_ids = _ints(choice.get("prompt_token_ids"))
        out.append({
            "index": choice.get("index", position),
            "completion_ids": _ints(choice.get("token_ids")),
            "logprobs": read_logprobs(choice.get("logprobs")),
            "finish_reason": choice.get("finish_reason"),
        })  # fmt: skip
    if prompt_ids is None and all(c["completion_ids"] is None for c in out):
        return None
    return checked(engine or _engine_of(final, choices), prompt_ids, out, final.get("usage"))


def tokens_from_extra(extra: Any, final: Any = None) -> dict[str, Any] | None:
    """The `tokens` an anti-call driver attached to its answer (`extra`): either
    `tokens` in this very shape, or flat `prompt_ids` (or `prompt_token_ids`),
    `token_ids` (or `completion_ids`) and `logprobs` for choice 0."""
    if not isinstance(extra, dict):
        return None
    usage = final.get("usage") if isinstance(final, dict) else None
    given = extra.get("tokens")
    if isinstance(given, dict):
        choices = [
            {"index": c.get("index", i), "completion_ids": _ints(c.get("completion_ids")),
             "logprobs": c.get("logprobs") if isinstance(c.get("logprobs"), list) else None,
             "finish_reason": c.get("finish_reason")}
            for i, c in enumerate(given.get("choices") or []) if isinstance(c, dict)
        ]  # fmt: skip
        return checked("anticall", _ints(given.get("prompt_ids")), choices, usage)
    prompt_ids = _ints(extra.get("prompt_ids", extra.get("prompt_token_ids")))
    completion_ids = _ints(extra.get("completion_ids", extra.get("token_ids")))
    if prompt_ids is None and completion_ids is None:
        return None
    logprobs = extra.get("logprobs") if isinstance(extra.get("logprobs"), list) else None
    finish = None
    if isinstance(final, dict) and isinstance(final.get("choices"), list) and final["choices"]:
        first = final["choices"][0]
        finish = first.get("finish_reason") if isinstance(first, dict) else None
    choice = {"index": 0, "completion_ids": completion_ids, "logprobs": logprobs, "finish_reason": finish}
    return checked("anticall", prompt_ids, [choice], usage)


def checked(source: str, prompt_ids: list[int] | None, choices: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
    """The `tokens` field with `complete` and `problems` worked out."""
    problems = []
    if prompt_ids is None:
        problems.append("no prompt ids")
    total = 0
    for choice in choices:
        ids, logprobs = choice["completion_ids"], choice["logprobs"]
        where = f"choice {choice['index']}"
        if ids is None:
            problems.append(f"{where}: no completion ids")
            continue
        total += len(ids)
        if logprobs is None:
            problems.append(f"{where}: no logprobs")
        elif len(logprobs) != len(ids):
            problems.append(f"{where}: {len(ids)} ids but {len(logprobs)} logprobs")
        elif any(not isinstance(v, (int, float)) for v in logprobs):
            problems.append(f"{where}: a logprob is missing")
    if not choices:
        problems.append("no choices")
    expected = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(expected, int):
        problems.append("no usage to check the completion ids against")
    elif expected != total:
        problems.append(f"{total} completion ids but usage says {expected} completion tokens"
                        " (a tool or reasoning parser may have swallowed some: vllm#27482)")  # fmt: skip
    return {"source": source, "prompt_ids": prompt_ids, "choices": choices, "complete": not problems, "problems": problems}


def summary(tokens: dict[str, Any]) -> str:
    """One line for people: `prompt 17, completion 8 (complete)`, choices' counts joined by +."""
    prompt = tokens.get("prompt_ids")
    counts = "+".join(str(len(c["completion_ids"])) if c.get("completion_ids") is not None else "?"
                      for c in tokens.get("choices") or [])  # fmt: skip
    state = "complete" if tokens.get("complete") else "incomplete: " + "; ".join(tokens.get("problems") or [])
    return f"prompt {len(prompt) if prompt is not None else '?'}, completion {counts or '?'} ({state})"
