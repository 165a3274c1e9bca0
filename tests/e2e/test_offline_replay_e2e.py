"""Fully offline replay, end to end: record mode keeps the model list it
forwarded; a replay proxy whose reverse target does not exist
(`reverse:http://unused`, as in the README) answers `models.list()`,
`models.retrieve()`, probes and everything else under the base URL itself,
and opens no upstream connection."""

from __future__ import annotations

import httpx
import pytest
from openai import NotFoundError, OpenAI

from llmtraj.cli.proxy_process import ProxyProcess, ProxyStartError
from llmtraj.core.model_lists import models_file
from llmtraj.testing.standin import MODELS

from .test_record_e2e import API_KEY, MESSAGES

SESSION = "offline"


def client(proxy: ProxyProcess) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{SESSION}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def recorded(upstream, tmp_path_factory):
    traj = tmp_path_factory.mktemp("offline")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": traj}) as proxy:
        c = client(proxy)
        listed = c.models.list()
        answer = c.chat.completions.create(model="standin-text", messages=MESSAGES)
    return traj, [m.id for m in listed.data], answer


def replay_proxy(traj, log):
    return ProxyProcess(upstream="http://unused", options={"llm_traj_mode": "replay", "llm_traj_path": traj}, log=log)


def test_record_mode_keeps_the_model_list(recorded):
    traj, listed, _ = recorded
    assert listed == [m["id"] for m in MODELS["data"]]
    assert models_file(traj).exists()


def test_replay_answers_models_probes_and_the_rest_with_no_upstream(recorded, tmp_path):
    traj, listed, answer = recorded
    log = tmp_path / "proxy.log"
    with replay_proxy(traj, log) as proxy:
        c = client(proxy)
        assert [m.id for m in c.models.list().data] == listed
        assert c.models.retrieve(listed[0]).id == listed[0]
        with pytest.raises(NotFoundError, match="not in the recording"):
            c.models.retrieve("no-such-model")
        assert c.chat.completions.create(model="standin-text", messages=MESSAGES).choices[0].message.content == (
            answer.choices[0].message.content
        )
        assert httpx.head(f"{proxy.url}/").status_code == 200
        other = httpx.post(f"{proxy.url}/s/{SESSION}/v1/embeddings", json={"model": "e", "input": "x"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "replay_not_recorded"
    text = log.read_text()
    assert "server connect" not in text and "error establishing server connection" not in text


def test_without_a_kept_list_the_recorded_models_are_listed(recorded, tmp_path):
    traj, _, _ = recorded
    copy = tmp_path / "traj"
    copy.mkdir()
    for path in traj.glob("*.jsonl"):
        (copy / path.name).write_bytes(path.read_bytes())
    with replay_proxy(copy, tmp_path / "proxy.log") as proxy:
        assert [m.id for m in client(proxy).models.list().data] == ["standin-text"]


DATED = "Today is 2026-03-04; the repository is at /home/ann/project. Say hello."


@pytest.fixture(scope="module")
def dated(upstream, tmp_path_factory):
    """A call whose prompt names a date and a home, recorded."""
    traj = tmp_path_factory.mktemp("dated")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": traj}) as proxy:
        client(proxy).chat.completions.create(model="standin-text", messages=[{"role": "user", "content": DATED}])
    return traj


def ask(proxy: ProxyProcess, text: str):
    return client(proxy).chat.completions.with_raw_response.create(
        model="standin-text", messages=[{"role": "user", "content": text}])  # fmt: skip


def test_normalized_and_nearest_rungs_through_the_proxy(dated, tmp_path):
    options = {"llm_traj_mode": "replay", "llm_traj_path": dated, "llm_traj_replay_nearest": "true"}
    with ProxyProcess(upstream="http://unused", options=options) as proxy:
        another_day = ask(proxy, DATED.replace("2026-03-04", "2026-03-05").replace("/home/ann", "/Users/bo"))
        assert another_day.headers["x-llm-traj-match"] == "normalized"
        report = httpx.get(f"{proxy.url}/llm-traj/replay-report").json()["sessions"][SESSION]
        assert report["rules"] == {"generic:abs-path": 1, "generic:iso-date": 1}
    with ProxyProcess(upstream="http://unused", options=options) as proxy:
        reworded = ask(proxy, DATED.replace("Say hello.", "Say hello please."))
        assert reworded.headers["x-llm-traj-match"] == "nearest"
        (nearest,) = httpx.get(f"{proxy.url}/llm-traj/replay-report").json()["sessions"][SESSION]["nearest"]
        assert nearest["step"] == 1 and 0.8 <= nearest["score"] < 1 and "messages[0].content" in nearest["differences"][0]


def test_a_bad_rules_file_stops_the_proxy_with_one_line_naming_the_rule(dated, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "ticket"\npattern = "TICKET-("\n')
    options = {"llm_traj_mode": "replay", "llm_traj_path": dated, "llm_traj_replay_rules": rules}
    with pytest.raises(ProxyStartError) as info:
        ProxyProcess(upstream="http://unused", options=options).start()
    assert f"llm_traj_replay_rules: {rules}: rule 'ticket': bad pattern 'TICKET-('" in str(info.value)


def test_a_port_in_use_stops_the_proxy_with_mitmproxys_reason_not_llm_trajs_last_info_line(tmp_path):
    # llm-traj has said "recording to ..." when mitmproxy fails to listen: the reason given is mitmproxy's.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = {"llm_traj_mode": "record", "llm_traj_path": tmp_path / "traj"}
        with pytest.raises(ProxyStartError) as info:
            ProxyProcess(upstream="http://unused", port=port, options=options).start()
    assert "already in use" in str(info.value) and "recording to" not in str(info.value)
