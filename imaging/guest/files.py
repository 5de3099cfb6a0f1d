"""Files of a mounted guest, reached only through paths resolved *inside* the guest.

Every path goes through openat2(2) with RESOLVE_IN_ROOT: the kernel resolves it as if the guest's
root were ``/``, so an absolute symlink in the image (``/etc/passwd -> /etc/shadow`` or a link to
the host's ``/etc``) and any ``..`` stay inside the guest, with no window between checking and
opening. Symlinks inside the guest are followed the way the guest itself would follow them, so
CentOS's ``/etc/rc.local -> rc.d/rc.local`` is edited at its target and stays a symlink.

Edits keep the file's inode, owner, mode and xattrs (the content is rewritten in place) and
return a unified diff for the record.
"""

from __future__ import annotations

import ctypes
import difflib
import errno
import fnmatch
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imaging.errors import GuestError

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share it
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_LIBC = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _norm(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise GuestError(f"guest paths are absolute: {path!r}")
    return posixpath.normpath(path)


@dataclass(frozen=True)
class Removed:
    path: str
    bytes: int
    kind: str  # "file", "directory", "symlink", "other"


class Guest:
    """A guest filesystem mounted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution ------------------------------------------------------------------------

    def _open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """openat2 relative to the guest root; ``path`` may be absolute (guest-absolute)."""
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                       _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV)  # fmt: skip
        rel = _norm(path).lstrip("/") or "."
        fd = _LIBC.syscall(_SYS_OPENAT2, self._root_fd, rel.encode(), ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(fd)

    @contextmanager
    def _fd(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> Iterator[int]:
        fd = self._open(path, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """(fd of the parent directory, last component): for operations on the entry itself."""
        path = _norm(path)
        if path == "/":
            raise GuestError("refusing to operate on the guest's root directory itself")
        parent, name = posixpath.split(path)
        with self._fd(parent, os.O_PATH | os.O_DIRECTORY) as fd:
            yield fd, name

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            with self._parent(path) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def stat(self, path: str) -> os.stat_result | None:
        """What ``path`` leads to, symlinks followed the guest's way; None when it leads nowhere
        (missing, a dangling or looping link)."""
        try:
            with self._fd(path, os.O_PATH) as fd:
                return os.fstat(fd)
        except OSError:
            return None

    def is_file(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def exists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_symlink(self, path: str) -> bool:
        st = self.lstat(path)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def readlink(self, path: str) -> str:
        with self._parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def realpath(self, path: str) -> str:
        """Where ``path`` leads inside the guest (symlinks followed the guest's way); a dangling
        symlink leads nowhere, and ``path`` itself is returned."""
        try:
            with self._fd(path, os.O_PATH) as fd:
                host = os.readlink(f"/proc/self/fd/{fd}")
        except (FileNotFoundError, NotADirectoryError):
            return _norm(path)
        root = os.path.realpath(self.root)
        return "/" + os.path.relpath(host, root).removeprefix(".")

    def listdir(self, path: str) -> list[str]:
        try:
            with self._fd(path, os.O_RDONLY | os.O_DIRECTORY) as fd:
                return sorted(os.listdir(fd))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def glob(self, pattern: str) -> list[str]:
        """Guest paths matching a pattern whose components may hold shell wildcards."""
        parts = [p for p in _norm(pattern).split("/") if p]
        found = ["/"]
        for part in parts:
            nxt = []
            for base in found:
                if any(c in part for c in "*?["):
                    names = fnmatch.filter(self.listdir(base), part)
                    nxt += [posixpath.join(base, n) for n in names if n not in (".", "..")]
                elif self.exists(posixpath.join(base, part)):
                    nxt.append(posixpath.join(base, part))
            found = nxt
        return sorted(found)

    # -- reading and editing -----------------------------------------------------------------

    def read_bytes(self, path: str, limit: int = 64 << 20) -> bytes | None:
        try:
            with self._fd(path, os.O_RDONLY) as fd:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise GuestError(f"{path} in the guest is not a regular file")
                data = os.read(fd, limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise GuestError(f"{path} in the guest is larger than {limit} bytes")
        return data

    def read_head(self, path: str, size: int) -> tuple[bytes, int]:
        """The first ``size`` bytes of a regular file, and the file's whole size."""
        # O_NONBLOCK: opening a FIFO of the guest must not wait for a writer.
        with self._fd(path, os.O_RDONLY | os.O_NONBLOCK) as fd:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GuestError(f"{path} in the guest is not a regular file")
            return os.pread(fd, size, 0), st.st_size

    def read_text(self, path: str) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", errors="surrogateescape")

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """``mkdir -p`` inside the guest: each missing directory made in its parent as resolved
        in the guest, so a symlinked component still cannot lead outside."""
        done = "/"
        for part in _norm(path).strip("/").split("/"):
            if not part:
                continue
            with self._fd(done, os.O_PATH | os.O_DIRECTORY) as fd:
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
            done = posixpath.join(done, part)
        if not self.is_dir(path):
            raise GuestError(f"{path} in the guest is not a directory")

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(_norm(path))
        if parent != "/" and not self.is_dir(parent):
            self.makedirs(parent)

    def write_text(self, path: str, text: str, mode: int = 0o644) -> None:
        """Replace the content in place (same inode, owner, mode); create the file (and its
        missing directories) if missing."""
        data = text.encode("utf-8", errors="surrogateescape")
        self._parents(path)
        with self._fd(path, os.O_WRONLY | os.O_CREAT, mode) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GuestError(f"{path} in the guest is not a regular file")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)

    def edit(
        self, path: str, change: Callable[[str], str], *, redact: Callable[[str], str] | None = None
    ) -> str:
        """Apply ``change`` to the file's text; return the unified diff ('' when unchanged).
        ``redact`` hides secrets in the diff (the file gets the real text)."""
        old = self.read_text(path)
        if old is None:
            raise GuestError(f"the guest has no {path}")
        new = change(old)
        if new == old:
            return ""
        self.write_text(path, new)
        show = redact or (lambda t: t)
        return unified_diff(path, show(old), show(new), self.realpath(path))

    def truncate(self, path: str) -> int:
        """Empty a regular file (owner and mode stay); return the bytes removed. A symlink is
        left alone: truncating through it would empty whatever it points at."""
        st = self.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            return 0
        with self._fd(path, os.O_WRONLY | os.O_NOFOLLOW) as fd:
            os.ftruncate(fd, 0)
        return st.st_size

    def remove(self, path: str) -> Removed | None:
        """Remove a file, symlink or whole directory tree, never following a symlink."""
        st = self.lstat(path)
        if st is None:
            return None
        with self._parent(path) as (fd, name):
            if stat.S_ISDIR(st.st_mode):
                size = _remove_tree(fd, name)
                return Removed(path, size, "directory")
            os.unlink(name, dir_fd=fd)
        kind = "file" if stat.S_ISREG(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "other"
        return Removed(path, st.st_size if kind == "file" else 0, kind)

    def remove_contents(self, path: str) -> list[Removed]:
        """Empty a directory, keeping the directory itself (its owner and mode)."""
        st = self.lstat(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return []
        return [r for name in self.listdir(path) if (r := self.remove(posixpath.join(path, name)))]

    def symlink(self, target: str, path: str) -> None:
        self._parents(path)
        with self._parent(path) as (fd, name):
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            os.symlink(target, name, dir_fd=fd)


def _remove_tree(parent_fd: int, name: str) -> int:
    size = 0
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        for entry in os.scandir(fd):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                size += _remove_tree(fd, entry.name)
            else:
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
    return size


def unified_diff(path: str, old: str, new: str, real: str | None = None) -> str:
    label = path if real in (None, path) else f"{path} (-> {real})"
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a{label}", f"b{label}"
        )
    )


def is_enoent(e: OSError) -> bool:
    return e.errno in (errno.ENOENT, errno.ENOTDIR)
