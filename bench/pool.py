"""Anti-call calls per second through `llmtraj.ray.ProxyPool` against one proxy
alone (`scripts/bench --only pool`; needs the scale extra: run it as
`LLM_TRAJ_VENV=.venv-scale LLM_TRAJ_EXTRAS=scale scripts/bench --only pool`).

Agents are plain keep-alive HTTP clients (httpx) in this process, `sessions`
of them at once, each making `calls` chat calls in its own session; a trainer
in this process answers every held call. Targets:

- `proxy alone`: one mitmdump with the addon, the trainer on its control API
  (`AntiCallClient`), no Ray;
- `pool of N`: `ProxyPool(N)` on a local Ray cluster (`ray.init(num_cpus=2)`),
  the trainer on `pool.calls()` / `pool.respond`.

Reported: calls/s, sessions/s (an episode of `calls` calls), and each
mitmdump's resident memory at the end (sessions kept per proxy process).
Everything shares the machine's cores, so the pool's figures include Ray's
own processes on the same 2 cores.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx

REQUEST = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _agents(base_urls: list[str], calls: int) -> float:
    """Run one agent per base URL; the seconds they took."""
    limits = httpx.Limits(max_connections=len(base_urls), max_keepalive_connections=len(base_urls))
    async with httpx.AsyncClient(limits=limits, timeout=300, trust_env=False) as client:

        async def agent(url: str) -> None:
            for _ in range(calls):
                answer = await client.post(f"{url}/chat/completions", json=REQUEST)
                answer.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(agent(url) for url in base_urls))
        return time.perf_counter() - started


async def _proxy_alone(sessions: int, calls: int) -> dict:
    from llmtraj.anticall.client import AntiCallClient
    from llmtraj.cli.proxy_process import ProxyProcess

    traj = Path(tempfile.mkdtemp(prefix="llm-traj-bench-pool-"))
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "anticall", "llm_traj_path": traj}) as proxy:
        driver = AntiCallClient.from_control_file(traj / "control.json")

        async def answer() -> None:
            while True:
                event = await driver.get_request(timeout=30)
                if event is not None and event.type == "request":
                    asyncio.ensure_future(driver.send_response(event, "Something short."))

        trainer = asyncio.ensure_future(answer())
        elapsed = await _agents([f"{proxy.url}/s/bench-{i}/v1" for i in range(sessions)], calls)
        trainer.cancel()
        rss = [_rss_mib(proxy.pid)]
        await driver.aclose()
    return {"target": "proxy alone", "elapsed": elapsed, "rss": rss}


async def _pool(n: int, sessions: int, calls: int) -> dict:
    from llmtraj.ray import ProxyPool

    pool = ProxyPool(n, mode="anticall", path=tempfile.mkdtemp(prefix="llm-traj-bench-pool-"), listen_host="127.0.0.1")
    try:
        handles = [await pool.open_session() for _ in range(sessions)]

        async def answer() -> None:
            async for call in pool.calls():
                asyncio.ensure_future(pool.respond(call, "Something short."))

        trainer = asyncio.ensure_future(answer())
        elapsed = await _agents([h.base_url for h in handles], calls)
        trainer.cancel()
        rss = [_rss_mib(p.info["proxy_pid"]) for p in pool._proxies]
    finally:
        await pool.shutdown()
    return {"target": f"pool of {n}", "elapsed": elapsed, "rss": rss}


def measure(sessions: int = 64, calls: int = 10, pools: tuple[int, ...] = (1, 4)) -> list[dict]:
    import ray

    rows = [asyncio.run(_proxy_alone(sessions, calls))]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for n in pools:
            rows.append(asyncio.run(_pool(n, sessions, calls)))
    finally:
        ray.shutdown()
    for row in rows:
        row.update(sessions=sessions, calls=sessions * calls, calls_per_s=sessions * calls / row["elapsed"],
                   sessions_per_s=sessions / row["elapsed"])  # fmt: skip
    return rows


def report(rows: list[dict]) -> list[str]:
    lines = ["| target | concurrent sessions | calls | calls/s | sessions/s | mitmdump RSS MiB (each) |",
             "|:--|--:|--:|--:|--:|:--|"]  # fmt: skip
    for r in rows:
        rss = ", ".join(f"{m:.0f}" for m in r["rss"])
        lines.append(f"| {r['target']} | {r['sessions']} | {r['calls']} | {r['calls_per_s']:.0f} | "
                     f"{r['sessions_per_s']:.1f} | {rss} |")  # fmt: skip
    return lines
