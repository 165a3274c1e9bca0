"""ProxyPool on a real Ray cluster: proxies as actors running mitmdump with the
addon, driven by scripted openai-SDK agents over real TCP, answered through
`pool.calls()`."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from llmtraj import AntiCallError
from llmtraj.ray import ProxyPool

AGENTS = 200
LOOPBACK = "127.0.0.1"  # tests talk to this machine over loopback only
PROXIES = 4


def answer_for(request: dict) -> str:
    return "echo: " + request["messages"][-1]["content"]


async def scripted_agent(handle, turns: int = 2) -> list[str]:
    """Alternates non-streamed and streamed calls; each turn's prompt names the session and turn."""
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="unused", max_retries=0, timeout=120)
    got = []
    try:
        for turn in range(turns):
            prompt = f"{handle.session_id} turn {turn}"
            messages = [{"role": "user", "content": prompt}]
            if turn % 2:
                stream = await client.chat.completions.create(model="policy", messages=messages, stream=True)
                text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            else:
                completion = await client.chat.completions.create(model="policy", messages=messages)
                text = completion.choices[0].message.content
            got.append(text)
    finally:
        await client.close()
    return got


async def trainer(pool: ProxyPool, stop: asyncio.Event) -> int:
    """Answers every held call: streamed ones by deltas, the others whole."""
    answered = 0

    async def one(call):
        nonlocal answered
        text = answer_for(call.request)
        if call.stream:
            half = len(text) // 2
            await pool.delta(call, text[:half])
            await pool.delta(call, text[half:])
            await pool.finish(call)
        else:
            await pool.respond(call, text, extra={"policy": "v0"})
        answered += 1

    tasks = set()
    async for call in pool.calls():
        task = asyncio.ensure_future(one(call))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if stop.is_set():
            break
    await asyncio.gather(*tasks)
    return answered


def test_many_agents_through_a_pool(ray_cluster, tmp_path):
    async def main():
        pool = ProxyPool(PROXIES, mode="anticall", path=tmp_path / "traj", listen_host=LOOPBACK)
        try:
            handles = [await pool.open_session(metadata={"task": i}) for i in range(AGENTS)]
            per_proxy = [p["sessions"] for p in pool.stats()["proxies"]]
            assert per_proxy == [AGENTS // PROXIES] * PROXIES  # least-loaded placement
            assert len({h.base_url.split("/s/")[0] for h in handles}) == PROXIES
            stop = asyncio.Event()
            driver = asyncio.ensure_future(trainer(pool, stop))
            started = time.monotonic()
            results = await asyncio.gather(*(scripted_agent(h) for h in handles))
            elapsed = time.monotonic() - started
            for handle, got in zip(handles, results):
                assert got == [f"echo: {handle.session_id} turn 0", f"echo: {handle.session_id} turn 1"]
            deadline = time.monotonic() + 30
            while pool.stats()["held"]:  # the last answers' acknowledgements may come after their agents had them
                assert time.monotonic() < deadline, pool.stats()
                await asyncio.sleep(0.05)
            for handle in handles:
                await pool.end_session(handle.session_id)
            records = await asyncio.gather(*(pool.records(h.session_id) for h in handles))
            for handle, recs in zip(handles, records):
                assert [r.index for r in recs] == [1, 2]
                assert [r.stream for r in recs] == [False, True]
                assert all(r.complete and r.status == 200 for r in recs)
                assert recs[0].response["choices"][0]["message"]["content"] == f"echo: {handle.session_id} turn 0"
                assert recs[1].response["choices"][0]["message"]["content"] == f"echo: {handle.session_id} turn 1"
                assert recs[0].extra == {"policy": "v0"}
            assert pool.stats()["sessions"] == 0
            driver.cancel()
            print(f"{AGENTS} agents x 2 calls through {PROXIES} proxies: {elapsed:.1f} s")
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_a_killed_proxy_is_restarted_and_its_sessions_end_truthfully(ray_cluster, tmp_path):
    async def main():
        pool = ProxyPool(2, mode="anticall", path=tmp_path / "traj", listen_host=LOOPBACK)
        try:
            handles = [await pool.open_session() for _ in range(6)]
            doomed = [h for h in handles if h.proxy == 0]
            spared = [h for h in handles if h.proxy == 1]
            agents = {h.session_id: asyncio.ensure_future(scripted_agent(h, turns=1)) for h in handles}
            seen, ends = {}, {}

            async def watch():
                async for event in pool.calls(all_events=True):
                    if event.type == "request":
                        seen[event.session] = event
                    elif event.type == "session_end":
                        ends[event.session] = event.reason

            watcher = asyncio.ensure_future(watch())
            while len(seen) < len(handles):  # every agent's first call is held
                await asyncio.sleep(0.05)
            ray_cluster.kill(pool._proxies[0].actor, no_restart=False)
            started = time.monotonic()
            for h in doomed:  # the agent gets an error, not a hang
                with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
                    await asyncio.wait_for(agents[h.session_id], 60)
            assert time.monotonic() - started < 60
            while len(ends) < len(doomed):
                await asyncio.sleep(0.05)
            assert set(ends) == {h.session_id for h in doomed}
            assert all("proxy 0 died" in reason and "restarted" in reason for reason in ends.values())
            with pytest.raises(AntiCallError) as lost:
                await pool.respond(seen[doomed[0].session_id], "too late")
            assert lost.value.status == 410 and lost.value.code == "proxy_lost"
            for h in spared:  # the other proxy's sessions go on
                await pool.respond(seen[h.session_id], answer_for(seen[h.session_id].request))
                assert await agents[h.session_id] == [f"echo: {h.session_id} turn 0"]
            stats = pool.stats()
            assert stats["proxies"][0]["restarts"] == 1 and stats["lost_sessions"] == len(doomed)
            # the restarted proxy serves new sessions, on a new port
            fresh = await pool.open_session()
            assert fresh.proxy == 0 and fresh.base_url.split("/s/")[0] != doomed[0].base_url.split("/s/")[0]
            agent = asyncio.ensure_future(scripted_agent(fresh, turns=1))
            while fresh.session_id not in seen:
                await asyncio.sleep(0.05)
            await pool.respond(seen[fresh.session_id], "fresh")
            assert await agent == ["fresh"]
            # the restarted proxy reads the files of the dead one (a held call it stopped with may be recorded as a 503)
            records = await pool.records(doomed[0].session_id)
            assert all(r.status == 503 for r in records)
            records = await pool.records(spared[0].session_id)
            assert [(r.index, r.status) for r in records] == [(1, 200)]
            watcher.cancel()
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_a_restart_is_noticed_without_a_call_in_record_mode(ray_cluster, upstream, tmp_path):
    """No call goes to the killed proxy, yet the pool sees its restart (its health
    loop), ends its session, tells the new proxy the trainer's weight version and
    places new sessions on its new port."""

    async def ask(handle, text: str) -> str:
        async with openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0) as client:
            completion = await client.chat.completions.create(model="standin-echo", messages=[{"role": "user", "content": text}])
            return completion.choices[0].message.content

    async def main():
        pool = ProxyPool(1, mode="record", path=tmp_path / "traj", upstream=upstream.url, listen_host=LOOPBACK)
        try:
            old = await pool.open_session()
            await ask(old, "before")
            pool.set_weight_version(3)
            ray_cluster.kill(pool._proxies[0].actor, no_restart=False)
            started = time.monotonic()
            while pool.stats()["proxies"][0]["restarts"] == 0:
                assert time.monotonic() - started < 60, "the restart was not noticed"
                await asyncio.sleep(0.1)
            print(f"restart noticed after {time.monotonic() - started:.1f} s")
            assert pool.stats()["lost_sessions"] == 1 and pool.stats()["sessions"] == 0
            fresh = await pool.open_session()
            assert fresh.base_url.split("/s/")[0] != old.base_url.split("/s/")[0]
            await ask(fresh, "after")
            (record,) = await pool.records(fresh.session_id)
            assert record.status == 200 and record.weight_version == 3  # told again after the restart
            assert [r.weight_version for r in await pool.records(old.session_id)] == [None]  # its file, read by the new proxy
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_calls_of_one_session(ray_cluster, tmp_path):
    """`calls(session_id=S)`: S's calls only, which the other consumers do not
    get; its iteration ends with the session."""

    async def main():
        pool = ProxyPool(2, mode="anticall", path=tmp_path / "traj", listen_host=LOOPBACK)
        try:
            mine, other = await pool.open_session(), await pool.open_session()
            seen_mine, seen_others = [], []

            async def answer(stream, seen):
                async for event in stream:
                    seen.append((event.session, event.type))
                    if event.type == "request":
                        if event.stream:
                            await pool.delta(event, answer_for(event.request))
                            await pool.finish(event)
                        else:
                            await pool.respond(event, answer_for(event.request))

            own = asyncio.ensure_future(answer(pool.calls(session_id=mine.session_id, all_events=True), seen_mine))
            rest = asyncio.ensure_future(answer(pool.calls(), seen_others))
            await asyncio.sleep(0)  # both consumers are there
            with pytest.raises(RuntimeError, match="has a consumer already"):
                await anext(pool.calls(session_id=mine.session_id))
            got = await asyncio.wait_for(asyncio.gather(scripted_agent(mine), scripted_agent(other)), 60)
            assert got == [[f"echo: {h.session_id} turn {t}" for t in (0, 1)] for h in (mine, other)]
            assert seen_others == [(other.session_id, "request")] * 2
            await pool.end_session(mine.session_id)
            await asyncio.wait_for(own, 30)  # ended with its session
            assert seen_mine == [(mine.session_id, "request")] * 2 + [(mine.session_id, "session_end")]
            # a session's calls that came before its consumer are its consumer's
            rest.cancel()
            late = await pool.open_session()
            agent = asyncio.ensure_future(scripted_agent(late, turns=1))
            while pool.stats()["held"] == 0:
                await asyncio.sleep(0.05)
            seen_late = []
            consumer = asyncio.ensure_future(answer(pool.calls(session_id=late.session_id), seen_late))
            assert await asyncio.wait_for(agent, 60) == [f"echo: {late.session_id} turn 0"]
            assert seen_late == [(late.session_id, "request")]
            await pool.end_session(late.session_id)
            await asyncio.wait_for(consumer, 30)
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_a_proxy_gone_for_good_gets_no_new_session(ray_cluster, upstream, tmp_path):
    """Ray cannot restart a proxy whose actor has no restarts left: its session
    ends, new sessions go to the proxies that serve, the trainer's calls skip it,
    and with none left open_session says so in one line."""

    async def main():
        pool = ProxyPool(2, mode="record", path=tmp_path / "traj", upstream=upstream.url, listen_host=LOOPBACK,
                         max_restarts=0)  # fmt: skip
        try:
            first = [await pool.open_session() for _ in range(2)]
            assert sorted(h.proxy for h in first) == [0, 1]
            ray_cluster.kill(pool._proxies[0].actor, no_restart=True)
            started = time.monotonic()
            while pool.stats()["proxies"][0]["gone"] is None:
                assert time.monotonic() - started < 60, "the proxy's end was not noticed"
                await asyncio.sleep(0.1)
            assert "could not be restarted" in pool.stats()["proxies"][0]["gone"]
            assert pool.stats()["lost_sessions"] == 1
            fresh = [await pool.open_session() for _ in range(3)]
            assert [h.proxy for h in fresh] == [1, 1, 1]
            pool.set_weight_version(7)  # told to the proxy that serves only
            async with openai.AsyncOpenAI(base_url=fresh[0].base_url, api_key="k", max_retries=0) as client:
                await client.chat.completions.create(model="standin-echo", messages=[{"role": "user", "content": "hi"}])
            (record,) = await pool.records(fresh[0].session_id)
            assert record.weight_version == 7
            ray_cluster.kill(pool._proxies[1].actor, no_restart=True)
            while pool.stats()["proxies"][1]["gone"] is None:
                assert time.monotonic() - started < 120, "the second proxy's end was not noticed"
                await asyncio.sleep(0.1)
            with pytest.raises(RuntimeError, match="every proxy of this ProxyPool is gone for good"):
                await pool.open_session()
        finally:
            await pool.shutdown()

    asyncio.run(main())
