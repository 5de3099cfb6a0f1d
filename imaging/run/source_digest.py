"""The source's content digest, computed beside a run:
``python -m imaging.run.source_digest SOURCE OUT PARENT_PID`` (started by ``pipeline.SourceDigest``).

:func:`imaging.sparse.content_digest` reads and hashes the source's data only, never its holes,
so it costs what the data costs (0.6 s of CPU per GB here, on two threads), not the virtual
size. A process of its own, in its own session, niced: it takes CPU the stages leave idle first,
and a plain interpreter that imports only this and sparse.py (a multiprocessing child would
import the pipeline's whole main module again, about 40 MiB more at the run's peak). Not at the
lowest priority any more: on a loaded machine a nice-19 process in a niced autogroup got almost
no CPU, and the run waited for it at the end (22 s for a 512 MiB disk at load 9).
"""

from __future__ import annotations

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
    os.nice(10)
    digest = sparse.content_digest(Path(path))
    with sparse.atomic_path(Path(out)) as part:
        part.write_text(digest + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
