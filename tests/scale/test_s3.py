"""Trajectories to object storage against a real S3 API on 127.0.0.1 (moto's
server mode): sessions go up when they end, `llm-traj show s3://...` reads
them back, and while the S3 server is down records stay local and go up once
it is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import openai

from llmtraj import read_records
from llmtraj.anticall import AntiCallClient
from llmtraj.cli.proxy_process import ProxyProcess

from .conftest import BUCKET, LLM_TRAJ, moto_server, wait_object


async def one_call(proxy: ProxyProcess, driver: AntiCallClient, session: str, text: str) -> None:
    agent = openai.AsyncOpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="k", max_retries=0)
    pending = asyncio.ensure_future(agent.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]))
    call = await driver.get_request(session=session, timeout=30)
    await driver.send_response(call, text)
    assert (await pending).choices[0].message.content == text
    await agent.close()
    await driver.end_session(session)


def test_sessions_go_up_when_they_end_and_wait_out_an_outage(s3, tmp_path):
    stage = tmp_path / "stage"
    url = f"s3://{BUCKET}/run1"
    proxy = ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "anticall", "llm_traj_path": url,
                                                                 "llm_traj_stage": stage}).start()  # fmt: skip
    try:
        async def main():
            driver = AntiCallClient.from_control_file(stage / "control.json")
            await one_call(proxy, driver, "first", "uploaded at its end")
            body = wait_object(s3["client"], "run1/first.jsonl")
            assert b"uploaded at its end" in body and body.endswith(b"\n")

            s3["server"].stop()  # the S3 server goes away mid-run
            await one_call(proxy, driver, "second", "kept while S3 is down")
            deadline = time.monotonic() + 30
            while "could not upload session second" not in proxy.output():
                assert time.monotonic() < deadline, proxy.output()[-2000:]
                await asyncio.sleep(0.1)
            assert b"kept while S3 is down" in (stage / "second.jsonl").read_bytes()  # on disk meanwhile

            s3["server"] = moto_server(s3["port"]).start()  # back (a fresh moto: its bucket is made again)
            s3["client"].create_bucket(Bucket=BUCKET)
            assert b"kept while S3 is down" in wait_object(s3["client"], "run1/second.jsonl", timeout=90)
            await driver.aclose()

        asyncio.run(main())
    finally:
        proxy.stop()
    assert "uploaded session second" in proxy.output()

    # the readers take the URL
    shown = subprocess.run([LLM_TRAJ, "show", url, "--session", "second"], capture_output=True, text=True, env=os.environ)
    assert shown.returncode == 0, shown.stderr
    assert "kept while S3 is down" in shown.stdout
    assert [r.session for r in read_records(url)] == ["second"]  # "first" went with the old moto's memory
    missing = subprocess.run([LLM_TRAJ, "show", f"s3://{BUCKET}/nothing-here"], capture_output=True, text=True, env=os.environ)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_leftovers_go_up_at_shutdown_and_next_start(s3, tmp_path):
    stage = tmp_path / "stage"
    url = f"s3://{BUCKET}/run2"
    options = {"llm_traj_mode": "anticall", "llm_traj_path": url, "llm_traj_stage": stage}
    s3["server"].stop()
    proxy = ProxyProcess(upstream="http://127.0.0.1:9", options=options).start()

    async def main():
        driver = AntiCallClient.from_control_file(stage / "control.json")
        agent = openai.AsyncOpenAI(base_url=f"{proxy.url}/s/open/v1", api_key="k", max_retries=0)
        pending = asyncio.ensure_future(agent.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]))
        await driver.send_response(await driver.get_request(timeout=30), "never ended")
        await pending
        await agent.close()
        await driver.aclose()

    try:
        asyncio.run(main())
    finally:
        proxy.stop()  # S3 is down: the shutdown upload fails, the file stays
    assert "could not upload session open" in proxy.output() or "out of time uploading" in proxy.output()
    assert (stage / "open.jsonl").exists()
    s3["server"] = moto_server(s3["port"]).start()
    s3["client"].create_bucket(Bucket=BUCKET)
    with ProxyProcess(upstream="http://127.0.0.1:9", options=options):  # the next start over the stage uploads it
        assert b"never ended" in wait_object(s3["client"], "run2/open.jsonl")
