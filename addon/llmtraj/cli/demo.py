"""The no-API-key demo: a scripted tool-using agent talks, through mitmdump with
the llm-traj addon in record mode, to the bundled stand-in model server; then
the same agent runs again against a replaying proxy with no upstream."""

from __future__ import annotations

import json
from pathlib import Path

from openai import OpenAI

from ..core.store import read_records
from ..inspect.show import render
from ..testing.standin import StandinUpstream
from .proxy_process import ProxyProcess

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for the demo",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
        },
    }
    for name in ("get_weather", "get_time")
]


def scripted_agent(base_url: str, api_key: str = "sk-demo-not-a-real-key") -> str:
    """A two-step agent: a streamed call that asks for tools, then a plain call
    with the tool results. Returns the final answer."""
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages: list[dict] = [
        {"role": "system", "content": "You are a helpful agent. Use tools when useful."},
        {"role": "user", "content": "What's the weather and time in Paris?"},
    ]
    with client.chat.completions.stream(
        model="standin-tools", messages=messages, tools=TOOLS, stream_options={"include_usage": True}
    ) as stream:
        first = stream.get_final_completion().choices[0].message
    messages.append(first.model_dump(exclude_none=True, exclude={"parsed"}))
    for call in first.tool_calls or []:
        result = {"tool": call.function.name, "arguments": json.loads(call.function.arguments or "{}"), "ok": True}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(model="standin-text", messages=messages)
    return final.choices[0].message.content or ""


def run_demo(path: Path) -> str:
    """Record the scripted agent into `path`, replay it with no upstream at
    all, and return the rendered trajectory with what the replay did."""
    with StandinUpstream() as upstream, ProxyProcess(
        upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": path}
    ) as proxy:
        recorded = scripted_agent(f"{proxy.url}/s/demo/v1")
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing answers there
    with ProxyProcess(upstream=nowhere, options={"llm_traj_mode": "replay", "llm_traj_path": path}) as proxy:
        replayed = scripted_agent(f"{proxy.url}/s/demo/v1")
    records = list(read_records(path / "demo.jsonl"))
    verdict = "the same answer" if replayed == recorded else f"a different answer: {replayed!r}"
    return (
        f"recorded {len(records)} calls of a scripted agent through mitmdump + llm-traj:\n\n"
        f"{render(records)}\n\n"
        f"replayed them with no upstream at all: the agent got {verdict}"
    )
