"""Copying an instance's disk off a Eucalyptus node over SSH: ours against OpenSSH's ``scp``.

node   ``eucalyptus.fetch`` (OpenSSH's ssh running dd on the node, zstd -1 on both ends over a
       network, unpacked on loopback, written sparse, hashed, the node's sha256 compared) against
       OpenSSH's ``scp`` of the same file from the same sshd, alternating, on the real-files disk (5 GiB, 1.2 GB of
       this host's /usr) and on a disk of data that does not compress; and the peak memory of a
       10 GiB node copy (a sparse file), in a process of its own

Page cache warm; sshd on loopback. Timings on a shared machine are rough: the load is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, incompressible_disk, load, mib, real_disk  # noqa: E402
from imaging.clouds import eucalyptus  # noqa: E402
from imaging.clouds import settings as cs  # noqa: E402
from tests.integration.cloudkit import Node, eucalyptus_node  # noqa: E402

GIB = 1 << 30
NODE_REPEAT = int(os.environ.get("IMAGING_BENCH_NODE_REPEAT", "3"))


class _Ends:
    """While a copy runs: the peak memory (RSS) of this process and its tools (the node's sshd,
    our child too, left out) above what this process held before, and the CPU seconds of the
    node's side (sshd's session processes and what they run: dd, zstd, sha256sum), sampled every
    0.1 s (a process's last tenth of a second can be missed)."""

    def __init__(self, node: Node) -> None:
        self.sshd = int((node.root / "sshd.pid").read_text())
        self.me = psutil.Process()
        self.base = self.me.memory_info().rss
        self.peak = 0
        self.node_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                node = psutil.Process(self.sshd).children(recursive=True)
            except psutil.Error:
                node = []
            theirs = {self.sshd, *(p.pid for p in node)}
            rss = self.me.memory_info().rss - self.base
            for p in [*self.me.children(recursive=True), *node]:
                try:
                    if p.pid not in theirs:
                        rss += p.memory_info().rss
                    else:
                        cpu = p.cpu_times()
                        self.node_cpu[p.pid] = cpu.user + cpu.system
                except psutil.Error:
                    continue
            self.peak = max(self.peak, rss)
            time.sleep(0.1)

    def __enter__(self) -> _Ends:
        self._cpu = _here()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.here_cpu = _here() - self._cpu


def _here() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measured(node: Node, fn: Callable[[], object]) -> tuple[float, int, float, float]:
    """(seconds, peak memory above the process, CPU s here, CPU s on the node) of one copy."""
    with _Ends(node) as ends:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, ends.peak, ends.here_cpu, sum(ends.node_cpu.values())


def _scp(node: Node, dest: Path) -> None:
    subprocess.run(["scp", "-q", "-P", str(node.port), "-i", str(node.key_file), "-o", f"UserKnownHostsFile={node.known_hosts}",
                    "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"root@127.0.0.1:{node.disk}", str(dest)],
                   check=True)  # fmt: skip
    dest.unlink()


def _ours(node: Node, dest: Path, compress: str) -> None:
    cloud = cs.parse_clouds({"euca": node.cloud(compress=compress)}, "bench")["euca"]
    assert isinstance(cloud, cs.Eucalyptus)
    eucalyptus.fetch(cs.parse_source(f"eucalyptus://euca/{node.instance}"), cloud, dest)
    dest.unlink()


def _median(runs: list[tuple[float, int, float, float]]) -> tuple[float, int, float, float]:
    runs = sorted(runs)
    return runs[len(runs) // 2]


def node_rows(root: Path, disk: Path, what: str) -> list[tuple[str, str, str]]:
    """Ours (compress auto: unpacked on loopback) and scp, alternating, and ours packed (zstd -1) once."""
    size = disk.stat().st_size
    before = load()
    with eucalyptus_node(root / "node", disk) as node:
        ours, scp = [], []
        for _ in range(NODE_REPEAT):
            ours.append(_measured(node, lambda: _ours(node, root / "ours.raw", "auto")))
            scp.append(_measured(node, lambda: _scp(node, root / "scp.raw")))
        packed = _measured(node, lambda: _ours(node, root / "packed.raw", "on"))
    (t, peak, here, there), (ts, peaks, heres, theres) = _median(ours), _median(scp)

    def rate(seconds: float) -> str:
        return f"{size / seconds / 1e6:.0f} MB/s"

    return [(f"node copy over SSH, {what}: ours (ssh + dd, sparse, both ends hash) vs scp",
             f"{t:.1f} s ({rate(t)}): {t / ts:.2f}x scp",
             f"scp {ts:.1f} s ({rate(ts)}); median of {NODE_REPEAT} each, alternating; peak memory above the process "
             f"ours {mib(peak)}, scp {mib(peaks)}; CPU s here ours {here:.1f}, scp {heres:.1f}; on the node ours "
             f"{there:.1f}, scp {theres:.1f}; ours packed (zstd -1 both ends) {packed[0]:.1f} s ({packed[0] / ts:.2f}x scp, "
             f"node CPU {packed[3]:.1f} s); load {before:.1f} before, {load():.1f} after")]  # fmt: skip


_PEAK = """
import json, os, resource, sys
from pathlib import Path
from imaging.clouds import eucalyptus, settings as cs
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
cloud = cs.parse_clouds({"euca": json.loads(sys.argv[1])}, "bench")["euca"]
before = status("VmRSS:")
eucalyptus.fetch(cs.parse_source(sys.argv[2]), cloud, Path(sys.argv[3]))
print(before, status("VmHWM:"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def node_peak_memory(root: Path) -> list[tuple[str, str, str]]:
    """A 10 GiB node copy (a sparse file: holes travel fastest, the copy's own buffers show) in a
    process of its own: its peak RSS (VmHWM) above its size before the copy, and its largest tool's."""
    disk = root / "ten.raw"
    with open(disk, "wb") as f:
        f.truncate(10 * GIB)
    rows = []
    with eucalyptus_node(root / "node10", disk) as node:
        for compress in ("on",):  # packed: the unpacker too; unpacked takes 4 more minutes here
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(node.cloud(compress=compress)),
                                  f"eucalyptus://euca/{node.instance}", str(root / "ten-copy.raw")],
                                 check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                                 env={**os.environ, "IMAGING_PROGRESS": "0"}).stdout.split()  # fmt: skip
            seconds = time.perf_counter() - t0
            (root / "ten-copy.raw").unlink()
            before, hwm, child = (int(n) for n in out[-3:])
            rows.append((f"node copy of a 10 GiB disk (sparse), compress {compress}: peak memory",
                         f"{mib(hwm - before)} above the process's {mib(before)}",
                         f"goal < 150 MiB; largest tool (ssh, zstd) {mib(child)}; {seconds:.1f} s"))  # fmt: skip
    disk.unlink()
    return rows


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        root = Path(tmp)
        real = real_disk(WORK / "real-5g.img")
        rows += node_rows(root / "real", real, "real-files disk (5 GiB, 1.2 GB of /usr)")
        # The same disk as bench/clouds.py's: as much data as the real-files disk, none of it
        # compressible (a 1 GiB one took 4 s, where a second SSH login was a tenth of the copy).
        noise = incompressible_disk(WORK / "noise-1200m.raw", 5 * GIB, [(1 << 20, 1200 << 20)])
        rows += node_rows(
            root / "noise", noise, "disk of data that does not compress (5 GiB, 1.2 GB of it data)"
        )
        rows += node_peak_memory(root)
    return rows


if __name__ == "__main__":
    for row in main():
        print("| " + " | ".join(row) + " |")
