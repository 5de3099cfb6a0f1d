"""The file-shape rules no text scanner has: a private key by its header (and whether it has a
passphrase), and credential files known by their path (``.netrc``, ``.pgpass``,
``.git-credentials``, Docker's and kubectl's configs, gcloud's and the Azure CLI's token stores,
a Jupyter server's runtime file, WordPress's ``wp-config.php``).

Each rule gives :class:`Hit` rows: the line (0 for the whole file), the detector's name, and the
value the fingerprint is made of. The value never leaves the scan (secret_scan.py keeps only
its keyed digest).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    line: int
    detector: str
    value: str


_PEM_KEY = re.compile(
    rb"^-----BEGIN ((?:RSA |DSA |EC |OPENSSH |ENCRYPTED |ANY |PGP )?PRIVATE KEY(?: BLOCK)?)-----\r?\n"
    rb"(.*?)^-----END \1-----",
    re.M | re.S,
)


def private_keys(text: bytes) -> Iterator[Hit]:
    """Each PEM or OpenSSH private key in the file, by its header; one without a passphrase
    says so (an OpenSSH key's cipher is "none"; a PEM key not marked ENCRYPTED)."""
    for m in _PEM_KEY.finditer(text):
        kind, body = m.group(1).decode(), m.group(2)
        line = text.count(b"\n", 0, m.start()) + 1
        if kind == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in body:
            encrypted = True
        elif kind == "OPENSSH PRIVATE KEY":
            encrypted = _openssh_cipher(body) not in ("none", None)
        elif kind == "PGP PRIVATE KEY BLOCK":
            encrypted = True  # an exported secret key carries its own protection; unknown here
        else:
            encrypted = False
        detector = "private key" if encrypted else "private key without passphrase"
        yield Hit(line, detector, body.decode("ascii", "replace"))


def _openssh_cipher(body: bytes) -> str | None:
    """The cipher name of an ``openssh-key-v1`` blob (PROTOCOL.key): "none" when unprotected."""
    try:
        blob = base64.b64decode(b"".join(body.split()), validate=False)
    except (binascii.Error, ValueError):
        return None
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic) or len(blob) < len(magic) + 4:
        return None
    size = int.from_bytes(blob[len(magic) : len(magic) + 4], "big")
    return blob[len(magic) + 4 : len(magic) + 4 + size].decode("ascii", "replace")


def _lines(text: bytes) -> Iterator[tuple[int, str]]:
    yield from enumerate(text.decode("utf-8", "replace").splitlines(), 1)


def _netrc(text: bytes) -> Iterator[Hit]:
    for n, line in _lines(text):
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word in ("password", "account") and not line.lstrip().startswith("#"):
                yield Hit(n, "netrc password", words[i + 1])


def _pgpass(text: bytes) -> Iterator[Hit]:
    for n, line in _lines(text):
        # host:port:database:user:password, with \: escaping a colon
        fields = re.split(r"(?<!\\):", line)
        if not line.startswith("#") and len(fields) == 5 and fields[4] and fields[4] != "*":
            yield Hit(n, "pgpass password", fields[4])


_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s@/]+)@", re.I)


def _url_passwords(detector: str) -> Callable[[bytes], Iterator[Hit]]:
    def rule(text: bytes) -> Iterator[Hit]:
        for n, line in _lines(text):
            for m in _URL_PASSWORD.finditer(line):
                yield Hit(n, detector, m.group(1))

    return rule


def _json_values(*keys: str, detector: str) -> Callable[[bytes], Iterator[Hit]]:
    """Non-empty string values of ``keys`` anywhere in a JSON file, on the line they are on."""
    wanted = set(keys)

    def rule(text: bytes) -> Iterator[Hit]:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return
        found: list[str] = []
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for k, v in item.items():
                    if k in wanted and isinstance(v, str) and v:
                        found.append(v)
                    elif isinstance(v, dict | list):
                        stack.append(v)
            elif isinstance(item, list):
                stack.extend(v for v in item if isinstance(v, dict | list))
        decoded = text.decode("utf-8", "replace")
        for value in found:
            at = decoded.find(json.dumps(value)[1:-1])
            yield Hit(decoded.count("\n", 0, at) + 1 if at >= 0 else 0, detector, value)

    return rule


_YAML_KEY = re.compile(
    r"^\s*(client-key-data|token|password|auth-provider-token|id-token|refresh-token)\s*:\s*(\S.*)$"
)


def _kubeconfig(text: bytes) -> Iterator[Hit]:
    for n, line in _lines(text):
        m = _YAML_KEY.match(line)
        if m and m.group(2).strip("'\"") not in ("", "null", "~"):
            yield Hit(n, f"kubeconfig {m.group(1)}", m.group(2).strip("'\""))


_WP_DEFINE = re.compile(
    r"define\(\s*['\"](DB_PASSWORD|(?:SECURE_)?AUTH_KEY|LOGGED_IN_KEY|NONCE_KEY|(?:SECURE_)?AUTH_SALT|"
    r"LOGGED_IN_SALT|NONCE_SALT)['\"]\s*,\s*['\"]([^'\"]+)['\"]"
)


def _wp_config(text: bytes) -> Iterator[Hit]:
    for n, line in _lines(text):
        m = _WP_DEFINE.search(line)
        if m and m.group(2) != "put your unique phrase here":
            yield Hit(n, f"wp-config {m.group(1)}", m.group(2))


def _whole_file(detector: str) -> Callable[[bytes], Iterator[Hit]]:
    """A credential store whose every byte is the secret (a token database, a vault token)."""

    def rule(text: bytes) -> Iterator[Hit]:
        if text.strip():
            yield Hit(0, detector, text.decode("latin-1"))

    return rule


_AWS_KEY = re.compile(r"^\s*(aws_secret_access_key|aws_session_token)\s*=\s*(\S+)", re.I)


def _aws_credentials(text: bytes) -> Iterator[Hit]:
    for n, line in _lines(text):
        m = _AWS_KEY.match(line)
        if m:
            yield Hit(n, f"AWS {m.group(1).lower()}", m.group(2))


# (pattern on the guest path, rule): fnmatch patterns, "*" crossing "/" as fnmatch does.
PATH_RULES: tuple[tuple[str, Callable[[bytes], Iterator[Hit]]], ...] = (
    ("*/.netrc", _netrc),
    ("*/_netrc", _netrc),
    ("/etc/apt/auth.conf", _netrc),  # apt's credentials for a private mirror, in netrc's format
    ("/etc/apt/auth.conf.d/*", _netrc),
    ("*/.pgpass", _pgpass),
    ("*/.git-credentials", _url_passwords("git credential")),
    (
        "*/.docker/config.json",
        _json_values("auth", "identitytoken", "registrytoken", detector="docker registry auth"),
    ),
    ("*/.kube/config", _kubeconfig),
    ("/etc/kubernetes/*.conf", _kubeconfig),
    ("*/.config/gcloud/credentials.db", _whole_file("gcloud credential store")),
    ("*/.config/gcloud/access_tokens.db", _whole_file("gcloud access tokens")),
    (
        "*/.config/gcloud/legacy_credentials/*",
        _json_values("client_secret", "refresh_token", "private_key", detector="gcloud credentials"),
    ),  # fmt: skip
    (
        "*/.config/gcloud/application_default_credentials.json",
        _json_values("client_secret", "refresh_token", "private_key", detector="gcloud credentials"),
    ),  # fmt: skip
    ("*/.azure/msal_token_cache.*", _whole_file("Azure CLI token cache")),
    ("*/.azure/accessTokens.json", _whole_file("Azure CLI token cache")),
    ("*/.vault-token", _whole_file("Vault token")),
    ("*/.aws/credentials", _aws_credentials),
    ("*/jupyter/runtime/*.json", _json_values("token", "key", "password", detector="Jupyter runtime token")),
    ("*/wp-config.php", _wp_config),
)
# Files whose rule reads the whole file even when it is not text (SQLite token stores).
BINARY_RULES = ("*/.config/gcloud/*.db", "*/.azure/msal_token_cache.*")


def by_path(path: str) -> list[Callable[[bytes], Iterator[Hit]]]:
    return [rule for pattern, rule in PATH_RULES if fnmatch.fnmatchcase(path, pattern)]


def reads_binary(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in BINARY_RULES)
