"""Progress for long copies, hashes and conversions: bytes, rate, time left.

Bars go to stderr. In a terminal they update in place; in a notebook the kernel's stderr shows the
same line, and papermill (run with ``coalesce_streams``) keeps only its final state in the
executed copy. The pipeline forwards kernel stderr to its own terminal, so a scheduler's log and
a person's terminal both see it. ``IMAGING_PROGRESS=0`` turns bars off.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

# Below this a bar is noise.
_MIN_TOTAL = 32 << 20


def bytes_bar(total: int, desc: str | None) -> tqdm:
    disabled = desc is None or os.environ.get("IMAGING_PROGRESS", "1") == "0" or total < _MIN_TOTAL
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        mininterval=0.5,
        ascii=True,
        disable=disabled,
        leave=True,
        dynamic_ncols=False,
        ncols=100,
    )


def percent_bar(desc: str) -> tqdm:
    """A 0-100 bar for tools that report percentages (qemu-img -p)."""
    return tqdm(
        total=100,
        desc=desc,
        unit="%",
        file=sys.stderr,
        mininterval=0.5,
        ascii=True,
        disable=os.environ.get("IMAGING_PROGRESS", "1") == "0",
        leave=True,
        ncols=100,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
