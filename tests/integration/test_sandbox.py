"""The guest's own tools are boxed in: each limit is tried by a guest tool that tries to break it.

The guest here is a busybox root; its "tool" is a shell script of attempts, each printing one
line of what happened, run through the same sandbox 20-migrate runs mkinitrd, apt and yum in.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from imaging.errors import CommandError
from imaging.guest import limits, sandbox
from imaging.samples import packages

APPLETS = ["sh", "cat", "ls", "id", "wget", "mknod", "mount", "sleep", "echo", "head", "hostname", "dd", "grep",
           "nc", "seq", "insmod", "chown", "stat", "tr"]  # fmt: skip


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guest")
    for d in ("bin", "tmp", "etc", "proc", "dev", "sys", "run", "root"):
        (root / d).mkdir()
    shutil.copy(packages.busybox(), root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture(scope="module")
def host_service() -> Iterator[int]:
    """A service of the host's, on every address: what a hostile tool would like to reach."""

    class Secret(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"HOST-SECRET\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Secret)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def host_address() -> str:
    """One of the host's own addresses that is not loopback."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return str(a.address)
    raise AssertionError("the host has no non-loopback IPv4 address")


def no_leftovers() -> list[str]:
    # This process's groups only: another xdist worker's run may hold its own at the same time.
    groups = [str(p) for p in Path("/sys/fs/cgroup").rglob(f"imaging-sandbox-{os.getpid()}-*")]
    procs = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if "bwrap" in (p.info["cmdline"] or [""])[:1]
    ]
    return groups + [str(p) for p in procs]


def attempts(script: str) -> dict[str, str]:
    """``name: outcome`` lines of the guest tool's output."""
    return dict(line.split(": ", 1) for line in script.splitlines() if ": " in line)


def test_the_guests_tools_see_and_reach_nothing_of_the_host(guest: Path, host_service: int) -> None:
    me = host_address()
    script = f"""
        echo "uid: $(id -u)"
        echo "sys: $(ls -A /sys | head -c 200)"
        echo "macs: $(cat /sys/class/net/*/address 2>&1 | head -c 200)"
        echo "dmi: $(cat /sys/class/dmi/id/product_uuid 2>&1 | head -c 200)"
        echo "hostname: $(hostname)"
        echo "boot_id: $(cat /proc/sys/kernel/random/boot_id)"
        echo "cmdline: $(cat /proc/cmdline)"
        mknod /tmp/disk b 8 0 2>/dev/null && echo "mknod: made" || echo "mknod: refused"
        mount -t tmpfs x /tmp 2>/dev/null && echo "mount: mounted" || echo "mount: refused"
        chown 1234:5678 /tmp && echo "chown: $(stat -c %u:%g /tmp)"
        echo "ps: $(ls /proc | grep -c '^[0-9]')"
        for target in 127.0.0.1:{host_service} {me}:{host_service} 169.254.169.254:80; do
            echo "direct $target: $(wget -Y off -O- http://$target/ 2>&1 | tr "\\n" " " | head -c 200)"
            echo "proxied $target: $(wget -O- http://$target/ 2>&1 | tr "\\n" " " | head -c 300)"
        done
        echo "named localhost: $(wget -O- http://localhost:{host_service}/ 2>&1 | tr "\\n" " " | head -c 300)"
        echo "named host: $(wget -O- http://{me}/ 2>&1 | tr "\\n" " " | head -c 300)"
        echo "mirror: $(wget -q -O- http://deb.debian.org/debian/dists/bookworm/Release 2>&1 | head -1)"
        echo "other: $(wget -O- http://example.com/ 2>&1 | tr "\\n" " " | head -c 300)"
    """
    reached: list[str] = []
    # "localhost" and the host's own address as mirrors: names that lead back to the host are refused.
    result = sandbox.run(guest, ["/bin/sh", "-c", script], network=True, reached=reached,
                         mirror_list=["deb.debian.org", "localhost", me])  # fmt: skip
    seen = attempts(result.stdout)
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert (
        seen["uid"] == "0"
        and seen["sys"] == ""
        and "No such file" in seen["macs"]
        and "No such file" in seen["dmi"]
    )
    assert seen["hostname"] == "localhost" and seen["boot_id"] != host_boot_id and seen["cmdline"] == "ro"
    assert seen["mknod"] == "refused" and seen["mount"] == "refused"
    assert (
        seen["chown"] == "1234:5678" and (guest / "tmp").stat().st_uid == 1234
    )  # the guest's files are its own
    os.chown(guest / "tmp", 0, 0)
    assert int(seen["ps"]) < 10  # its own few processes, none of the host's hundreds
    for target in (f"127.0.0.1:{host_service}", f"{me}:{host_service}", "169.254.169.254:80"):
        assert "HOST-SECRET" not in seen[f"direct {target}"] + seen[f"proxied {target}"], target
        assert "can't connect" in seen[f"direct {target}"] or "unreachable" in seen[f"direct {target}"]
        assert "403" in seen[f"proxied {target}"]
    # On the mirror list, and still refused: the name leads back to the host.
    assert "403" in seen["named localhost"] and "port" in seen["named localhost"]  # 80 and 443 only
    assert "403" in seen["named host"] and "this host's own address" in seen["named host"]
    assert seen["mirror"] == "Origin: Debian"
    assert "403" in seen["other"] and "not on the mirror list" in seen["other"]
    assert reached and reached[0].startswith("mirrors reached: deb.debian.org (1); refused: ")
    assert "a loopback address" in reached[0] or "not on the mirror list" in reached[0]
    assert no_leftovers() == []


@pytest.mark.parametrize(
    ("attack", "script", "expect"),
    [
        ("fork bomb", "i=0; while :; do sleep 60 & i=$((i+1)); done", "ran into its limit of 32 processes"),
        ("memory", "dd if=/dev/zero of=/dev/null bs=300M count=1", "went over its memory limit of 64.0 MiB"),
        ("time", "sleep 600", "timed out after 3 s (the sandbox's time limit)"),
    ],
)
def test_each_limit_holds(
    guest: Path, monkeypatch: pytest.MonkeyPatch, attack: str, script: str, expect: str
) -> None:
    monkeypatch.setattr(sandbox, "configured_limits", lambda: limits.Limits(64 << 20, 32, 3))
    t0 = time.monotonic()
    with pytest.raises(CommandError) as e:
        sandbox.run(guest, ["/bin/sh", "-c", script])
    assert isinstance(e.value, sandbox.LimitReached) and expect in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 60  # stopped, not waited for (a loose bound: the machine is shared)
    assert no_leftovers() == []
