"""Read and write files of an ext2/3/4 guest through debugfs, without mounting it.

debugfs resolves every path inside the image (an absolute symlink in the guest points at the
guest's own root, never the host's), runs in user space, and needs no root. It is what the
bootable stage uses to list /boot and to install GRUB's files; paths given to it are restricted
to plain characters so that a request is never misparsed by debugfs's own command parser.
"""

from __future__ import annotations

import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.disk import ext
from imaging.errors import GuestError
from imaging.records import human_bytes

# What read_text reads of a guest file: configuration files are KiB; a hostile grub.cfg or
# os-release can be a 1 TiB sparse file that debugfs would stream whole.
READ_LIMIT = 8 << 20
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@-]+$")


def safe_name(name: str) -> bool:
    """A file name we are willing to put into a debugfs request or a grub.cfg."""
    return bool(_SAFE_NAME.fullmatch(name)) and name not in (".", "..")


def _check(path: str) -> str:
    if not _SAFE_PATH.fullmatch(path) or "/../" in f"{path}/" or "//" in path:
        raise GuestError(f"refusing guest path {path!r}: only plain absolute paths are used")
    return path


@dataclass(frozen=True)
class Entry:
    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def parse_ls(text: str) -> list[Entry]:
    """Parse ``ls -p`` output: one ``/inode/mode/uid/gid/name/size/`` per entry."""
    entries = []
    for line in text.splitlines():
        fields = line.split("/")
        # A name with a newline or other oddities breaks the format: such entries are skipped.
        if len(fields) != 8 or fields[0] or fields[7]:
            continue
        _, ino, mode, uid, gid, name, size, _ = fields
        if name in (".", "..") or not (ino.isdigit() and uid.isdigit() and gid.isdigit()):
            continue
        try:
            entries.append(Entry(name, int(ino), int(mode, 8), int(uid), int(gid), int(size or 0)))
        except ValueError:
            continue
    return entries


class ExtGuest:
    """The ext filesystem that starts ``offset`` bytes into ``image``."""

    def __init__(self, image: Path, offset: int = 0) -> None:
        self.image = image
        self.offset = offset
        self.device = ext.device(image, offset)

    def _request(self, request: str, max_output: int = tools.MAX_OUTPUT) -> tools.CommandResult:
        return tools.run(["debugfs", "-R", request, self.device], timeout=300, max_output=max_output)

    def exists(self, path: str) -> bool:
        result = self._request(f"stat {_check(path)}")
        return "not found" not in result.stderr and bool(result.stdout.strip())

    def listdir(self, path: str) -> list[Entry]:
        result = self._request(f"ls -p {_check(path)}")
        if "not found" in result.stderr:
            raise GuestError(f"the guest has no {path}")
        return parse_ls(result.stdout)

    entries = listdir  # what filesystems.MountedFiles calls it

    def _regular(self, path: str, limit: int) -> bool:
        """Whether ``path`` is a regular file (a symlink, FIFO or device is not followed or read);
        one over ``limit`` is refused by name."""
        found = self._request(f"stat {_check(path)}").stdout
        kind = re.search(r"\bType: (\S+)", found)
        size = re.search(r"\bSize: (\d+)", found)
        if kind is None or kind.group(1) != "regular" or size is None:
            return False
        if int(size.group(1)) > limit:
            raise GuestError(
                f"{path} in the guest is {human_bytes(int(size.group(1)))}: more than the "
                f"{human_bytes(limit)} read from a guest file: refused"
            )
        return True

    def read_text(self, path: str) -> str | None:
        """The file's text, or None if there is no such regular file; a file over READ_LIMIT is
        refused by name."""
        if not self._regular(path, READ_LIMIT):
            return None
        return self._request(f"cat {path}", max_output=READ_LIMIT).stdout

    def read_bytes(self, path: str, limit: int) -> bytes | None:
        """The bytes of a regular file (None if there is none), dumped by debugfs into a private
        scratch file; one over ``limit`` is refused by name."""
        if not self._regular(path, limit):
            return None
        with tempfile.TemporaryDirectory(prefix="debugfs-") as tmp:
            out = Path(tmp) / "file"
            self._request(f"dump {path} {out}")
            return out.read_bytes() if out.is_file() else None

    def install_files(self, files: dict[str, bytes], directories: list[str]) -> None:
        """Create ``directories`` (if missing) and write ``files`` (replacing any old ones), all
        owned by root, in one debugfs session; then read each file back to prove it landed."""
        with tempfile.TemporaryDirectory(prefix="debugfs-") as tmp:
            script: list[str] = []
            existing: dict[str, set[str]] = {}

            def names_in(directory: str) -> set[str]:
                if directory not in existing:
                    try:
                        existing[directory] = {e.name for e in self.listdir(directory or "/")}
                    except GuestError:  # created earlier in this same script
                        existing[directory] = set()
                return existing[directory]

            for d in directories:
                parent, _, name = _check(d).rpartition("/")
                if name not in names_in(parent):
                    script.append(f"mkdir {d}")
            for i, (path, data) in enumerate(sorted(files.items())):
                parent, _, name = _check(path).rpartition("/")
                host = Path(tmp) / f"f{i}"
                host.write_bytes(data)
                if name in names_in(parent):
                    script.append(f"rm {path}")
                script += [
                    f"write {host} {path}",
                    f"sif {path} mode 0100644",
                    f"sif {path} uid 0",
                    f"sif {path} gid 0",
                ]
            cmds = Path(tmp) / "commands"
            cmds.write_text("\n".join(script) + "\n")
            result = tools.run(["debugfs", "-w", "-f", cmds, self.device], timeout=600)
        # debugfs reports failed requests on stderr but exits 0.
        errors = [
            line for line in result.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")
        ]
        if errors:
            raise GuestError(f"debugfs could not write into the guest: {errors[0]}")
        for path, data in files.items():
            if path.endswith(".cfg") and self.read_text(path) != data.decode():
                raise GuestError(f"{path} did not read back as written")
