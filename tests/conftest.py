"""Shared fixtures. Unit tests need no root and no network; integration tests build real images,
run the pipeline through papermill and boot QEMU (root, for loop mounts and the boot tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs of a test never land in the checkout's runs/; the download cache is shared on purpose.
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path_factory.mktemp("runs")))
    monkeypatch.setenv("IMAGING_PROGRESS", "0")


@pytest.fixture
def data() -> Path:
    return DATA


# The files that take minutes (real Debian boots, the 8 GiB OVA, the service with its clouds and
# engine): started first, so that `make test`'s workers (pytest-xdist, a file each) do not end
# with one of them alone while the other worker idles.
SLOW_FIRST = ("test_real_guests.py", "test_targets.py", "test_service_clouds.py", "test_big_ova.py",
              "test_engine.py", "test_service.py", "test_hostile.py", "test_report.py")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split(os.sep) or "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order stays
