from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from imaging import tools
from imaging.errors import CommandError, ToolMissing


def test_run_records_each_command(tmp_path: Path) -> None:
    log = tmp_path / "commands.jsonl"
    with tools.command_log(log) as results:
        out = tools.run(["sh", "-c", "echo out; echo err >&2; exit 3"], ok_codes=(3,))
    assert out.stdout == "out\n" and out.exit_code == 3 and out.stderr_tail() == "err"
    assert results == [out]
    entry = json.loads(log.read_text())
    assert entry["argv"] == ["sh", "-c", "echo out; echo err >&2; exit 3"] and entry["exit_code"] == 3


def test_failure_is_one_line_with_stderr() -> None:
    with pytest.raises(CommandError) as e:
        tools.run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 4"])
    assert str(e.value) == "sh failed with exit code 4: the reason"
    assert e.value.result.exit_code == 4  # type: ignore[attr-defined]


def test_locale_is_pinned() -> None:
    assert tools.run(["sh", "-c", "echo $LANG"]).stdout.strip() == "C.UTF-8"


def test_missing_tool() -> None:
    with pytest.raises(ToolMissing, match="no-such-tool"):
        tools.run(["no-such-tool"])
    with pytest.raises(ToolMissing, match=r"could not find no-such-tool, needed to do X \(apt install y\)"):
        tools.require_tools("sh", "no-such-tool", reason="do X", hint="apt install y")


def test_timeout_kills_the_whole_group() -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 1 s"):
        tools.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=1)
    assert time.monotonic() - t0 < 20  # not the 30 s of either sleep: the group is killed, not waited for


def test_interrupt_kills_the_tool(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    main = threading.get_ident()

    def interrupt() -> None:
        while not pidfile.exists() or not pidfile.read_text().strip():
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        tools.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"])
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_output_reaches_the_callback_as_it_comes() -> None:
    # The wrapper's own speed (no polling delay: sh's callback polled in 0.1 s steps) is measured
    # in bench/, not asserted here: a loaded machine would fail a wall-clock bound.
    seen: list[str] = []
    result = tools.run(["sh", "-c", "printf 'a\\n'; printf 'b\\n'; echo err >&2"], on_output=seen.append)
    assert "".join(seen) == "a\nb\n" == result.stdout and result.stderr_tail() == "err"


def test_a_failing_progress_callback_does_not_stall_the_tool() -> None:
    def broken(chunk: str) -> None:
        raise RuntimeError("display gone")

    # More output than a pipe holds: the tool would block forever if nobody kept reading.
    result = tools.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], on_output=broken, timeout=20)
    assert result.exit_code == 0 and len(result.stdout) == 300000


def test_output_beyond_the_cap_stops_the_tool() -> None:
    # /dev/zero would stream forever (as debugfs would cat a 1 TiB sparse guest file): the
    # tool is stopped once the cap is passed, and what was kept stays within it.
    with pytest.raises(CommandError, match=r"^cat wrote more than 1 MiB to its output: stopped$") as e:
        tools.run(["cat", "/dev/zero"], max_output=1 << 20, timeout=60)
    assert len(e.value.result.stdout) <= 1 << 20  # type: ignore[attr-defined]


def test_stderr_keeps_its_last_part() -> None:
    result = tools.run(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x >&2; printf '\\nlast\\n' >&2"])
    assert len(result.stderr) <= tools.STDERR_KEPT and result.stderr_tail(1) == "last"


def test_input_reaches_the_tool() -> None:
    assert tools.run(["cat"], input="hello").stdout == "hello"


def test_a_background_command_keeps_the_end_of_its_output() -> None:
    with tools.spawn(["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo last"]) as proc:
        while proc.alive():
            time.sleep(0.05)
    result = proc.finish()
    assert (
        len(result.stdout) <= tools.STDERR_KEPT
        and result.stdout.endswith("last\n")
        and result.exit_code == 0
    )


def test_tools_stream_into_each_other_through_fds(tmp_path: Path) -> None:
    """printf | tr > file, each tool in its own run(): the fds become the tools', and are closed."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    read_end, write_end = os.pipe()
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    with ThreadPoolExecutor(1) as side:
        upper = side.submit(contextvars.copy_context().run, tools.run, ["tr", "a-z", "A-Z"], stdin_fd=read_end,
                            stdout_fd=out)  # fmt: skip
        tools.run(["printf", "streamed"], stdout_fd=write_end)
        upper.result(timeout=10)
    assert (tmp_path / "out").read_text() == "STREAMED"
    for fd in (read_end, write_end, out):
        with pytest.raises(OSError):
            os.fstat(fd)
