from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from imaging import sparse


def _sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)


def test_copy_keeps_holes_and_data(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    chunks = {0: b"A" * 4096, 10 << 20: os.urandom(1 << 20), (64 << 20) - 4096: b"Z" * 4096}
    _sparse_file(src, 64 << 20, chunks)
    sparse.create_sparse(dst, (64 << 20) + (1 << 20))
    stats = sparse.copy_range(src, dst, dst_offset=1 << 20)
    assert stats.bytes == sparse.data_bytes(src) < (4 << 20)
    with open(src, "rb") as s, open(dst, "rb") as d:
        d.seek(1 << 20)
        assert hashlib.sha256(s.read()).digest() == hashlib.sha256(d.read()).digest()
    assert sparse.allocated_bytes(dst) < (8 << 20)  # holes stayed holes


def test_copy_a_range(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse_file(src, 8 << 20, {1 << 20: b"x" * (2 << 20)})
    sparse.create_sparse(dst, 2 << 20)
    sparse.copy_range(src, dst, src_offset=1 << 20, length=2 << 20)
    assert dst.read_bytes() == b"x" * (2 << 20)


def test_sha256_equals_a_plain_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _sparse_file(
        path, (40 << 20) + 123, {5: b"hello", 20 << 20: os.urandom(100_000), (40 << 20) + 100: b"end"}
    )
    assert sparse.sha256(path, desc=None) == hashlib.sha256(path.read_bytes()).hexdigest()
    empty = tmp_path / "e"
    empty.touch()
    assert sparse.sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "artifact.qcow2"
    with pytest.raises(KeyboardInterrupt):
        with sparse.atomic_path(final) as part:
            part.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with sparse.atomic_path(final) as part:
        part.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.qcow2"]


def test_sha256_file_is_what_sha256sum_reads(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "a.raw"
    path.write_bytes(b"data")
    sparse.write_sha256_file(path, sparse.sha256(path))
    subprocess.run(["sha256sum", "-c", "a.raw.sha256"], cwd=tmp_path, check=True, capture_output=True)


def _list_digest(data: bytes) -> str:
    """The content digest as its definition reads, from every byte."""
    top = hashlib.sha256()
    for start in range(0, len(data), sparse.DIGEST_BLOCK):
        top.update(hashlib.sha256(data[start : start + sparse.DIGEST_BLOCK]).digest())
    return f"{sparse.DIGEST_NAME}:{top.hexdigest()}"


@pytest.mark.parametrize("size", [0, 1, 5000, 3 * sparse.DIGEST_BLOCK + 77, 8 * sparse.DIGEST_BLOCK])
def test_content_digest_is_the_content_alone(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    sparse_file, dense = tmp_path / "sparse.raw", tmp_path / "dense.raw"
    with open(sparse_file, "wb") as f:
        f.truncate(size)
        for _ in range(3 if size else 0):  # data here and there, holes between, a short tail
            f.seek(rng.randrange(size))
            f.write(rng.randbytes(9000))
    dense.write_bytes(sparse_file.read_bytes())  # the same content, every byte written
    digest = sparse.content_digest(sparse_file)
    assert digest == _list_digest(sparse_file.read_bytes()) == sparse.content_digest(dense)
    # Read as a stream (the record's object store), in chunks that do not fall on its blocks.
    data = sparse_file.read_bytes()
    assert sparse.content_digest_of(data[i : i + 700_001] for i in range(0, len(data), 700_001)) == digest
    with open(dense, "r+b") as f:  # one byte changed anywhere, even in a hole, changes it
        f.seek(size // 2)
        f.write(b"\1")
    assert size == 0 or sparse.content_digest(dense) != digest


def test_content_digest_reads_the_data_not_the_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of hole, 1 MiB of data
        f.seek(40 << 30)
        f.write(b"x" * (1 << 20))
    read: list[int] = []
    real = os.preadv
    monkeypatch.setattr(
        sparse.os, "preadv", lambda fd, bufs, pos: read.append(len(bufs[0])) or real(fd, bufs, pos)
    )
    sparse.content_digest(path)
    assert sum(read) == 1 << 20


def test_records_reach_the_disk_before_their_name_and_their_name_before_the_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut must leave the old file or the new one, never an empty one under the name:
    # the data is synced before the rename, the directory (the rename) before the write returns.
    from imaging.workspace import write_json

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    write_json(tmp_path / "result.json", {"verdict": "booted"})
    sparse.write_sha256_file(tmp_path / "a.qcow2", "ab" * 32, tag="run-1")
    assert events == [
        ("fsync", str(tmp_path / ".result.json.part")),
        ("rename", str(tmp_path / "result.json")),
        ("fsync", str(tmp_path)),
        ("fsync", str(tmp_path / ".a.qcow2.sha256~run-1.part")),
        ("rename", str(tmp_path / "a.qcow2.sha256")),
        ("fsync", str(tmp_path)),
    ]


def test_a_run_sweeps_its_own_partial_files_only(tmp_path: Path) -> None:
    from imaging.run import pipeline
    from imaging.run.request import Request
    from imaging.workspace import Workspace

    ws = Workspace.open(tmp_path / "runs" / "demo-1")
    out = tmp_path / "out"
    out.mkdir()
    request = Request.create(source="/nonexistent.img", name="demo", format="qcow2", out=str(out))
    mine = [
        sparse.part_path(out / "demo.qcow2", "demo-1"),
        sparse.part_path(out / "demo.qcow2.sha256", "demo-1"),
    ]
    others = [sparse.part_path(out / "demo.qcow2", "demo-2"), sparse.part_path(out / "demo.qcow2", "x.demo-1"),
              out / ".notes.txt.part", out / ".demo.qcow2.part"]  # fmt: skip
    for p in [*mine, *others, ws.work / ".instance.raw.part"]:
        p.write_bytes(b"partial")
    # A cloud copy cut mid-way, with its record: kept for imaging resume (clouds/resume.py).
    resumable = [ws.work / ".source.raw.part", ws.work / ".source.raw.part.json"]
    for p in resumable:
        p.write_bytes(b"partial")
    removed = pipeline.sweep(ws, out, request)
    assert sorted(removed) == sorted(str(p) for p in [*mine, ws.work / ".instance.raw.part"])
    assert all(p.exists() for p in [*others, *resumable])
    # A name as users write it: the artifact, and so its partial file, is named after its slug.
    named = Request.create(source="/nonexistent.img", name="My image (v2)", format="qcow2", out=str(out))
    slugged = sparse.part_path(out / f"{named.slug}.qcow2", "demo-1")
    slugged.write_bytes(b"partial")
    assert named.slug != named.name and pipeline.sweep(ws, out, named) == [str(slugged)]
