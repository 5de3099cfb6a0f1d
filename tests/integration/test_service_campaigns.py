"""The short forms of the service's campaigns (tests/campaigns/): services going away at random
points of three requests on two workers, and the API under a small load. The campaigns proper
(``make campaign``) run fifty requests and five thousand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.campaigns import load, services_away

from .conftest import leftovers
from .servicekit import hosts_world


@pytest.mark.timeout(1200)  # about 3 minutes on a quiet machine, 10 under a load of 12 on 2 cores
def test_services_going_away_at_random_points(tmp_path: Path) -> None:
    # PostgreSQL stopped, the object store gone, the SMTP server refusing: each once, in a
    # random order, after a gap of 2 to 10 s and for 3 to 20 s (the workers' lease is 14 s).
    figures = services_away.run(tmp_path, 3, seed=29, gap=(2, 10), length=(3, 20), rounds=1)
    print("\n" + figures.show(), file=sys.stderr)
    assert set(figures.faults) == set(services_away.FAULTS), figures.faults
    assert leftovers(tmp_path) == []


def test_api_under_load(tmp_path: Path) -> None:
    with hosts_world(tmp_path) as world:
        figures = load.api_load(world, clients=10, requests=100)
    print("\n" + figures.show(), file=sys.stderr)
    assert figures.errors == []
    assert set(figures.latency) == {"create", "list", "read"}
