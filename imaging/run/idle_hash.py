"""The source's sha256, hashed beside a run at the lowest priority:
``python -m imaging.run.idle_hash SOURCE OUT PARENT_PID`` (started by ``pipeline.SourceHash``).

A process of its own, in its own session: the kernel shares CPU between sessions (autogroups)
before it looks at priorities, so a low-priority thread of the pipeline would still take half the
CPU from a stage's compressors (measured: VMDK writing twice as slow). A plain interpreter that
imports only this and sparse.py: a multiprocessing child would import the pipeline's whole main
module again (about 40 MiB more at the run's peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

from imaging import sparse


def main(path: str, out: str, parent: int) -> int:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone when the pipeline is
    if os.getppid() != parent:  # the pipeline died before that took hold
        return 1
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("19")
    os.nice(19)
    digest = sparse.sha256(Path(path), desc=None)
    sparse.write_sha256_file(Path(path), digest, beside=Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
