"""A stage kernel's SIGTERM handling (imaging/run/stage.py), in a plain Python process standing in
for the kernel."""

from __future__ import annotations

import subprocess
import sys

# The kernel's own atexit close, registered before the guard (ipykernel registers it when the
# kernel starts): jupyter_client's SIGTERM, sent when the kernel is slow to exit, lands in it.
KERNEL = """
import atexit, os, signal, time
def close():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
atexit.register(close)
import imaging.run.stage as stage
stage.guard()
stage._opened = True  # a stage has run in this kernel
"""


def test_a_sigterm_while_the_kernel_exits_ends_it_without_a_traceback() -> None:
    """Found by the fuzzed-images campaign on a busy host: the SIGTERM raised the stage's
    Interrupted inside ipykernel's atexit close, a traceback on the stderr of a run that
    succeeded."""
    proc = subprocess.run([sys.executable, "-c", KERNEL], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 128 + 15
