"""A scripted policy that drives a real agent CLI through llm-traj's anti-call
control API: on the agent's main conversation, first a tool call that writes
a file (through the agent's own shell tool), then, once the tool's result is
back, a final answer. Side calls (titles, summaries, quota probes) get a short
text. Every request is appended to a JSON-lines log for inspection.

    python tests/agents/policy.py CONTROL_FILE SESSION LOG [--file NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmtraj.anticall import AntiCallClient
from llmtraj.anticall.client import AntiCallError

OUT_FILE = "agent-out.txt"
FILE_TEXT = "written by the scripted policy"
FINAL_ANSWER = "Done: the file is written."
SIDE_ANSWER = "Scripted task"
CALL_ID = "call_scripted_1"  # fixed, so that two runs send the same history back

# Tools that run a shell command, per agent, and how their arguments are shaped.
SHELL_TOOLS = {
    "Bash": lambda cmd: {"command": cmd, "description": "Write the file"},  # Claude Code
    "shell": lambda cmd: {"command": ["bash", "-lc", cmd]},  # Codex (classic)
    "shell_command": lambda cmd: {"command": cmd},  # Codex
    "exec_command": lambda cmd: {"cmd": cmd},  # Codex (unified exec)
    "run_shell_command": lambda cmd: {"command": cmd, "description": "Write the file"},  # Qwen Code, Gemini CLI
    "bash": lambda cmd: {"command": cmd, "description": "Write the file"},  # opencode
}


def tool_names(api: str, request: dict[str, Any]) -> list[str]:
    names = []
    for tool in request.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        name = tool.get("name") or (tool.get("function") or {}).get("name")
        if name:
            names.append(name)
    return names


def has_tool_result(api: str, request: dict[str, Any]) -> bool:
    if api == "responses":
        items = request.get("input")
        return isinstance(items, list) and any(
            isinstance(i, dict) and i.get("type", "").endswith("_call_output") for i in items
        )
    if api == "anthropic.messages":
        return any(
            isinstance(block, dict) and block.get("type") == "tool_result"
            for m in request.get("messages") or []
            if isinstance(m.get("content"), list)
            for block in m["content"]
        )
    return any(m.get("role") == "tool" for m in request.get("messages") or [])


def decide(api: str, request: dict[str, Any], out_file: str) -> dict[str, Any]:
    """What to push for one call: the tool call, the final answer, or a side answer."""
    shell = next((n for n in tool_names(api, request) if n in SHELL_TOOLS), None)
    if shell is None:
        return {"text": SIDE_ANSWER}
    if has_tool_result(api, request):
        return {"text": FINAL_ANSWER}
    arguments = SHELL_TOOLS[shell](f"printf '%s\\n' '{FILE_TEXT}' > {out_file}")
    return {"text": None, "tool_calls": [{"id": CALL_ID, "function": {"name": shell, "arguments": arguments}}],
            "finish_reason": "tool_calls"}


async def drive(control_file: Path, session: str, log: Path, out_file: str, wait: float = 60.0) -> int:
    deadline = time.monotonic() + wait
    while not control_file.exists():
        if time.monotonic() > deadline:
            print(f"policy: no control file {control_file} after {wait}s", file=sys.stderr)
            return 1
        await asyncio.sleep(0.05)
    answered = 0
    async with AntiCallClient.from_control_file(control_file) as proxy:
        with log.open("a") as out:
            while True:
                try:
                    event = await proxy.get_request(session=session, timeout=5)
                except AntiCallError as exc:
                    if exc.status == 0:  # the proxy stopped: the run is over
                        return 0
                    raise
                if event is None or event.type == "cancelled":
                    continue
                if event.session_end:
                    return 0
                answer = decide(event.api, event.request, out_file)
                out.write(json.dumps({"index": event.index, "api": event.api, "stream": event.stream,
                                      "request": event.request, "answer": answer}) + "\n")
                out.flush()
                text = answer.pop("text")
                await proxy.send_response(event, text=text, **answer)
                answered += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("control_file", type=Path)
    parser.add_argument("session")
    parser.add_argument("log", type=Path)
    parser.add_argument("--file", default=OUT_FILE)
    args = parser.parse_args()
    return asyncio.run(drive(args.control_file, args.session, args.log, args.file))


if __name__ == "__main__":
    sys.exit(main())
