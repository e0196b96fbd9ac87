"""broker-pilot with several brokers in ``broker_url``: the first one down, the job runs
with a proxy from the next (the site of tests/payload_wrapper/test_pilot.py)."""

from __future__ import annotations

import pytest

from tests.brokerserver import free_port
from tests.payload_wrapper.conftest import needs_root
from tests.payload_wrapper.test_pilot import ALICE, Site, job_ad, run_as_starter, site  # noqa: F401
from tests.pkifixtures import grid_pki  # noqa: F401 - fixture

pytestmark = [pytest.mark.root, needs_root]


def test_pilot_fails_over_to_the_next_broker(site: Site) -> None:  # noqa: F811
    before = site.job_dirs()
    dead = f"https://127.0.0.1:{free_port()}"
    config = site.config(broker_url=[dead, f"https://{site.broker.server}"])
    run = run_as_starter(site, config, job_ad(cluster=171))
    assert run.result.returncode == 0, run.result.stderr + run.error_text
    assert run.marker.exists() and run.error_text == ""
    (job_dir,) = [d for d in site.job_dirs() if d not in before]
    assert f"identity : {ALICE}" in (job_dir / "proxyinfo.txt").read_text()


def test_pilot_names_every_broker_when_all_are_down(site: Site) -> None:  # noqa: F811
    ports = [free_port(), free_port()]
    config = site.config(broker_url=[f"https://127.0.0.1:{p}" for p in ports])
    run = run_as_starter(site, config, job_ad(cluster=172))
    assert run.result.returncode != 0 and not run.marker.exists()
    text = run.result.stderr + run.error_text
    assert all(f"127.0.0.1:{p}" in text for p in ports), text
