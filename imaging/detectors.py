"""The secret detectors: Yelp's ``detect-secrets`` (keyword, entropy and its provider plugins: AWS,
Azure, GitHub, GitLab, Slack, Stripe, JWT, private keys, basic auth in URLs, npm, PyPI, OpenAI,
...), driven line by line on the lines a cheap first pass says one of its plugins could match.

Used by the secret scan (:mod:`imaging.guest.secret_scan`) and by :func:`redact`, which every
diff a stage records goes through (:func:`imaging.disk.files.unified_diff`): a password in an
fstab line that 20-migrate edits must not reach the record by way of the diff.

detect-secrets picks its keyword patterns by file extension; a system's files mostly have none,
and are read as configuration files (``name = value`` counts, not only quoted values).
"""

from __future__ import annotations

import atexit
import bisect
import functools
import re
from collections.abc import Iterator
from typing import Any

# Lines longer than this are cut, around each place the first pass matched, into windows this
# long: detect-secrets' patterns then run on bounded text, whatever a minified file holds.
WINDOW = 4096
# What detect-secrets flags that is not a secret in a system image.
_PLUGINS_LEFT_OUT = {"IPPublicDetector"}
# Public material between these markers is not scanned (certificates, public keys).
_PUBLIC_BLOCK = re.compile(
    rb"^-----BEGIN (CERTIFICATE|PUBLIC KEY|RSA PUBLIC KEY|PGP PUBLIC KEY BLOCK|X509 CRL|CERTIFICATE REQUEST)-----\r?$"
    rb".*?^-----END \1-----\r?$",
    re.M | re.S,
)
# Values a keyword detector finds that are settings, not secrets (passwd: files, lock_passwd:
# true, PASS_MIN_LEN 5).
_NOT_SECRETS = re.compile(
    r"(?i)^(true|false|yes|no|on|off|none|null|nil|all|files|compat|sss|systemd|required|optional|"
    r"sufficient|\*+|x|!+|[0-9]{1,5}|<[^>]*>|\$\{?[a-z_][a-z0-9_]*\}?|%\(?[a-z_]+\)?s?|\{\{.*\}\})$"
)

_COMMENT = ("#", ";", "//", "--", "/*", "* ", "!")


class Detectors:
    """detect-secrets' plugins and filters, and the first pass over a file's bytes. Its
    settings are detect-secrets' global ones while it is open."""

    def __init__(self) -> None:
        from detect_secrets.core import scan as ds_scan
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.plugins import keyword
        from detect_secrets.settings import get_plugins, transient_settings
        from detect_secrets.util.code_snippet import get_code_snippet

        self._scan, self._snippet = ds_scan, get_code_snippet
        mapping: dict[str, type] = get_mapping_from_secret_type_to_class()
        names = [c.__name__ for c in mapping.values() if c.__name__ not in _PLUGINS_LEFT_OUT]
        self._settings = transient_settings({"plugins_used": [{"name": n} for n in names]})
        self._settings.__enter__()
        self.plugins = list(get_plugins())
        # Each plugin's first pass, on the file's bytes at once (most files have no hit, and are
        # then never decoded): its own patterns (anchored per line), the keyword list for the
        # keyword detector (on the lower-cased bytes: as fast as a plain search), and for the
        # entropy detectors a quoted string long enough to reach their limits (4.5 bits a
        # character in base64 needs 23 characters; hex strings under 16 are not keys).
        self.gates: list[tuple[re.Pattern[bytes], Any, bool]] = []
        for plugin in self.plugins:
            patterns = getattr(type(plugin), "denylist", None)
            if type(plugin).__name__ == "KeywordDetector":
                words = "|".join(keyword.DENYLIST).encode()
                self.gates.append((re.compile(words), plugin, True))
            elif isinstance(patterns, list | tuple):
                self.gates += [(re.compile(_loosened(p.pattern), p.flags & ~re.U | re.M), plugin, False)
                               for p in patterns]  # fmt: skip
            elif isinstance(getattr(plugin, "regex", None), re.Pattern):
                least = 20 if "Base64" in type(plugin).__name__ else 16
                pattern = plugin.regex.pattern.replace("]+)", f"]{{{least},}})")
                self.gates.append((re.compile(pattern.encode()), plugin, False))

    def close(self) -> None:
        self._settings.__exit__(None, None, None)

    def lines(self, data: bytes) -> list[tuple[int, str, list[Any]]]:
        """(line number, text to scan, the plugins whose first pass hit it): each line hit, a
        long one as the window around each hit; nothing inside a certificate or public key."""
        public = [(m.start(), m.end()) for m in _PUBLIC_BLOCK.finditer(data)]
        public_starts = [a for a, _ in public]
        starts: list[int] | None = None
        lower = data.lower()  # ASCII only: the offsets stay the same
        hit: dict[tuple[int, int], tuple[int, list[Any]]] = {}
        for gate, plugin, on_lower in self.gates:
            for m in gate.finditer(lower if on_lower else data):
                at = m.start()
                block = bisect.bisect_right(public_starts, at) - 1
                if block >= 0 and at < public[block][1]:
                    continue
                if starts is None:
                    starts = [0, *(m.end() for m in re.finditer(b"\n", data))]
                n = bisect.bisect_right(starts, at) - 1
                begin = starts[n]
                end = starts[n + 1] - 1 if n + 1 < len(starts) else len(data)
                if end - begin > WINDOW:
                    begin = max(begin, at - WINDOW // 2)
                    end = min(end, begin + WINDOW)
                _, plugins = hit.setdefault((n, begin), (end, []))
                if plugin not in plugins:
                    plugins.append(plugin)
        return [(n + 1, data[begin:end].decode("utf-8", "replace"), plugins)
                for (n, begin), (end, plugins) in sorted(hit.items())]  # fmt: skip

    def scan(self, name: str, data: bytes) -> Iterator[tuple[int, str, str]]:
        """(line, detector, value) for what detect-secrets finds in a file's ``data``; ``name``
        chooses its keyword patterns (by extension)."""
        hits = self.lines(data)
        if not hits:
            return
        lines = data.decode("utf-8", "replace").split("\n")  # numbered as the first pass counts
        s = self._scan
        for number, line, plugins in hits:
            line = line.rstrip()
            context = self._snippet(lines=lines, line_number=number) if len(lines) >= number else None
            if context is None or s._is_filtered_out(
                required_filter_parameters=["line"], filename=name, line=line, context=context
            ):
                continue
            comment = line.lstrip().startswith(_COMMENT)
            for plugin in plugins:
                if comment and type(plugin).__name__ == "KeywordDetector":
                    continue  # a commented-out example ("# password = secret"); providers' keys still count
                for secret in s._scan_line(
                    plugin=plugin, filename=name, line=line, line_number=number, context=context
                ):
                    value = secret.secret_value or ""
                    bare = value.split(" #")[0].strip(" ;,\"'")
                    if " " in bare and secret.type == "Secret Keyword":
                        # Shell's NAME=value before a command keeps its first word; other words
                        # are settings, not secrets ("passwd: files systemd", "= A challenge password").
                        bare = value = bare.split()[0] if f"={bare.split()[0]}" in line else ""
                    if not bare or _NOT_SECRETS.match(bare) or s._is_filtered_out(
                        required_filter_parameters=["context"], filename=name, secret=value,
                        plugin=plugin, line=line, context=context,
                    ):  # fmt: skip
                        continue
                    yield number, secret.type, value


# What detect-secrets' provider patterns start with that matches no character: a word boundary
# by lookbehind, an optional bracket and quote. A first pass without them finds a superset of
# the lines and runs several times faster (the engine can skip ahead to a literal).
_ZERO_WIDTH_START = ("(?:(?<=\\W)|(?<=^))", "(?:\\[|)(?:\"|\\'|)")


def _loosened(pattern: str) -> bytes:
    for prefix in _ZERO_WIDTH_START:
        pattern = pattern.removeprefix(prefix)
    return pattern.encode()


def as_config(path: str) -> str:
    """The name detect-secrets sees: the file's own when its extension names a language or
    format it knows; otherwise the same name as a configuration file."""
    from detect_secrets.util.filetype import FileType, determine_file_type

    return path if determine_file_type(path) is not FileType.OTHER else path + ".conf"


@functools.cache
def _shared() -> Detectors:
    """Loaded once a process (its plugins take a fifth of a second), closed before the
    interpreter's teardown, which would otherwise close detect-secrets' settings too late."""
    detectors = Detectors()
    atexit.register(detectors.close)
    return detectors


def redact(text: str, name: str = "") -> str:
    """``text`` with each value the detectors find replaced by ``<secret: detector>``; ``name``
    (a guest path) chooses the keyword patterns, as for a scan."""
    found = list(_shared().scan(as_config(name or "/text"), text.encode("utf-8", "surrogateescape")))
    if not found:
        return text
    lines = text.split("\n")
    for number, detector, value in found:
        if value and 0 < number <= len(lines):
            lines[number - 1] = lines[number - 1].replace(value, f"<secret: {detector}>")
    return "\n".join(lines)
