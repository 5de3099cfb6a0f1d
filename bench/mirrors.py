"""The sandbox's way to the package mirrors: a download through our proxy against the same one direct.

curl fetches the same file from deb.debian.org (Debian's package index for bookworm, 8.8 MB)
directly and through :class:`imaging.guest.mirrors.MirrorProxy` (here listening in this
process's own network namespace, as it does in the sandbox's), alternately, nine times each;
the median of each. The network is shared with whatever else runs: the ratio is what matters.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imaging.guest import mirrors  # noqa: E402

URL = "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz"


def _fetch(proxy: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["curl", "-fsS", "-o", "/dev/null", "--proxy", proxy, URL], check=True)
    return time.perf_counter() - t0


def main() -> list[tuple[str, str, str]]:
    proxy = mirrors.MirrorProxy(["deb.debian.org", "*.deb.debian.org"])
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        proxy.listen_in(netns)
        direct, through = [], []
        _fetch("")  # warm the mirror's cache and the resolver
        for _ in range(9):
            direct.append(_fetch(""))
            through.append(_fetch(mirrors.URL))
    finally:
        proxy.close()
        os.close(netns)
    d, t = statistics.median(direct), statistics.median(through)
    mb = 8.8
    return [("package index download (8.8 MB)", f"direct {d * 1000:.0f} ms ({mb / d:.0f} MB/s), through the proxy "
             f"{t * 1000:.0f} ms ({mb / t:.0f} MB/s)", f"{t / d:.2f}x")]  # fmt: skip


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
