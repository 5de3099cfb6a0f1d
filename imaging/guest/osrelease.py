"""What a guest says it is: ``/etc/os-release`` (ID, VERSION_ID, ID_LIKE), or for the releases
before it (CentOS 5 and 6, RHEL 6) the first line of ``/etc/redhat-release`` or
``/etc/system-release``.

Every value is the guest's text, so each is cut to the characters its field may hold before it
reaches a profile match, a record or a message: an image cannot put markup, newlines or another
field into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imaging.disk.files import Guest

# os-release(5): /etc/os-release, else /usr/lib/os-release (where /etc's usually links to).
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
RELEASE_FILES = ("/etc/redhat-release", "/etc/system-release")
_ID = re.compile(r"[a-z0-9._-]{1,40}")
_VERSION = re.compile(r"[A-Za-z0-9._~-]{1,40}")


@dataclass(frozen=True)
class OsInfo:
    id: str = ""  # "" when the guest has no os-release (or no usable ID in it)
    version: str = ""  # VERSION_ID, "" when absent (Debian testing, Arch)
    like: list[str] = field(default_factory=list)  # ID_LIKE, the closest first
    name: str = ""  # PRETTY_NAME, or the release file's first line

    def __str__(self) -> str:
        """``Rocky Linux 8.9 (Green Obsidian) (rocky 8.9)``: the guest's name and its ids."""
        ids = " ".join(w for w in (self.id, self.version) if w)
        if self.name and ids:
            return f"{self.name} ({ids})"
        return self.name or ids or "a guest with no os-release"


def _text(g: Guest, path: str) -> str:
    # A file larger than a guest file may be read is refused by name (read_text's one line):
    # taken for no os-release, a hostile one would turn into "no profile knows this guest".
    return (g.read_text(path) or "") if g.is_file(path) else ""


def _printable(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ._()/+-]", "", text)[:60].strip()


def fields(text: str) -> dict[str, str]:
    """KEY=value lines, the value unquoted (double, single or no quotes) as the shell would."""
    found = {}
    for key, value in re.findall(r"^([A-Z_]+)=(.*)$", text, re.MULTILINE):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        found[key] = value
    return found


def read(g: Guest) -> OsInfo:
    text = next((t for t in (_text(g, p) for p in OS_RELEASE) if t), "")
    f = fields(text)
    ident = f.get("ID", "").lower()
    version = f.get("VERSION_ID", "")
    like = [w for w in f.get("ID_LIKE", "").lower().split() if _ID.fullmatch(w)]
    name = _printable(f.get("PRETTY_NAME", "") or f.get("NAME", ""))
    if not name:
        release = next((t for t in (_text(g, p) for p in RELEASE_FILES) if t.strip()), "")
        name = _printable(release.strip().splitlines()[0]) if release.strip() else ""
    return OsInfo(
        ident if _ID.fullmatch(ident) else "",
        version if _VERSION.fullmatch(version) else "",
        like[:8],
        name,
    )


def version_key(version: str) -> tuple[int, ...]:
    """``15.5`` -> (15, 5); the numbers of a version, for "the nearest known one below"."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:4])


def known(version: str, versions: list[str]) -> bool:
    """Whether a VERSION_ID is one listed: ``9`` takes ``9`` and ``9.4``, not ``90``; an empty
    list takes every version (a rolling release)."""
    return not versions or any(version == v or version.startswith(v + ".") for v in versions)
