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

import contextlib
import ctypes
import difflib
import errno
import fnmatch
import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imaging import detectors
from imaging.errors import GuestError
from imaging.records import human_bytes

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share it
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_LIBC = ctypes.CDLL(None, use_errno=True)

# What a guest file read whole may hold: configuration files and module indexes are KiB, a few
# MiB at most; a hostile /etc/os-release can be a 1 TiB sparse file.
CONFIG_LIMIT = 8 << 20
# How deep a directory tree we walk or remove: real trees stop at a few dozen levels; a hostile
# one thousands of levels deep would otherwise exhaust the stack or the file descriptors.
MAX_DEPTH = 256
# Errors that mean a path cannot be followed inside the guest (a symlink loop, a path longer
# than the kernel resolves): it is skipped, with a line in the record, like a missing file.
_UNREACHABLE = {errno.ELOOP: "a symlink loop", errno.ENAMETOOLONG: "a path too long to resolve"}
_SKIPPED_KEPT = 100
# openat2 returns EAGAIN when a rename or mount elsewhere raced its ".." step. Under a continuous
# rename storm (three processes renaming in a loop on this 2-core box) 6-10 % of opens through
# Debian's mail symlink needed a retry, and none more than two.
_EAGAIN_TRIES = 200


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


def kind(mode: int) -> str:
    """What a file is, in words (for errors that name what was refused)."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


class Guest:
    """A guest filesystem mounted at ``root``.

    Paths the guest's own links make unreachable (loops, paths too long) read as missing; each
    one is noted in :attr:`skipped` for the stage's record."""

    def __init__(self, root: Path, *, mounts_inside: bool = False) -> None:
        """``mounts_inside``: the guest's own filesystems are mounted under ``root`` (a btrfs
        guest's /home subvolume) and paths may cross into them; otherwise no path crosses a mount."""
        self.root = root
        self._resolve = (
            _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | (0 if mounts_inside else _RESOLVE_NO_XDEV)
        )
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        self.skipped: list[str] = []

    def _unreachable(self, path: str, e: OSError) -> bool:
        """True (and noted) when ``e`` says ``path`` cannot be followed inside the guest."""
        why = _UNREACHABLE.get(e.errno or 0)
        if why is None:
            return False
        line = f"{path}: {why} in the guest, skipped"
        if line not in self.skipped and len(self.skipped) < _SKIPPED_KEPT:
            self.skipped.append(line)
        return True

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
                       self._resolve)  # fmt: skip
        rel = _norm(path).lstrip("/").encode() or b"."
        for attempt in range(_EAGAIN_TRIES):
            fd = _LIBC.syscall(_SYS_OPENAT2, self._root_fd, rel, ctypes.byref(how), ctypes.sizeof(how))
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                break
            # A rename or mount anywhere on the host while the kernel walked a ".." (Debian's
            # /var/spool/mail -> ../mail) makes it refuse rather than risk an escape; the
            # man page says to retry. Yield so a storm of renames gets to pass.
            if attempt >= 8:
                time.sleep(0.001)
        raise OSError(err, os.strerror(err), path)

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
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if self._unreachable(path, e):
                return None
            raise

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
        except OSError as e:
            if self._unreachable(path, e):
                return _norm(path)
            raise
        relative = os.path.relpath(host, os.path.realpath(self.root))
        # "." is the root itself; a name at the top may start with a dot (openSUSE's /.snapshots).
        return "/" if relative == "." else "/" + relative

    def listdir(self, path: str) -> list[str]:
        try:
            with self._fd(path, os.O_RDONLY | os.O_DIRECTORY) as fd:
                return sorted(os.listdir(fd))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            if self._unreachable(path, e):
                return []
            raise

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

    def _open_regular(self, path: str, flags: int) -> int:
        """Open ``path`` only if it leads to a regular file: looked at first (O_PATH opens
        anything without touching it), then opened through that very descriptor. A FIFO,
        device or socket is refused by name, never opened (a FIFO would block, a device on a
        nodev mount would fail with the kernel's words, a socket cannot be opened at all)."""
        look = self._open(path, os.O_PATH)
        try:
            mode = os.fstat(look).st_mode
            if not stat.S_ISREG(mode):
                raise GuestError(f"{path} in the guest is {kind(mode)}, not a regular file: refused")
            return os.open(f"/proc/self/fd/{look}", flags | os.O_CLOEXEC)
        finally:
            os.close(look)

    def read_bytes(self, path: str, limit: int = CONFIG_LIMIT) -> bytes | None:
        """The whole file, or None when there is none; a FIFO, device or socket, or a file
        larger than ``limit``, is refused by name (never opened, never read past the limit)."""
        try:
            fd = self._open_regular(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if self._unreachable(path, e):
                return None
            raise
        try:
            _check_size(path, os.fstat(fd).st_size, limit)
            chunks, size = [], 0
            while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:  # it grew while we read
                    _check_size(path, size, limit)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_dir(self, path: str) -> int:
        """A file descriptor of a directory (for walking it); the caller closes it."""
        return self._open(path, os.O_RDONLY | os.O_DIRECTORY)

    def open_file(self, path: str) -> int:
        """A file descriptor of a regular file (for streaming a large one); the caller closes it."""
        return self._open_regular(path, os.O_RDONLY)

    def read_head(self, path: str, size: int) -> tuple[bytes, int]:
        """The first ``size`` bytes of a regular file, and the file's whole size."""
        fd = self.open_file(path)  # a FIFO, device or socket is refused without waiting
        try:
            return os.pread(fd, size, 0), os.fstat(fd).st_size
        finally:
            os.close(fd)

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
        missing directories) if missing. A file with other hard links gets a new inode with
        the same owner, mode and xattrs instead: the other names keep their bytes."""
        self.write_bytes(path, text.encode("utf-8", errors="surrogateescape"), mode)

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """As :meth:`write_text`, for bytes."""
        self._parents(path)
        try:
            fd = self._open_regular(path, os.O_WRONLY)
        except FileNotFoundError:
            fd = self._open(path, os.O_WRONLY | os.O_CREAT, mode)  # through a dangling guest link too
        try:
            st = os.fstat(fd)
            if st.st_nlink <= 1:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            else:
                self._replace(self.realpath(path), fd, data)
        finally:
            os.close(fd)

    def _replace(self, real: str, old_fd: int, data: bytes) -> None:
        """Give ``real`` (a hard-linked file, open as ``old_fd``) a new inode holding ``data``."""
        st = os.fstat(old_fd)
        with self._parent(real) as (dir_fd, name):
            tmp = f".{name[:200]}.imaging-part"
            new = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            try:
                try:
                    for attr in os.listxattr(old_fd):  # SELinux labels and ACLs stay
                        os.setxattr(new, attr, os.getxattr(old_fd, attr))
                    os.fchown(new, st.st_uid, st.st_gid)
                    os.fchmod(new, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid bits
                    os.pwrite(new, data, 0)
                finally:
                    os.close(new)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise

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
        with self._fd(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK) as fd:
            if st.st_nlink > 1:  # the other names keep their bytes
                self._replace(path, fd, b"")
            else:
                os.ftruncate(fd, 0)
        return st.st_size

    def remove(self, path: str) -> Removed | None:
        """Remove a file, symlink or whole directory tree, never following a symlink."""
        st = self.lstat(path)
        if st is None:
            return None
        with self._parent(path) as (fd, name):
            if stat.S_ISDIR(st.st_mode):
                size = _remove_tree(fd, name, path)
                return Removed(path, size, "directory")
            os.unlink(name, dir_fd=fd)
        kind = "file" if stat.S_ISREG(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "other"
        return Removed(path, st.st_size if kind == "file" else 0, kind)

    def tree_bytes(self, path: str) -> int:
        """The bytes of the regular files under a directory (0 when it is none)."""
        st = self.lstat(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return 0
        with self._parent(path) as (fd, name):
            return tree_bytes(fd, name, path)

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


def _walk(
    parent_fd: int,
    name: str,
    path: str,
    visit_file: Callable[[int, str, os.stat_result], None],
    leave_dir: Callable[[int, str], None] | None = None,
) -> None:
    """Depth-first over a directory tree, never following a symlink, one open directory per
    level (each listed once): ``visit_file(dir_fd, name, st)`` for every non-directory,
    ``leave_dir(parent_fd, name)`` after a directory's contents. A tree deeper than MAX_DEPTH
    is refused by name."""
    top = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    stack: list[tuple[int, str, list[tuple[str, os.stat_result]]]] = [(top, name, _entries(top))]
    try:
        while stack:
            fd, dname, entries = stack[-1]
            if not entries:
                stack.pop()
                os.close(fd)
                if leave_dir is not None:
                    leave_dir(stack[-1][0] if stack else parent_fd, dname)
                continue
            entry, st = entries.pop()
            if not stat.S_ISDIR(st.st_mode):
                visit_file(fd, entry, st)
                continue
            if len(stack) >= MAX_DEPTH:
                raise GuestError(
                    f"{path} in the guest is more than {MAX_DEPTH} directories deep: refused "
                    "(no real system nests so deep; remove it from the image first)"
                )
            child = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            stack.append((child, entry, _entries(child)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _entries(fd: int) -> list[tuple[str, os.stat_result]]:
    with os.scandir(fd) as it:
        return [(e.name, e.stat(follow_symlinks=False)) for e in it]


def _remove_tree(parent_fd: int, name: str, path: str) -> int:
    """Remove a directory tree; return its files' bytes. Its depth is checked before anything
    goes, so a refused tree is left whole."""
    _walk(parent_fd, name, path, lambda fd, n, st: None)
    size = 0

    def unlink(fd: int, entry: str, st: os.stat_result) -> None:
        nonlocal size
        size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        os.unlink(entry, dir_fd=fd)

    _walk(parent_fd, name, path, unlink, lambda fd, d: os.rmdir(d, dir_fd=fd))
    return size


def tree_bytes(parent_fd: int, name: str, path: str) -> int:
    """The bytes of the regular files under a directory."""
    size = 0

    def add(fd: int, entry: str, st: os.stat_result) -> None:
        nonlocal size
        size += st.st_size if stat.S_ISREG(st.st_mode) else 0

    _walk(parent_fd, name, path, add)
    return size


def _check_size(path: str, size: int, limit: int) -> None:
    if size > limit:
        raise GuestError(
            f"{path} in the guest is {human_bytes(size)}: more than the {human_bytes(limit)} read from a "
            "guest file: refused"
        )


def unified_diff(path: str, old: str, new: str, real: str | None = None) -> str:
    """The diff of an edit, for the record: with every secret's value in it redacted (a password
    on an fstab line the edit touched stays in the guest, never in a notebook)."""
    label = path if real in (None, path) else f"{path} (-> {real})"
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a{label}", f"b{label}"
        )
    )
    return detectors.redact(diff, path) if diff else diff


def is_enoent(e: OSError) -> bool:
    return e.errno in (errno.ENOENT, errno.ENOTDIR)
