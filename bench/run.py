"""Run every benchmark and print one markdown table (docs/performance.md: the latest run's figures)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import big, clouds, convert, limits, mirrors, node_copy, place, scale, secret_scan, service  # noqa: E402


def main() -> None:
    print("| measurement | result | |\n|---|---|---|")
    for module in (place, scale, convert, limits, big, node_copy, clouds, mirrors, secret_scan, service):
        for row in module.main():
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
