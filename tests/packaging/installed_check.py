"""Run by test_wheel.py with the Python of a fresh venv that has only the built
wheel and its declared dependencies: the installed stand-in upstream, behind the
installed proxy in record mode, answers every stand-in scenario of every API,
streamed and not, exactly as it answers directly (for the fixture-backed APIs:
the fixture's bytes, never a 400 for a fixture it cannot find), and each call is
recorded. Prints one line per API; exits 1 with the differences otherwise.

    python installed_check.py TRAJECTORY_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from llmtraj.testing.standin import FIXTURE_APIS, FIXTURES, SCENARIOS, StandinUpstream


def outcome(client: httpx.Client, path: str, body: dict) -> tuple[int, bytes] | str:
    """(status, body) of a call, or the name of the error it broke off with."""
    try:
        response = client.post(path, json=body)
        return response.status_code, response.content
    except httpx.HTTPError as exc:
        return type(exc).__name__


def main(traj: Path) -> int:
    calls = [("/v1/chat/completions", {"model": f"standin-{name}", "messages": [{"role": "user", "content": "hi"}]})
             for name in SCENARIOS]
    for suffix, folder in FIXTURE_APIS:
        path = "/v1/messages" if folder == "anthropic" else f"/v1{suffix}"
        calls += [(path, {"model": f"standin-{fixture.stem}", "max_tokens": 64, "messages": [], "input": "hi",
                          "prompt": "hi"})
                  for fixture in sorted((FIXTURES / folder).glob("*.sse"))]
    calls = [(path, {**body, "stream": stream}) for path, body in calls for stream in (False, True)]
    problems = []
    with StandinUpstream() as upstream, ProxyProcess(
        upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": traj}
    ) as proxy, httpx.Client(base_url=upstream.url, timeout=30) as direct, httpx.Client(
        base_url=f"{proxy.url}/s/wheel", timeout=30
    ) as proxied:
        for path, body in calls:
            want, got = outcome(direct, path, body), outcome(proxied, path, body)
            if got != want:
                problems.append(f"{path} {body['model']} stream={body['stream']}: direct {str(want)[:120]}, "
                                f"through the proxy {str(got)[:120]}")
            elif path != "/v1/chat/completions" and want[0] != 200:
                problems.append(f"{path} {body['model']} stream={body['stream']}: {str(want)[:200]}")
    records = list(read_records(traj / "wheel.jsonl"))
    if len(records) != len(calls):
        problems.append(f"{len(calls)} calls, {len(records)} records")
    for api in sorted({record.api for record in records}):
        print(api, sum(record.api == api for record in records), "calls recorded")
    print("\n".join(problems) or "every scenario answered and recorded alike", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
