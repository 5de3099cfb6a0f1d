"""Progress for long copies, hashes and conversions: bytes, rate, time left.

Where it is shown decides how:

- in a terminal (or a process's stderr), a tqdm bar updated in place;
- in a stage run by the pipeline, a bar updated in place on the pipeline's terminal only (the
  kernel's original stderr, which ipykernel keeps a copy of), and one clean line in the notebook
  when the work is done (``copy instance: 37.7 MiB in 0.1 s, 408.2 MiB/s``); carriage-return
  updates never reach the record, and a worker's log file gets that line too;
- in a notebook run by hand in Jupyter, a widget.

``IMAGING_PROGRESS=0`` turns bars off; the final lines in notebooks stay.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

from imaging.records import human_bytes

# Below this a bar is noise.
_MIN_TOTAL = 32 << 20


def _kernel() -> Any:
    """The IPython kernel this runs in, or None (a plain process or a terminal IPython)."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def _pipeline_stderr() -> TextIO | None:
    """In a kernel, the pipeline's stderr (its terminal, or a worker's log file): ipykernel's
    ``OutStream.fileno()`` is the original stderr it keeps beside the stream it sends to the
    notebook."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w")
    except (OSError, ValueError):
        return None


def _rate(n: float, seconds: float) -> str:
    return f"{human_bytes(n / seconds)}/s" if seconds > 0 else "instant"


@contextlib.contextmanager
def _bar(desc: str | None, total: float, unit_bytes: bool, enabled: bool, **style: Any) -> Iterator[tqdm]:
    options: dict[str, Any] = dict(total=total, desc=desc, mininterval=0.5, **style)
    if unit_bytes:
        options.update(unit="B", unit_scale=True, unit_divisor=1024)
    kernel = _kernel()
    if kernel is not None and desc is not None and os.environ.get("IMAGING_PIPELINE"):
        with _final_line(desc, unit_bytes, enabled, options) as bar:
            yield bar
    elif kernel is not None and enabled:
        from tqdm.notebook import tqdm as widget

        with widget(**options, leave=True) as bar:
            yield bar
    else:
        with tqdm(**options, file=sys.stderr, disable=not enabled, leave=True, ascii=True, ncols=100) as bar:
            yield bar


@contextlib.contextmanager
def _final_line(desc: str, unit_bytes: bool, enabled: bool, options: dict[str, Any]) -> Iterator[tqdm]:
    """In a stage the pipeline runs: the bar on its terminal, one line in the notebook (on stdout:
    it is a result, not an error) and in a log file."""
    outside = _pipeline_stderr()
    tty = outside is not None and outside.isatty()
    t0 = time.monotonic()
    try:
        # Never disabled, so that it counts for the final line; off a terminal it draws nowhere.
        bar_file = outside if tty and enabled else io.StringIO()
        with tqdm(**options, file=bar_file, leave=True, ascii=True, ncols=100) as bar:
            yield bar
            done = bar.n
        seconds = time.monotonic() - t0
        if unit_bytes:
            line = f"{desc}: {human_bytes(done)} in {seconds:.1f} s, {_rate(done, seconds)}"
        else:
            line = f"{desc}: done in {seconds:.1f} s"
        print(line, flush=True)
        if outside is not None and not tty:
            print(line, file=outside, flush=True)
    finally:
        if outside is not None:
            outside.close()


def bytes_bar(total: int, desc: str | None) -> contextlib.AbstractContextManager[tqdm]:
    """A bar over ``total`` bytes (none when ``desc`` is None: work beside other work)."""
    enabled = desc is not None and os.environ.get("IMAGING_PROGRESS", "1") != "0" and total >= _MIN_TOTAL
    return _bar(desc, total, True, enabled)


def percent_bar(desc: str) -> contextlib.AbstractContextManager[tqdm]:
    """A 0-100 bar for tools that report percentages (qemu-img -p)."""
    enabled = os.environ.get("IMAGING_PROGRESS", "1") != "0"
    return _bar(desc, 100, False, enabled, unit="%",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")  # fmt: skip
