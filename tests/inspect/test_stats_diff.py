"""Stats and diff of really recorded trajectories: run A, and run B of the same
task that parts from it in known places."""

from __future__ import annotations

import json

import pytest
from llmtraj.cli.demo import scripted_agent
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.record import CallRecord
from llmtraj.core.store import read_records
from llmtraj.inspect.diff import diff, render_diff
from llmtraj.inspect.stats import call_outcome, render_stats, stats
from llmtraj.testing.standin import ANSWER, TEXT
from openai import OpenAI

from ..conftest import wait_records
from .test_export import flaky_agent


def ask(base_url: str, prompt: str) -> None:
    OpenAI(base_url=base_url, api_key="sk-test-stats-0123456789", max_retries=0).chat.completions.create(
        model="standin-text", messages=[{"role": "user", "content": prompt}]
    )


@pytest.fixture(scope="module")
def run_a(proxy, traj_dir) -> list[CallRecord]:
    scripted_agent(f"{proxy.url}/s/demo/v1")
    flaky_agent(f"{proxy.url}/s/flaky/v1")
    ask(f"{proxy.url}/s/ask/v1", "Say hello")
    ask(f"{proxy.url}/s/solo/v1", "Only in A")
    for session, count in {"demo": 2, "flaky": 3, "ask": 1, "solo": 1}.items():
        wait_records(traj_dir / f"{session}.jsonl", count)
    return list(read_records(traj_dir))


@pytest.fixture(scope="module")
def run_b(upstream, tmp_path_factory) -> list[CallRecord]:
    """Like A, except: flaky #2 gets another answer to the same request (the
    stand-in's scenario header, not part of the body) and there is no #3; ask
    #1 asks something else; session solo is missing, newer is new."""
    path = tmp_path_factory.mktemp("traj-b")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": path}) as proxy:
        scripted_agent(f"{proxy.url}/s/demo/v1")
        flaky_agent(f"{proxy.url}/s/flaky/v1", answer_headers={"x-standin-scenario": "text"}, drop=False)
        ask(f"{proxy.url}/s/ask/v1", "Say hi")
        ask(f"{proxy.url}/s/newer/v1", "Only in B")
        for session, count in {"demo": 2, "flaky": 2, "ask": 1, "newer": 1}.items():
            wait_records(path / f"{session}.jsonl", count)
    return list(read_records(path))


def rows_by_name(rows):
    return {(row.kind, row.name): row for row in rows}


def test_outcomes(run_a):
    outcomes = {(r.session, r.index): call_outcome(r) for r in run_a}
    assert outcomes[("flaky", 1)] == "failed"
    assert outcomes[("flaky", 2)] == "ok"
    assert outcomes[("flaky", 3)] == "incomplete"
    assert outcomes[("demo", 1)] == outcomes[("demo", 2)] == "ok"


def test_stats_per_session_and_model(run_a):
    rows = rows_by_name(stats(run_a))
    assert [key for key in rows if key[0] == "session"] == [("session", s) for s in ("ask", "demo", "flaky", "solo")]
    demo = rows["session", "demo"]
    assert (demo.calls, demo.ok, demo.failed, demo.incomplete, demo.streamed) == (2, 2, 0, 0, 1)
    # the stand-in counts 10 prompt tokens per message: 2 messages, then 2 + 1 + 2
    assert demo.prompt_tokens == 70
    assert demo.total_tokens == demo.prompt_tokens + demo.completion_tokens > 70
    assert demo.without_usage == 0 and demo.reasoning_tokens is None
    assert demo.wall_time > 0 and 0 < demo.mean_ttfb <= demo.wall_time

    flaky = rows["session", "flaky"]
    assert (flaky.calls, flaky.ok, flaky.failed, flaky.incomplete, flaky.streamed) == (3, 1, 1, 1, 2)
    assert flaky.without_usage == 2 and flaky.prompt_tokens == 10  # only the answer reported usage

    assert rows["model", "standin-tools"].calls == 1
    assert rows["model", "standin-text"].calls == 3  # demo #2, ask, solo
    assert rows["model", "standin-error500"].failed == 1
    total = rows["all", "all"]
    assert total.calls == len(run_a) == 7
    assert total.prompt_tokens == sum(r.prompt_tokens for (kind, _), r in rows.items() if kind == "session")
    assert stats([]) == []


def test_stats_reasoning_tokens(run_a):
    record = next(r for r in run_a if r.session == "ask")
    response = json.loads(json.dumps(record.response))
    response["usage"]["completion_tokens_details"] = {"reasoning_tokens": 7}
    rows = rows_by_name(stats([record, record.model_copy(update={"index": 2, "response": response})]))
    assert rows["session", "ask"].reasoning_tokens == 7


def test_render_stats(run_a):
    lines = render_stats(stats(run_a)).splitlines()
    assert lines[0].split() == ["calls", "ok", "failed", "incomplete", "streamed", "prompt", "completion", "total",
                                "reasoning", "no", "usage", "wall", "mean", "ttfb", "mean", "latency"]  # fmt: skip
    flaky = next(line for line in lines if line.startswith("session flaky"))
    assert flaky.split()[2:9] == ["3", "1", "1", "1", "2", "10", flaky.split()[8]]
    assert lines[-1].startswith("all") and " ms" in lines[-1] and " s" in lines[-1]
    assert len({len(line) for line in lines[1:]}) <= 2  # aligned (the last column may end shorter)
    assert render_stats([]) == "no calls"


def test_diff_of_a_run_with_itself(run_a):
    result = diff(run_a, run_a)
    assert result.identical and not result.only_a and not result.only_b
    assert [s.same for s in result.sessions] == [1, 2, 3, 1]
    assert render_diff(result).splitlines()[1] == "session demo: 2 calls, identical"


def test_diff_finds_where_runs_part(run_a, run_b):
    result = diff(run_a, run_b)
    assert not result.identical
    assert result.only_a == ["solo"] and result.only_b == ["newer"]
    sessions = {s.session: s for s in result.sessions}
    assert sessions["demo"].identical

    ask = sessions["ask"]
    assert ask.same == 0 and ask.differing == 1
    assert (ask.first.index, ask.first.part, ask.first.path) == (1, "request", "messages[0].content")
    assert "Say hello" in ask.first.a and "Say hi" in ask.first.b

    flaky = sessions["flaky"]
    assert (flaky.calls_a, flaky.calls_b, flaky.same, flaky.differing) == (3, 2, 1, 1)
    assert (flaky.first.index, flaky.first.part, flaky.first.path) == (2, "response", "choices[0].message.content")
    assert ANSWER[:20] in flaky.first.a and TEXT[:20] in flaky.first.b
    assert flaky.only_a == [3] and flaky.only_b == []

    text = render_diff(result)
    assert "session flaky: 3 calls in A, 2 in B, 1 identical at the start" in text
    assert "  response of #2 differs at choices[0].message.content: A " in text
    assert "  only in A: #3" in text
    assert "sessions only in A: solo" in text and "sessions only in B: newer" in text


def test_diff_ignores_what_replay_ignores(run_a):
    """Delivery (stream or not) and bookkeeping fields do not make calls differ,
    nor do ids and timestamps of the answer."""
    changed = []
    for record in run_a:
        request = dict(record.request, stream=not record.request.get("stream"), user="someone")
        response = record.response
        if call_outcome(record) == "ok":
            response = dict(response, id="chatcmpl-other", created=1, system_fingerprint="fp_other")
        changed.append(record.model_copy(update={"request": request, "response": response}))
    assert diff(run_a, changed).identical
    assert not diff(run_a, changed, ignore=()).identical

