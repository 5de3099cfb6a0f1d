"""The run record in an S3-compatible object store, where every host can read it.

A run given a store (``IMAGING_RECORDS``: JSON of :class:`StoreConfig`, which the request
service's worker sets) copies its record there as it is made, under ``<prefix><run id>/`` with
the same names as in the run directory: ``request.json`` and ``state.json`` at once, and after
each stage (completed or failed) its result, its executed notebook and HTML render, the command
log, ``verify/``, the artifact once 40-export made it, then ``audit.json`` (after the files it
names) and ``state.json``; at the end ``result.json`` and ``report.html``. With ``keep_inputs``
the disk the next stage starts from (``stage_inputs`` in ``parameters/defaults.yaml``) goes
there too, zstd-compressed (holes cost nothing), replacing the one before: another host can then
resume a failed or abandoned run at the stage it was in; without it, such a run restarts from its
first stage, the abandoned attempt kept in its record (``imaging/service/takeover.py``).

The API reads notebooks, reports, audit chains and artifacts through :func:`reader`: this store,
or the local runs directory of a one-machine service. Keys, secret keys and endpoint never reach
a notebook: the stage kernels do not get ``IMAGING_RECORDS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from imaging import config
from imaging.errors import ImagingError
from imaging.workspace import Workspace, write_json

ENV = "IMAGING_RECORDS"
PUSHED = ".record-pushed.json"  # what this host put in the store: name -> [size, mtime_ns]
_LAST = ("audit.json", "state.json")  # after the files they name
_CHUNK = 8 << 20
ZST = ".zst"


class StoreConfig(BaseModel):
    """Where run records live (the service's ``records:``); no bucket: in the runs directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str = ""  # empty: AWS itself
    bucket: str = ""
    prefix: str = Field(default="runs/", max_length=200)
    region: str = "us-east-1"
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    # The disk the next stage starts from, after every stage (costs its compressed size): a run
    # resumes on another host at the stage it was in, instead of from its first stage.
    keep_inputs: bool = False

    def env(self) -> str:
        """The JSON a run gets in ``IMAGING_RECORDS`` (secrets included: a child's environment)."""
        data = self.model_dump(mode="json")
        data.update(access_key_id=self.access_key_id.get_secret_value(),
                    secret_access_key=self.secret_access_key.get_secret_value())  # fmt: skip
        return json.dumps(data)

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class Reader(Protocol):
    """What the API reads a run's record through: the object store, or local files."""

    def names(self, run: str, under: str = "") -> dict[str, int]: ...

    def open(self, run: str, name: str) -> tuple[Iterator[bytes], int] | None: ...

    def digest(self, run: str, name: str, like: str) -> str | None: ...


class LocalReader:
    def __init__(self, runs: Path) -> None:
        self.runs = runs

    def _path(self, run: str, name: str) -> Path:
        config.check_run_id(run)
        path = (self.runs / run / name).resolve()
        if not path.is_relative_to((self.runs / run).resolve()):
            raise ImagingError(f"{name} is not in run {run}")
        return path

    def names(self, run: str, under: str = "") -> dict[str, int]:
        top = self._path(run, under) if under else self._path(run, ".")
        if not top.is_dir():
            return {}
        root = self._path(run, ".")
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(top.rglob("*")) if p.is_file()}

    def open(self, run: str, name: str) -> tuple[Iterator[bytes], int] | None:
        path = self._path(run, name)
        if not path.is_file():
            return None

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(_CHUNK):
                    yield block

        return chunks(), path.stat().st_size

    def digest(self, run: str, name: str, like: str) -> str | None:
        """The file's digest of the kind ``like`` is (:func:`imaging.run.audit.file_digest`)."""
        from imaging.run import audit

        path = self._path(run, name)
        return audit.file_digest(path, like) if path.is_file() else None


class ObjectStore:
    """One bucket of an S3-compatible store, holding every run under ``prefix``."""

    def __init__(self, cfg: StoreConfig) -> None:
        import boto3
        from botocore.config import Config

        self.cfg = cfg
        keys = {}
        if cfg.access_key_id.get_secret_value():
            keys = {"aws_access_key_id": cfg.access_key_id.get_secret_value(),
                    "aws_secret_access_key": cfg.secret_access_key.get_secret_value()}  # fmt: skip
        self.client = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url or None,
            region_name=cfg.region,
            config=Config(
                retries={"max_attempts": 6, "mode": "standard"}, connect_timeout=10, read_timeout=60
            ),
            **keys,
        )

    def key(self, run: str, name: str) -> str:
        config.check_run_id(run)
        return f"{self.cfg.prefix}{run}/{name}"

    def _fail(self, what: str, e: Exception) -> ImagingError:
        detail = " ".join(str(e).split())[:300]
        return ImagingError(f"the record store {self.cfg.where}: {what}: {detail}")

    def put(self, run: str, name: str, path: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            self.client.upload_file(str(path), self.cfg.bucket, self.key(run, name),
                                    Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20))  # fmt: skip
        except Exception as e:  # botocore's and boto3's errors have no common base worth naming
            raise self._fail(f"cannot store {run}/{name}", e) from None

    def put_stream(self, run: str, name: str, stream: Any) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            self.client.upload_fileobj(stream, self.cfg.bucket, self.key(run, name),
                                       Config=TransferConfig(multipart_chunksize=64 << 20, use_threads=False))  # fmt: skip
        except Exception as e:
            raise self._fail(f"cannot store {run}/{name}", e) from None

    def delete(self, run: str, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            objects = [{"Key": self.key(run, n)} for n in names[start : start + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.cfg.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except Exception as e:
                raise self._fail(f"cannot delete from {run}", e) from None

    def names(self, run: str, under: str = "") -> dict[str, int]:
        base = self.key(run, "")
        found: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.cfg.bucket, Prefix=base + under
            ):
                found.update({o["Key"][len(base) :]: int(o["Size"]) for o in page.get("Contents", [])})
        except Exception as e:
            raise self._fail(f"cannot list {run}", e) from None
        return found

    def open(self, run: str, name: str) -> tuple[Iterator[bytes], int] | None:
        try:
            got = self.client.get_object(Bucket=self.cfg.bucket, Key=self.key(run, name))
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as e:
            raise self._fail(f"cannot read {run}/{name}", e) from None
        body = got["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(_CHUNK)
            finally:
                body.close()

        return chunks(), int(got["ContentLength"])

    def read(self, run: str, name: str) -> bytes | None:
        found = self.open(run, name)
        return b"".join(found[0]) if found else None

    def digest(self, run: str, name: str, like: str) -> str | None:
        """The object's digest of the kind ``like`` is (:func:`imaging.run.audit.stream_digest`)."""
        from imaging.run import audit

        found = self.open(run, name)
        return None if found is None else audit.stream_digest(found[0], like)

    def download(self, run: str, name: str, dest: Path) -> None:
        """``name`` to ``dest``, under a ``.part`` name until complete; a ``.zst`` object is
        inflated on the way, zero blocks left as holes."""
        from imaging import sparse

        found = self.open(run, name)
        if found is None:
            raise ImagingError(f"the record store {self.cfg.where}: {run}/{name} is not there")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with sparse.atomic_path(dest) as part, open(part, "wb") as out:
            if name.endswith(ZST):
                import zstandard

                reader = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], _IterReader(found[0])))
                while block := reader.read(_CHUNK):
                    if block.count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)  # a hole, as the disk had it
                    else:
                        out.write(block)
                out.truncate()
            else:
                for block in found[0]:
                    out.write(block)


class _IterReader:
    """A file-like ``read`` over an iterator of byte strings (what zstandard reads from)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buffer) < n:
            block = next(self.chunks, None)
            if block is None:
                break
            self.buffer += block
        data, self.buffer = (self.buffer, b"") if n < 0 else (self.buffer[:n], self.buffer[n:])
        return data


class _HashingReader:
    """Reads a file for upload (compressed on the way) and hashes what it read."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n if n > 0 else _CHUNK)
        self.hash.update(data)
        self.size += len(data)
        return data

    def close(self) -> None:
        self.file.close()


def from_env() -> StoreConfig | None:
    text = os.environ.get(ENV, "")
    if not text:
        return None
    try:
        return StoreConfig(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise ImagingError(
            f"{ENV} is not a record store's settings: {' '.join(str(e).split())[:200]}"
        ) from None


def reader(cfg: StoreConfig | None) -> Reader:
    return ObjectStore(cfg) if cfg is not None and cfg.bucket else LocalReader(config.runs_dir())


def _record_files(ws: Workspace) -> list[str]:
    """The run's files that belong to its record (not its work disks, locks or partial files)."""
    names = []
    for path in sorted(ws.root.rglob("*")):
        rel = path.relative_to(ws.root)
        if (
            not path.is_file()
            or rel.parts[0] in ("work", "mounts.json")
            or any(p.startswith(".") for p in rel.parts)
        ):
            continue
        names.append(str(rel))
    # A stage's result before its notebook: a push cut by the store going away then leaves a
    # result without its notebook (the stage runs again), never a notebook without its result,
    # which a host taking the run over would find done and unable to go on from.
    return sorted(
        names,
        key=lambda n: (n in _LAST, _LAST.index(n) if n in _LAST else 0, not n.startswith("results/"), n),
    )


class Pusher:
    """A run's side of the store: what changed in its record goes there (see the module)."""

    def __init__(self, ws: Workspace, cfg: StoreConfig) -> None:
        self.ws = ws
        self.cfg = cfg
        self.store = ObjectStore(cfg)
        self.lock = threading.Lock()
        self.again = False
        self.error: str | None = None

    def _pushed(self) -> dict[str, list[int]]:
        try:
            data = json.loads((self.ws.root / PUSHED).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def push(self, wait: bool = True) -> bool:
        """Make the store's copy of the record this run directory's: what changed goes there
        (``audit.json`` and ``state.json`` after the files they name), what went (renamed by a
        restart) goes from there. False (and a line on stderr) when the store could not take
        it: the next push tries again. ``wait=False``: while another push runs (the last
        stage's artifact, say), leave this one to it rather than wait."""
        self.again = True
        ok = True
        while self.again:
            if not self.lock.acquire(blocking=wait):
                return True  # the push under way sees `again` and goes round once more
            try:
                self.again = False
                ok = self._push()
            finally:
                self.lock.release()
        return ok

    def _push(self) -> bool:
        pushed = self._pushed()
        try:
            names = _record_files(self.ws)
            for name in names:
                st = (self.ws.root / name).stat()
                if pushed.get(name) == [st.st_size, st.st_mtime_ns]:
                    continue
                self.store.put(self.ws.id, name, self.ws.root / name)
                pushed[name] = [st.st_size, st.st_mtime_ns]
            gone = sorted(set(pushed) - set(names))
            if gone:
                self.store.delete(self.ws.id, gone)
                for name in gone:
                    del pushed[name]
        except (ImagingError, OSError) as e:
            self.error = str(e)
            print(f"imaging: {e} (tried again later)", file=sys.stderr, flush=True)
            return False
        finally:
            write_json(self.ws.root / PUSHED, pushed)
        self.error = None
        return True

    def keep_inputs(self, stage: str | None) -> None:
        """With keep_inputs: the work disks ``stage`` starts from go to the store. Disks kept
        for an earlier stage go (whichever host kept them), and all of them once the run ends
        (``stage`` None)."""
        wanted = [n for n in config.stage_inputs(stage) if n.startswith("work/")] if stage else []
        # work/esp.raw is there only for a source that had an ESP.
        wanted = [n for n in wanted if n != "work/esp.raw" or (self.ws.root / n).is_file()]
        if not self.cfg.keep_inputs:
            wanted = []
        with self.lock:
            try:
                for name in wanted:
                    self._put_compressed(name)
                stale = [n for n in self.store.names(self.ws.id, "work/")
                         if n.removesuffix(ZST).removesuffix(".sha256") not in wanted]  # fmt: skip
                if stale:
                    self.store.delete(self.ws.id, stale)
            except (ImagingError, OSError) as e:
                self.error = str(e)
                print(f"imaging: {e} (the next stage's input is not kept)", file=sys.stderr, flush=True)

    def _put_compressed(self, name: str) -> None:
        import zstandard

        reader = _HashingReader(self.ws.root / name)
        try:
            compressed = zstandard.ZstdCompressor(level=1, threads=-1).stream_reader(cast(IO[bytes], reader))
            self.store.put_stream(self.ws.id, name + ZST, compressed)
        finally:
            reader.close()
        # Its sha256 and size beside it, checked by the host that takes the disk back.
        sums = self.ws.root / f".{Path(name).name}.sha256"
        sums.write_text(f"{reader.hash.hexdigest()}  {Path(name).name}\n{reader.size}\n")
        try:
            self.store.put(self.ws.id, name + ".sha256", sums)
        finally:
            sums.unlink()


def pusher(ws: Workspace) -> Pusher | None:
    cfg = from_env()
    return Pusher(ws, cfg) if cfg is not None and cfg.bucket else None
