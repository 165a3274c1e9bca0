"""The benchmark's in-process parts run against today's code (a benchmark is not
a test, but one that no longer runs measures nothing: bench/long_streams.py once
unframed the writer's frames with a stale head size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
long_streams = pytest.importorskip("long_streams")


@pytest.mark.parametrize("api", long_streams.APIS)
def test_long_stream_writer_cost_and_memory(api):
    cost = long_streams.writer_cost(api, 50, long_streams.SHORT_DELTA, repeat=1)
    assert cost["events"] > 40 and cost["record_bytes"] > cost["events"] * long_streams.SHORT_DELTA
    memory = long_streams.writer_memory(api, 50, long_streams.SHORT_DELTA)
    assert memory  # the writer made the record; the figures themselves are the benchmark's business


def test_growth_bare_mitmdump_and_writer_columns(tmp_path):
    growth = pytest.importorskip("growth")
    _, [cpu], _ = growth.measure_size_and_cpu(tmp_path, (growth.CPU_BUCKET,), cpu_turns=growth.CPU_BUCKET)
    assert cpu["bare mitmdump µs/call"] > 0 and cpu["proxy µs/call"] > 0 and cpu["writer µs/call"] > 0
    assert cpu["added by llm-traj µs/call"] == cpu["proxy µs/call"] - cpu["bare mitmdump µs/call"]
    [row] = growth.measure_writer_cpu(tmp_path, turns=growth.CPU_BUCKET)
    assert row["request KB"] > 0


def test_growth_flatness_rule():
    """At turns 901-1000 at most 25% or 100 µs (whichever is larger) above turns 101-200."""
    growth = pytest.importorskip("growth")

    def rows(base: int, last: int) -> list[dict]:
        return [{"turns": "1-100", "w": 0}, {"turns": "101-200", "w": base}, {"turns": "901-1000", "w": last}]

    assert growth._flatness(rows(200, 300), "w").startswith("PASS")  # +100 µs
    assert growth._flatness(rows(200, 301), "w").startswith("MISS")
    assert growth._flatness(rows(800, 1000), "w").startswith("PASS")  # +25%
    assert growth._flatness(rows(800, 1001), "w").startswith("MISS")


def test_long_streams_small_calls_alone():
    """`scripts/bench --only small-calls`: only the small calls are measured, and
    the report and its checks stand on them alone."""
    settings = long_streams.StreamSettings(small_only=True)
    assert [work.key for work in long_streams.works(settings)] == ["small.c1", "small.c16"]
    figures = {long_streams.BARE: {"rps": 1000.0, "cpu_us_per_req": 800.0},
               long_streams.RECORD: {"rps": 960.0, "cpu_us_per_req": 900.0}}  # fmt: skip
    results = {"medians": {"small.c1": figures, "small.c16": figures}, "records": 2}
    assert [c["name"] for c in long_streams.checks(results)] == ["small.c1.rps", "small.c16.rps"]
    report = long_streams.report(results, {"cost": [], "memory": []}, settings)
    assert "| 16 " in report and "0.96x" in report and "200-event" not in report
