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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split(os.sep) or "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)
