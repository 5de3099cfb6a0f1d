"""Run every benchmark and print one markdown table (docs/performance.md: the latest run's figures)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    big,
    clouds,
    convert,
    kernels,
    limits,
    mirrors,
    node_copy,
    place,
    scale,
    secret_scan,
    service,
)  # noqa: E402

MODULES = {m.__name__.removeprefix("bench."): m
           for m in (place, scale, convert, limits, big, node_copy, clouds, mirrors, secret_scan, service, kernels)}  # fmt: skip


def main(names: list[str]) -> None:
    """Every benchmark, or those ``names`` names (``make bench BENCH="node_copy clouds"``)."""
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        sys.exit(f"bench/run.py: no benchmark {', '.join(unknown)} (there are: {', '.join(MODULES)})")
    print("| measurement | result | |\n|---|---|---|")
    for module in [MODULES[n] for n in names] if names else MODULES.values():
        for row in module.main():
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
