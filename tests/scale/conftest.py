"""A real local Ray cluster for the tests in this folder (`scripts/test-scale`,
which installs the `scale` extra: ray, s3fs, moto's server). The default
`scripts/test` leaves the folder out."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="needs the scale extra: run scripts/test-scale")


@pytest.fixture(scope="session")
def ray_cluster():
    """Two CPUs, as the issue asks; on loopback only."""
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()
