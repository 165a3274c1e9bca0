"""A real local Ray cluster and a real S3 API (moto's server on 127.0.0.1) for
the tests in this folder (`scripts/test-scale`, which installs the `scale`
extra: ray, s3fs, moto's server). The default `scripts/test` leaves the folder out."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs the scale extra: run scripts/test-scale")
import boto3  # noqa: E402  (the scale extra, as ray)

from llmtraj.cli.proxy_process import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """Two CPUs, as the issue asks; on loopback only."""
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()

BUCKET = "traj"
LLM_TRAJ = str(Path(sys.executable).with_name("llm-traj"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server(port: int) -> ServerProcess:
    return ServerProcess([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                         re.compile(r"Running on (http)://127\.0\.0\.1:(\d+)"))  # fmt: skip


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    server = moto_server(port).start()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    state = {"server": server, "client": client, "port": port}
    yield state
    state["server"].stop()


def wait_object(client, key: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
