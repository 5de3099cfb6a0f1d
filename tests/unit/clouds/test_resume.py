"""The resumable copy's part file and its record: what a cut keeps, what the next attempt trusts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from imaging.clouds import resume
from imaging.clouds.resume import Cut, RangeSet, resumable_download

MIB = 1 << 20
SOURCE = {"cloud": "euca", "path": "/var/lib/instances/i-1/disk", "mtime": 1}


def test_ranges_merge_and_say_what_is_missing() -> None:
    held = RangeSet([(10, 20), (0, 5), (5, 10), (30, 40)])
    assert held.ranges == [(0, 20), (30, 40)]
    assert held.prefix() == 20 and held.total() == 30
    assert held.missing(50) == [(20, 30), (40, 50)]
    assert RangeSet().missing(7) == [(0, 7)] and RangeSet([(3, 7)]).prefix() == 0


def _cut_after(final: Path, data: bytes, upto: int, identity: dict[str, object]) -> None:
    with pytest.raises(Cut), resumable_download(final, len(data), identity) as out:
        for at in range(0, upto, MIB):
            out.write(at, data[at : min(upto, at + MIB)])
        raise Cut("the link went away")


def test_a_cut_keeps_what_arrived_and_the_next_attempt_fetches_the_rest(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB) + bytes(2 * MIB) + os.urandom(MIB)
    final = tmp_path / "source.raw"
    _cut_after(final, data, 4 * MIB, SOURCE)
    assert not final.exists() and resume.sidecar_path(final).exists()
    with resumable_download(final, len(data), SOURCE) as out:
        assert out.resumed_bytes == 4 * MIB and out.missing() == [(4 * MIB, 6 * MIB)]
        h = hashlib.sha256()
        out.hash_prefix(h, out.prefix())
        for start, end in out.missing():
            out.write(start, data[start:end])
            h.update(data[start:end])
    assert final.read_bytes() == data and h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert not resume.sidecar_path(final).exists() and list(tmp_path.iterdir()) == [final]
    assert os.stat(final).st_blocks * 512 < len(data)  # the zeros stayed a hole


def test_another_source_or_a_garbled_record_starts_from_nothing(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    final = tmp_path / "source.raw"
    for spoil in ("identity", "garbled", "beyond"):
        _cut_after(final, data, 2 * MIB, SOURCE)
        sidecar = resume.sidecar_path(final)
        if spoil == "garbled":
            sidecar.write_text("{not json")
        elif spoil == "beyond":
            sidecar.write_text(json.dumps({"identity": SOURCE, "size": len(data), "held": [[0, 9 * MIB]]}))
        identity = {**SOURCE, "mtime": 2} if spoil == "identity" else SOURCE
        with resumable_download(final, len(data), identity) as out:
            assert out.resumed_bytes == 0 and out.missing() == [(0, len(data))]
            out.write(0, data)
        assert final.read_bytes() == data
        final.unlink()


def test_bytes_written_but_never_recorded_do_not_survive_as_zeros(tmp_path: Path) -> None:
    """A SIGKILL between a write and its record: the next attempt finds zeros for that range
    (it writes no zeros, holes are zeros) and must not leave the stale bytes there."""
    final = tmp_path / "source.raw"
    with pytest.raises(Cut), resumable_download(final, 2 * MIB, SOURCE) as out:
        out.write(0, os.urandom(MIB))
        out.record()
        out.write(MIB, os.urandom(MIB))  # on disk, but the record below forgets it
        raise Cut("cut")
    resume.sidecar_path(final).write_text(
        json.dumps({"identity": SOURCE, "size": 2 * MIB, "held": [[0, MIB]]})
    )
    with resumable_download(final, 2 * MIB, SOURCE) as out:
        assert out.missing() == [(MIB, 2 * MIB)]
        out.write(MIB, bytes(MIB))
    assert final.read_bytes()[MIB:] == bytes(MIB)


def test_a_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    final = tmp_path / "source.raw"
    with pytest.raises(resume.SourceError, match="mismatch"), resumable_download(final, MIB, SOURCE) as out:
        out.write(0, os.urandom(MIB))
        raise resume.SourceError("sha256 mismatch")
    assert list(tmp_path.iterdir()) == []


def test_many_writers_each_finding_the_record_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EBS's block readers write from many threads: the records they set off, beside the copy,
    never overlap (one temporary name), and a cut's last record holds every block written."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)
    block = 64 << 10
    blocks = {i: os.urandom(block) for i in range(400)}
    with (
        pytest.raises(Cut),
        resumable_download(tmp_path / "disk.raw", len(blocks) * block, {"id": 1}) as part,
    ):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: part.write(i * block, blocks[i]), blocks))
        raise Cut("cut")
    record = json.loads((tmp_path / ".disk.raw.part.json").read_text())
    assert record["held"] == [[0, len(blocks) * block]]
    assert (tmp_path / ".disk.raw.part").read_bytes() == b"".join(blocks[i] for i in range(len(blocks)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".disk.raw.part", ".disk.raw.part.json"]
