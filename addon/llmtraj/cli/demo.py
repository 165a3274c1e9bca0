"""The no-API-key demo: a scripted tool-using agent talks, through mitmdump with
the llm-traj addon in record mode, to the bundled stand-in model server; then
the same agent runs again against a replaying proxy with no upstream.

The agent speaks plain HTTP (httpx) rather than through the openai SDK, so the
installed package needs no particular SDK version: the end-to-end tests are
where the real SDKs drive the proxy."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from ..apis.chat_completions import ChatCompletionAggregator
from ..core.sse import SSEParser
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
    messages: list[dict] = [
        {"role": "system", "content": "You are a helpful agent. Use tools when useful."},
        {"role": "user", "content": "What's the weather and time in Paris?"},
    ]
    headers = {"authorization": f"Bearer {api_key}", "user-agent": "llm-traj-demo (scripted agent)"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        request = {"model": "standin-tools", "messages": messages, "tools": TOOLS, "stream": True,
                   "stream_options": {"include_usage": True}}
        parser, aggregator = SSEParser(), ChatCompletionAggregator()
        with client.stream("POST", "chat/completions", json=request) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                for block in parser.feed(chunk):
                    aggregator.add(block)
        for block in parser.finish():
            aggregator.add(block)
        first = aggregator.result()["choices"][0]["message"]
        messages.append({key: value for key, value in first.items() if value is not None})
        for call in first.get("tool_calls") or []:
            function = call["function"]
            result = {"tool": function["name"], "arguments": json.loads(function.get("arguments") or "{}"), "ok": True}
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
        final = client.post("chat/completions", json={"model": "standin-text", "messages": messages})
        final.raise_for_status()
    return final.json()["choices"][0]["message"]["content"] or ""


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
