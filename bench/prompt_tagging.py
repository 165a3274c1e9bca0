"""What prompt tagging costs per call (part of `scripts/bench`; alone with
`scripts/bench --prompt-tagging`): a 200 KB chat request (a long conversation
after a 3 KB system prompt) against a registry of 100 prompts, half of them
templates. Measured in the record writer's terms: the request is already parsed
(the record needs it parsed anyway), tagging is finding the system prompt,
checking the registry for changes, and matching. Cases: the system prompt is
a registered text (exact), a filled-in template (the last template tried), or
unknown. Also what an override's rewrite of that request costs on the proxy
(parse, replace the prompt's JSON string), which only sessions with an override pay."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from llmtraj.prompts.matching import PromptIndex
from llmtraj.prompts.override import Override, rewrite_request
from llmtraj.prompts.registry import PromptRegistry
from llmtraj.prompts.tagging import PromptTagger

TARGET_MS = 0.2
PROMPTS = 100
REQUEST_BYTES = 200_000


def _prompt_text(i: int) -> str:
    rules = "".join(f"Rule {i}.{j}: keep answers about topic {j} short, cite files, never guess. " for j in range(40))
    if i % 2:
        return f"You are agent {i} working in {{{{repo}}}} for {{{{user}}}}. " + rules + "Today is {{date}}."
    return f"You are agent {i}, a plain assistant. " + rules


def _request(system: str) -> dict:
    messages = [{"role": "system", "content": system}]
    turn = 0
    while len(json.dumps(messages)) < REQUEST_BYTES:
        messages.append({"role": "user" if turn % 2 == 0 else "assistant",
                         "content": f"turn {turn}: " + "some source code and its discussion " * 60})  # fmt: skip
        turn += 1
    return {"model": "m", "messages": messages}


def _per_call_ms(work, calls: int, rounds: int = 5) -> float:
    """The median over `rounds` of the mean time per call."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        times.append((time.perf_counter() - start) / calls * 1000)
    return statistics.median(times)


def measure(calls: int = 2000) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.sqlite"
        with PromptRegistry(path) as registry:
            for i in range(PROMPTS):
                registry.add(f"agent-{i:03d}", _prompt_text(i))
            last_template = registry.get(f"agent-{PROMPTS - 1:03d}")
            index = PromptIndex(registry.all_versions())
        filled = last_template.template.render({"repo": "/src/app", "user": "ann", "date": "Monday"})
        cases = {
            "exact": _request(_prompt_text(PROMPTS - 2)),
            "template": _request(filled),
            "none": _request("You are an unregistered assistant. " + "Be careful. " * 250),
        }
        tagger = PromptTagger(path)
        results: dict[str, float] = {}
        for case, request in cases.items():
            expected = {"exact": "exact", "template": "template", "none": "none"}[case]
            assert tagger.tag("chat.completions", request)["match"] == expected, case  # a broken tagger cannot look fast
            results[f"tag.{case}_ms"] = _per_call_ms(lambda r=request: tagger.tag("chat.completions", r), calls)
        body = json.dumps(cases["template"]).encode()
        override = Override("agent-001/1", registry_version(path, "agent-001"))

        rewritten, _ = rewrite_request("chat.completions", body, override, index)
        assert json.loads(rewritten)["messages"][0]["content"] == override.version.text
        results["override_rewrite_ms"] = _per_call_ms(lambda: rewrite_request("chat.completions", body, override, index),
                                                      max(calls // 20, 20))  # fmt: skip
        results["request_bytes"] = len(body)
        results["system_prompt_chars"] = len(filled)
        results["prompts"] = PROMPTS
        return results


def registry_version(path: Path, name: str):
    with PromptRegistry(path) as registry:
        return registry.get(name)


def report(results: dict) -> list[str]:
    worst = max(results[f"tag.{case}_ms"] for case in ("exact", "template", "none"))
    return [
        f"prompt tagging: a {results['request_bytes'] / 1000:.0f} KB chat request, a "
        f"{results['system_prompt_chars'] / 1000:.1f} K-character system prompt, {results['prompts']} registered "
        f"prompts (half templates), in the record writer:",
        "",
        "| case | per call ms |",
        "| :--- | ---: |",
        *(f"| {case} | {results[f'tag.{case}_ms']:.4f} |" for case in ("exact", "template", "none")),
        f"| override rewrite on the proxy (parse, replace the prompt's JSON string) | {results['override_rewrite_ms']:.3f} |",
        "",
        f"{'PASS' if worst < TARGET_MS else 'MISS'}  prompt tagging: {worst:.4f} ms per call at worst "
        f"(target < {TARGET_MS} ms)",
    ]


if __name__ == "__main__":
    print("\n".join(report(measure())))
