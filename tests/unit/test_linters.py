"""ruff (lint and format) and mypy over the package, the tests, the benchmarks and the manual's code."""

from __future__ import annotations

import subprocess
import sys

from imaging.config import PROJECT

PATHS = ["imaging", "tests", "bench", "docs"]


def run(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_lint() -> None:
    run("ruff", "check", *PATHS)


def test_ruff_format() -> None:
    run("ruff", "format", "--check", *PATHS)


def test_mypy() -> None:
    run("mypy")
