"""Whether the guest's signed chain would pass Secure Boot, before any boot: Debian's real shim,
GRUB and kernel (the host's packages), copies of them signed by the wrong key or not at all, a
forged chain sbverify alone accepts, and what a hostile guest could hand over instead."""

from __future__ import annotations

import datetime
import functools
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from imaging.errors import GuestError, ParameterError
from imaging.guest import signatures

SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
UNSIGNED_SHIM = Path("/usr/lib/shim/shimx64.efi")
GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
SNAKEOIL = Path("/usr/share/ovmf/PkKek-1-snakeoil")  # .key and .pem: Debian's ovmf test key
KERNELS = sorted(Path.home().glob(".cache/imaging/kernels/*/boot/vmlinuz-*"))
needs_kernel = pytest.mark.skipif(
    not KERNELS, reason="no Debian kernel in the cache (make test fetches one)"
)

GRUB_LINE = "the guest's GRUB is not signed by the key its shim carries (Debian Secure Boot CA)"
SHIM_LINE = "the guest's shim is not signed by a key the firmware's db holds"


@functools.cache
def host(path: Path) -> bytes:
    assert path.is_file(), f"{path} is needed: apt install shim-signed grub-efi-amd64-signed ovmf"
    return path.read_bytes()


def tool(*argv: object) -> None:
    name = str(argv[0])
    assert shutil.which(name), f"{name} is needed: apt install sbsigntool"
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


@pytest.fixture
def chain() -> tuple[bytes, bytes, bytes]:
    # Without a kernel in the cache, Debian's GRUB stands in for it: signed by the same key.
    return host(SHIM), host(GRUB), KERNELS[0].read_bytes() if KERNELS else host(GRUB)


@needs_kernel
def test_debians_real_chain_passes(chain: tuple[bytes, bytes, bytes]) -> None:
    for _ in range(2):  # the first reads the firmware's db (once per process)
        assert signatures.chain_problems(*chain) == []


def test_the_firmware_db_is_microsofts() -> None:
    names = [signatures._name(cert) for cert in signatures.firmware_db()]
    assert names == ["Microsoft Windows Production PCA 2011", "Microsoft Corporation UEFI CA 2011"]


def test_a_varstore_without_a_db_is_a_parameter_error(tmp_path: Path) -> None:
    (tmp_path / "VARS.fd").write_bytes(host(Path("/usr/share/OVMF/OVMF_VARS_4M.fd")))  # no keys
    for path in (tmp_path / "VARS.fd", tmp_path / "missing.fd", UNSIGNED_SHIM):
        with pytest.raises(ParameterError, match="Secure Boot variable store"):
            signatures._firmware_db(str(path))


def test_grub_signed_by_another_key(tmp_path: Path, chain: tuple[bytes, bytes, bytes]) -> None:
    shim, grub, kernel = chain
    # Debian's ovmf ships the snakeoil key encrypted (its README: the password is "snakeoil"),
    # and sbsign would ask a terminal for it.
    key = serialization.load_pem_private_key(host(SNAKEOIL.with_suffix(".key")), password=b"snakeoil")
    (tmp_path / "snakeoil.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "grub.efi").write_bytes(grub)
    tool("sbattach", "--remove", tmp_path / "grub.efi")
    tool("sbsign", "--key", tmp_path / "snakeoil.key", "--cert", SNAKEOIL.with_suffix(".pem"),
         "--output", tmp_path / "snakeoil.efi", tmp_path / "grub.efi")  # fmt: skip
    assert signatures.chain_problems(shim, (tmp_path / "snakeoil.efi").read_bytes(), kernel) == [GRUB_LINE]


@needs_kernel
def test_an_unsigned_kernel(tmp_path: Path, chain: tuple[bytes, bytes, bytes]) -> None:
    shim, grub, kernel = chain
    (tmp_path / "vmlinuz").write_bytes(kernel)
    tool("sbattach", "--remove", tmp_path / "vmlinuz")
    problems = signatures.chain_problems(shim, grub, (tmp_path / "vmlinuz").read_bytes())
    assert problems == ["the guest's kernel is not signed"]


@needs_kernel
def test_a_kernel_changed_after_it_was_signed(chain: tuple[bytes, bytes, bytes]) -> None:
    shim, grub, kernel = chain
    changed = bytearray(kernel)
    changed[0x4000] ^= 0xFF  # in its code, which the signed digest covers
    assert signatures.chain_problems(shim, grub, bytes(changed)) == [
        "the guest's kernel was changed after it was signed (its digest is not the one signed)"
    ]


def test_an_unsigned_shim(chain: tuple[bytes, bytes, bytes]) -> None:
    _, grub, kernel = chain
    assert signatures.chain_problems(host(UNSIGNED_SHIM), grub, kernel) == ["the guest's shim is not signed"]


def test_a_shim_only_microsofts_windows_ca_would_refuse(
    chain: tuple[bytes, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hyper-V's "Microsoft Windows" template, Secured-core PCs: db without the third-party UEFI CA.
    windows = [c for c in signatures.firmware_db() if "Windows" in signatures._name(c)]
    monkeypatch.setattr(signatures, "firmware_db", lambda: tuple(windows))
    assert signatures.chain_problems(*chain) == [f"{SHIM_LINE} (Microsoft Windows Production PCA 2011)"]


def _cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: tuple[str, rsa.RSAPrivateKey] | None, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (issuer or (subject, key))[0])]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    return builder.sign((issuer or (subject, key))[1], hashes.SHA256())


def test_a_forged_chain_that_sbverify_alone_accepts(
    tmp_path: Path, chain: tuple[bytes, bytes, bytes]
) -> None:
    # A signature carrying an intermediate whose root is nowhere: sbverify 0.9.4 passes it
    # against any --cert at all, as it passes Microsoft's (whose root no db holds either).
    _, grub, kernel = chain
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    intermediate = _cert("Forged Intermediate", keys[1], ("Forged Root", keys[0]), ca=True)
    leaf = _cert("Forged Signer", keys[2], ("Forged Intermediate", keys[1]), ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "leaf.key").write_bytes(keys[2].private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))  # fmt: skip
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "intermediate.pem").write_bytes(intermediate.public_bytes(pem))
    tool("sbsign", "--key", tmp_path / "leaf.key", "--cert", tmp_path / "leaf.pem",
         "--addcert", tmp_path / "intermediate.pem", "--output", tmp_path / "forged.efi", UNSIGNED_SHIM)  # fmt: skip
    forged = (tmp_path / "forged.efi").read_bytes()
    (tmp_path / "uefi-ca.pem").write_bytes(signatures.firmware_db()[1].public_bytes(pem))
    fooled = subprocess.run(["sbverify", "--cert", tmp_path / "uefi-ca.pem", tmp_path / "forged.efi"],
                            capture_output=True)  # fmt: skip
    print(f"sbverify alone on the forged shim: exit code {fooled.returncode}")
    problems = signatures.chain_problems(forged, grub, kernel)
    assert problems == [
        f"{SHIM_LINE} (Microsoft Windows Production PCA 2011, Microsoft Corporation UEFI CA 2011)"
    ]


def _vendor_cert(shim: bytes) -> tuple[int, int]:
    """Where shim's .vendor_cert section is in the file: (offset, size)."""
    pe = struct.unpack_from("<I", shim, 0x3C)[0]
    count, symbols, nsymbols, optional = struct.unpack_from("<H4xIIH", shim, pe + 6)
    for i in range(count):
        raw, size, _, _, offset = struct.unpack_from("<8sIIII", shim, pe + 24 + optional + 40 * i)
        at = symbols + 18 * nsymbols + int(raw.rstrip(b"\0")[1:] or 0) if raw.startswith(b"/") else -1
        if at >= 0 and shim[at : at + 13] == b".vendor_cert\0":
            return offset, size
    raise AssertionError("shim has no .vendor_cert")


def test_a_shim_carrying_its_key_as_a_signature_list(chain: tuple[bytes, bytes, bytes]) -> None:
    # A shim built with VENDOR_DB_FILE: the same Debian key, as an EFI_SIGNATURE_LIST.
    _, grub, kernel = chain
    shim = bytearray(host(UNSIGNED_SHIM))
    offset, _ = _vendor_cert(bytes(shim))
    size, _, at, _ = struct.unpack_from("<IIII", shim, offset)
    der = bytes(shim[offset + at : offset + at + size])
    owner = uuid.uuid4().bytes_le
    esl = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072").bytes_le
    esl += struct.pack("<III", 28 + 16 + len(der), 0, 16 + len(der)) + owner + der
    struct.pack_into("<IIII", shim, offset, len(esl), 0, 16, 0)
    shim[offset + 16 : offset + 16 + len(esl)] = esl
    assert signatures.chain_problems(bytes(shim), grub, kernel) == ["the guest's shim is not signed"]


def _hostile(base: bytes, case: str) -> bytes:
    """What a hostile or broken guest could have in place of a file, made from the real one."""
    pe = struct.unpack_from("<I", base, 0x3C)[0]
    table = pe + 24 + struct.unpack_from("<H", base, pe + 20)[0]
    security = pe + 24 + 112 + 32
    start = struct.unpack_from("<I", base, security)[0]
    data = bytearray(base)
    if case == "empty":
        return b""
    if case == "text":
        return b"#!/bin/sh\necho not an image\n" * 10
    if case == "header past the end":
        return b"MZ" + bytes(0x3A) + struct.pack("<I", 1 << 31)
    if case == "cut short":
        return base[:8192]
    if case == "a section past the end":
        struct.pack_into("<I", data, table + 20, 1 << 30)  # the first section's file offset
    elif case == "signatures past the end":
        struct.pack_into("<I", data, security + 4, 1 << 30)
    elif case == "a corrupt signature table":
        struct.pack_into("<I", data, start, 4)  # the first entry's length
    elif case == "a garbage signature":
        data[start + 8 : start + 24] = b"\xff" * 16
    return bytes(data)


HOSTILE = {
    "empty": "is not an EFI (PE/COFF) image",
    "text": "is not an EFI (PE/COFF) image",
    "header past the end": "is not an EFI (PE/COFF) image",
    "cut short": "is truncated",
    "a section past the end": "is truncated (its section",
    "signatures past the end": "is truncated (its signatures end past it)",
    "a corrupt signature table": "has a corrupt signature table",
    "a garbage signature": "is not signed by",
}


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("what", ["shim", "GRUB", "kernel"])
def test_what_a_hostile_guest_hands_over_is_one_line(
    case: str, what: str, chain: tuple[bytes, bytes, bytes]
) -> None:
    files = dict(zip(["shim", "GRUB", "kernel"], chain, strict=True))
    files[what] = _hostile(files[what], case)
    problems = signatures.chain_problems(*files.values())
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith(f"the guest's {what} ") and HOSTILE[case] in problems[0], problems


def test_a_shim_whose_key_is_past_its_section(chain: tuple[bytes, bytes, bytes]) -> None:
    _, grub, kernel = chain
    shim = bytearray(host(UNSIGNED_SHIM))
    offset, _ = _vendor_cert(bytes(shim))
    struct.pack_into("<IIII", shim, offset, 930, 0, 1 << 30, 0)
    assert signatures.chain_problems(bytes(shim), grub, kernel) == [
        "the guest's shim is not signed",
        "the guest's shim carries no key for GRUB and the kernel (its .vendor_cert is empty or cut short)",
    ]


@settings(max_examples=300, deadline=None)
@given(
    at=st.integers(min_value=0, max_value=0x400), junk=st.binary(min_size=1, max_size=16), shim=st.booleans()
)
def test_a_mangled_image_is_read_or_refused_in_one_line(at: int, junk: bytes, shim: bool) -> None:
    # The parsers alone (the tools' failures are lines already): the headers, and shim's key.
    data = bytearray(host(SHIM if shim else GRUB))
    if shim:
        at += _vendor_cert(host(SHIM))[0] - 0x200  # around the key's header and its start
    data[at : at + len(junk)] = junk
    try:
        signatures._vendor_keys(signatures._read_image(bytes(data), "shim"))
    except GuestError as e:
        assert "\n" not in str(e)
