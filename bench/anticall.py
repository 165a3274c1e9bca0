"""What the control API adds to an anti-call round trip (`scripts/bench --only anticall`).

A broker holds calls in this process, one at a time, as the proxy would for an
agent; each is answered either by a driver in its own process through the
control API (the real `AntiCallClient`, a long poll per call and a POST of
the answer) or by a driver coroutine on the same loop that calls the broker
directly. The difference between the two is what the control API costs: the
added round-trip time at p50 (target: <= 0.2 ms, issue 14) and the CPU time
this process spends serving it per call. No mitmdump is involved: its own cost
per call is the same either way (the full anti-call round trip through a real
mitmdump is the `llm-traj-anticall` target of the main run).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmtraj.anticall.broker import Broker, Final
from llmtraj.anticall.control import ControlServer
from llmtraj.anticall.control_file import write_control_file
from llmtraj.anticall.models import ControlInfo
from llmtraj.apis import API_BY_NAME
from llmtraj.cli.proxy_process import ServerProcess

ADDED_P50_TARGET_MS = 0.2
DRIVER_TEXT = "Something short."  # what bench.py's driver answers
REQUEST = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}], "stream": False}
CHAT = API_BY_NAME["chat.completions"]


async def _round_trips(broker: Broker, seconds: float, warmup: float) -> tuple[list[float], float, int]:
    """(round-trip times of the measured calls, CPU seconds of this process over them, calls made)."""
    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + seconds
    cpu0 = None
    calls = 0
    while (t0 := time.perf_counter()) < end:
        if cpu0 is None and t0 >= start:
            cpu0, calls = time.process_time(), 0
        call = broker.open_call("bench", CHAT, REQUEST, False)
        piece = await broker.next_piece(call)
        t1 = time.perf_counter()
        if not isinstance(piece, Final):
            raise RuntimeError(f"the driver answered {piece!r}")
        calls += 1
        if t0 >= start:
            latencies.append(t1 - t0)
    return latencies, time.process_time() - (cpu0 or 0.0), calls


async def _in_process_driver(broker: Broker) -> None:
    while True:
        event = await broker.next_event(timeout=1.0)
        if event is not None and event.type == "request":
            broker.respond(event.id, CHAT.completion_from_text(event.request, DRIVER_TEXT))


async def _measure_in_process(seconds: float, warmup: float) -> tuple[list[float], float, int]:
    broker = Broker()
    driver = asyncio.ensure_future(_in_process_driver(broker))
    try:
        return await _round_trips(broker, seconds, warmup)
    finally:
        driver.cancel()


async def _measure_control_api(seconds: float, warmup: float, workdir: Path) -> tuple[list[float], float, int]:
    broker = Broker()
    server = ControlServer(broker)
    server.bind(0)
    await server.start()
    control_file = workdir / "control.json"
    write_control_file(control_file, ControlInfo(url=server.url, token=server.token, pid=0))
    bench = Path(__file__).with_name("bench.py")
    driver = ServerProcess([sys.executable, str(bench), "--driver", str(control_file)],
                           re.compile(r"bench driver: ready for (\S+) on port (\d+)"))  # fmt: skip
    try:
        # (the driver process starts while this loop runs: its readiness is awaited off the loop)
        await asyncio.to_thread(driver.start)
        return await _round_trips(broker, seconds, warmup)
    finally:
        await asyncio.to_thread(driver.stop)
        server.close()


def measure(seconds: float = 3.0, warmup: float = 0.5, rounds: int = 3) -> dict[str, float]:
    """Medians over `rounds` of each way, alternated so drift of the machine hits both."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="llm-traj-bench-anticall-") as tmp:
        for _ in range(rounds):
            for way, run in (("in_process", lambda: _measure_in_process(seconds, warmup)),
                             ("control_api", lambda: _measure_control_api(seconds, warmup, Path(tmp)))):  # fmt: skip
                latencies, cpu, calls = asyncio.run(run())
                samples.setdefault(f"{way}.p50_ms", []).append(statistics.median(latencies) * 1e3)
                samples.setdefault(f"{way}.p90_ms", []).append(statistics.quantiles(latencies, n=10)[-1] * 1e3)
                samples.setdefault(f"{way}.cpu_us", []).append(cpu / calls * 1e6)
                samples.setdefault(f"{way}.calls_per_s", []).append(len(latencies) / seconds)
    result = {key: statistics.median(values) for key, values in samples.items()}
    result["added.p50_ms"] = result["control_api.p50_ms"] - result["in_process.p50_ms"]
    result["added.cpu_us"] = result["control_api.cpu_us"] - result["in_process.cpu_us"]
    return result


def report(result: dict[str, float]) -> list[str]:
    added = result["added.p50_ms"]
    verdict = "PASS" if added <= ADDED_P50_TARGET_MS else "MISS"
    rows = [
        "| driver | calls/s | p50 ms | p90 ms | CPU µs/call (broker's process) |",
        "|:--|--:|--:|--:|--:|",
        *(
            f"| {label} | {result[f'{way}.calls_per_s']:.0f} | {result[f'{way}.p50_ms']:.3f} | "
            f"{result[f'{way}.p90_ms']:.3f} | {result[f'{way}.cpu_us']:.0f} |"
            for way, label in (("in_process", "in process (no control API)"), ("control_api", "own process, control API"))
        ),
    ]
    return [
        "Anti-call round trip: what the control API adds (a call held, answered by a driver)",
        "",
        *rows,
        "",
        f"{verdict} control API adds {added:+.3f} ms per round trip at p50 (target <= +{ADDED_P50_TARGET_MS:g} ms), "
        f"{result['added.cpu_us']:+.0f} µs of the proxy's CPU",
    ]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        print("\n".join(report(measure())))
