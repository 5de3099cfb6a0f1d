"""Whether the guest's signed chain would pass Secure Boot, checked before any boot.

The firmware (OVMF with Microsoft's keys, as clouds and PCs have it) starts shim only if one of
its signatures chains to a certificate in the firmware's ``db``; shim starts GRUB, and GRUB has
shim check the kernel, only if they chain to the key shim carries in its ``.vendor_cert``
section (or to ``db``, which shim trusts as well). Each signature is checked in two halves:

- **integrity** by ``sbverify`` (sbsigntool): the image's Authenticode digest is the one signed,
  and the PKCS#7 signature over it verifies with its signer's certificate;
- **trust** here, with ``cryptography``: every signer (``openssl smime -signer`` names them)
  chains through the certificates the signature carries to one of the trusted certificates,
  as the firmware decides it: a trusted certificate need not be a root, and time does not
  count (firmware has no clock it trusts: Microsoft's UEFI CA 2011, expired in June 2026, still
  starts shim).

sbverify's own trust decision cannot be used: the one on Debian 12 (0.9.4, OpenSSL 3) accepts any
signature that carries an intermediate CA whose issuer it lacks, whatever ``--cert`` says. Every
Microsoft signature carries one (the UEFI CA, issued by a root no db holds), so Debian's shim
"verifies" against any certificate at all: against a db of Microsoft's Windows CA only (Hyper-V's
"Microsoft Windows" template), which refuses it, too.

Not checked (the boot check proves them): revocations (``dbx``, shim's own list and its SBAT
levels) and images allowed by hash rather than by certificate.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from imaging import config, tools
from imaging.errors import CommandError, GuestError, ParameterError

# edk2's variable store: a firmware volume (NvData) holding authenticated variables; db is the
# image security database's variable. A variable is live in state VAR_ADDED: the store keeps
# superseded copies of a variable it rewrote (OVMF's template has several), marked deleted.
_NV_DATA = uuid.UUID("fff12b8d-7696-4c8b-a985-2747075b4f50")
_AUTH_VARIABLES = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")
_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
_VARIABLE_MAGIC, _VAR_ADDED, _VARIABLE_HEADER = 0x55AA, 0x3F, 60
_DB = "db\0".encode("utf-16-le")

_WIN_CERT_PKCS_SIGNED_DATA = 2
# A hostile guest's image could carry thousands of signatures, each a tool run: real ones have
# one or two (shim: Microsoft's 2011 and 2023 CAs).
_MAX_SIGNATURES = 8
_MAX_SECTIONS = 96  # the PE/COFF specification's limit
_MAX_CHAIN_CERTS = 16


@dataclass(frozen=True)
class _Image:
    """What is checked of a PE/COFF image: its sections by name, its PKCS#7 signatures."""

    sections: dict[str, bytes]
    signatures: list[bytes]


def _read_image(data: bytes, what: str) -> _Image:
    """The image's sections and signatures; GuestError when it is not a whole PE/COFF image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise GuestError(f"the guest's {what} is not an EFI (PE/COFF) image")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 26 > len(data) or data[pe : pe + 4] != b"PE\0\0":
        raise GuestError(f"the guest's {what} is not an EFI (PE/COFF) image")
    count, symbols, nsymbols, optional_size = struct.unpack_from("<H4xIIH", data, pe + 6)
    optional, table = pe + 24, pe + 24 + optional_size
    magic = struct.unpack_from("<H", data, optional)[0]
    security = optional + (112 if magic == 0x20B else 96) + 4 * 8  # data directory 4 (PE32+, PE32)
    if count > _MAX_SECTIONS or security + 8 > table or table + 40 * count > len(data):
        raise GuestError(f"the guest's {what} is truncated or not an EFI image (its headers end past it)")
    sections = {}
    for i in range(count):
        raw, size, _, raw_size, offset = struct.unpack_from("<8sIIII", data, table + 40 * i)
        name = raw.rstrip(b"\0")
        if name.startswith(b"/") and name[1:].isdigit():  # a long name, in the COFF string table
            at = symbols + 18 * nsymbols + int(name[1:])
            end = data.find(b"\0", at, at + 64)
            name = data[at:end] if end > at else name
        label = name.decode("ascii", "replace")
        if offset + min(size, raw_size) > len(data):
            raise GuestError(f"the guest's {what} is truncated (its section {label} ends past it)")
        sections[label] = data[offset : offset + min(size, raw_size)]
    return _Image(sections, _signatures(data, security, what))


def _signatures(data: bytes, security: int, what: str) -> list[bytes]:
    """The PKCS#7 SignedData blobs of the image's certificate table (WIN_CERTIFICATE entries)."""
    start, size = struct.unpack_from("<II", data, security)
    if not size:
        return []
    if start + size > len(data):
        raise GuestError(f"the guest's {what} is truncated (its signatures end past it)")
    found: list[bytes] = []
    at = start
    while at + 8 <= start + size and len(found) < _MAX_SIGNATURES:
        length, _, kind = struct.unpack_from("<IHH", data, at)
        if length < 8 or at + length > start + size:
            raise GuestError(f"the guest's {what} has a corrupt signature table")
        if kind == _WIN_CERT_PKCS_SIGNED_DATA:
            found.append(data[at + 8 : at + length])
        at += (length + 7) & ~7
    return found


def _signature_list_certs(blob: bytes) -> list[x509.Certificate]:
    """The X.509 certificates of EFI_SIGNATURE_LISTs (hashes and other kinds are skipped);
    ValueError when the lists are not well formed."""
    found, at = [], 0
    while at + 28 <= len(blob):
        kind = uuid.UUID(bytes_le=blob[at : at + 16])
        size, header, item = struct.unpack_from("<III", blob, at + 16)
        if size < 28 + header or at + size > len(blob) or item <= 16:
            raise ValueError("not an EFI signature list")
        if kind == _CERT_X509:
            for entry in range(at + 28 + header, at + size - item + 1, item):  # owner GUID, then DER
                found.append(x509.load_der_x509_certificate(blob[entry + 16 : entry + item]))
        at += size
    return found


def _varstore_db(data: bytes) -> bytes:
    """The db variable's data in an edk2 variable store (OVMF_VARS.fd); ValueError if none."""
    if len(data) < 0x40 or data[40:44] != b"_FVH" or uuid.UUID(bytes_le=data[16:32]) != _NV_DATA:
        raise ValueError("not an edk2 variable store")
    store = struct.unpack_from("<H", data, 48)[0]
    if store + 28 > len(data) or uuid.UUID(bytes_le=data[store : store + 16]) != _AUTH_VARIABLES:
        raise ValueError("not an authenticated variable store")
    at, end = store + 28, min(store + struct.unpack_from("<I", data, store + 16)[0], len(data))
    while at + _VARIABLE_HEADER <= end:
        magic, state = struct.unpack_from("<HB", data, at)
        name_size, data_size = struct.unpack_from("<II", data, at + 36)
        if magic != _VARIABLE_MAGIC:
            break
        guid, name = uuid.UUID(bytes_le=data[at + 44 : at + 60]), data[at + 60 : at + 60 + name_size]
        if state == _VAR_ADDED and guid == _SECURITY_DATABASE and name == _DB:
            return data[at + 60 + name_size : at + 60 + name_size + data_size]
        at = (at + _VARIABLE_HEADER + name_size + data_size + 3) & ~3
    raise ValueError("it has no db variable")


@functools.cache  # once per process: the host's firmware does not change under a run
def _firmware_db(path: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = _signature_list_certs(_varstore_db(Path(path).read_bytes()))
    except (OSError, ValueError) as e:
        raise ParameterError(f"the Secure Boot variable store {path} cannot be read: {e}") from None
    if not certs:
        raise ParameterError(f"the Secure Boot variable store {path} has no certificate in its db")
    return tuple(certs)


def firmware_db() -> tuple[x509.Certificate, ...]:
    """The certificates in the db of the firmware the boot check uses for Secure Boot."""
    found = config.load_qemu_devices().secure_boot
    if found is None:
        raise ParameterError("checking Secure Boot needs OVMF's Secure Boot firmware (secure_boot: in parameters/qemu.yaml)")  # fmt: skip
    return _firmware_db(found.vars)


def _vendor_keys(shim: _Image) -> list[x509.Certificate]:
    """The key shim trusts GRUB and the kernel with: its .vendor_cert's authorized blob, a DER
    certificate (Debian's, Ubuntu's: shim's VENDOR_CERT_FILE) or EFI_SIGNATURE_LISTs of them
    (VENDOR_DB_FILE). Its deauthorized blob (a vendor dbx) is not read."""
    section = shim.sections.get(".vendor_cert")
    if section is None:
        raise GuestError("the guest's shim carries no key for GRUB and the kernel (no .vendor_cert section)")
    if len(section) < 16:
        raise GuestError("the guest's shim has a truncated .vendor_cert section")
    size, _, offset, _ = struct.unpack_from("<IIII", section)
    if not size or offset + size > len(section):
        raise GuestError("the guest's shim carries no key for GRUB and the kernel (its .vendor_cert is empty or cut short)")  # fmt: skip
    blob = section[offset : offset + size]
    try:
        return [x509.load_der_x509_certificate(blob)]
    except ValueError:
        pass
    try:
        keys = _signature_list_certs(blob)
    except ValueError:
        keys = []
    if not keys:
        raise GuestError(
            "the guest's shim's .vendor_cert is neither a certificate nor a signature list of one"
        )
    return keys


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _names(certs: list[x509.Certificate]) -> str:
    return ", ".join(dict.fromkeys(_name(cert) for cert in certs))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _chains(
    signer: x509.Certificate, carried: list[x509.Certificate], trusted: list[x509.Certificate]
) -> bool:
    """Whether the signer is, or chains through the carried certificates to, a trusted one. Each
    certificate is tried once: a hostile signature's certificates cannot make it loop or explode."""
    todo, seen = [signer], set()
    while todo:
        cert = todo.pop()
        if cert in seen:
            continue
        if cert in trusted or any(_issued_by(cert, anchor) for anchor in trusted):
            return True
        seen.add(cert)
        todo += [parent for parent in carried if parent not in seen and _issued_by(cert, parent)]
    return False


def _certificates(argv: list[str | Path], output: Path | None = None) -> list[x509.Certificate]:
    """The certificates an openssl command prints (or writes to ``output``); none when it fails:
    a signature openssl cannot read carries nothing and signs nothing."""
    try:
        run = tools.run(["openssl", *argv], ok_codes=range(256), timeout=60)
        pem = output.read_bytes() if output is not None else run.stdout.encode()
        return x509.load_pem_x509_certificates(pem) if run.exit_code == 0 else []
    except (CommandError, OSError, ValueError):
        return []


def _trusted(blob: Path, trusted: list[x509.Certificate]) -> bool:
    """Whether every signer of the signature in ``blob`` chains to a trusted certificate."""
    out = blob.with_suffix(".signers.pem")
    # The signers, as openssl finds them among the certificates the signature carries (not its
    # content, which sbverify checks: Authenticode's is not a content openssl reads).
    signers = _certificates(["smime", "-verify", "-inform", "DER", "-in", blob, "-noverify", "-nosigs",
                             "-signer", out, "-out", "/dev/null"], out)  # fmt: skip
    if not signers:
        return False
    # openssl reads the carried certificates leniently, as firmware does: Microsoft's signatures are
    # not strict DER (their certificates are out of DER's order), which cryptography warns it will refuse.
    carried = _certificates(["pkcs7", "-inform", "DER", "-in", blob, "-print_certs"])[:_MAX_CHAIN_CERTS]
    return all(_chains(signer, carried, trusted) for signer in signers)


def _problem(tmp: Path, data: bytes, image: _Image, what: str, trusted: list[x509.Certificate],
             whose: str) -> str:  # fmt: skip
    """One line on why this image would not pass, or "" when one of its signatures is trusted
    (every signer chains to a trusted certificate) and sound (sbverify: the image is the one signed)."""
    if not image.signatures:
        return f"the guest's {what} is not signed"
    path, anchors = tmp / f"{what}.efi", tmp / f"{what}-trusted.pem"
    failure = ""
    for index, signature in enumerate(image.signatures):
        blob = tmp / f"{what}-{index}.p7"
        blob.write_bytes(signature)
        if not _trusted(blob, trusted):
            continue
        if not path.exists():
            path.write_bytes(data)
            anchors.write_bytes(b"".join(cert.public_bytes(Encoding.PEM) for cert in trusted))
        try:
            run = tools.run(["sbverify", "--verbose", "--cert", anchors, "--detached", blob, path],
                            ok_codes=range(256), timeout=60)  # fmt: skip
        except CommandError as e:  # killed, or timed out, on what the guest gave it
            failure = f"the guest's {what} could not be checked: {e}"
            continue
        if run.exit_code == 0:
            return ""
        if "fails hash check" in run.stderr:
            failure = (
                f"the guest's {what} was changed after it was signed (its digest is not the one signed)"
            )
        elif not failure:
            failure = f"the guest's {what} does not match its signature ({run.stderr_tail(1) or 'sbverify'})"
    return failure or f"the guest's {what} is not signed by {whose}"


def chain_problems(shim: bytes, grub: bytes, kernel: bytes) -> list[str]:
    """[] when shim verifies against the firmware's db (Microsoft's UEFI CA, from the OVMF varstore
    parameters/qemu.yaml names under secure_boot.vars) and grub and kernel verify against the
    certificate in shim's .vendor_cert section (or the db, which shim trusts too); otherwise one
    line per problem, e.g. "the guest's GRUB is not signed by the key its shim carries (Debian
    Secure Boot CA)". What the guest's files hold is a line, never an exception; a host without
    the tools (ToolMissing) or the firmware (ParameterError) raises."""
    tools.require_tools("sbverify", "openssl", reason="check the guest's Secure Boot signatures",
                        hint="apt install sbsigntool openssl")  # fmt: skip
    db = list(firmware_db())
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imaging-sb-") as tmp:
        keys: list[x509.Certificate] | None = None  # shim's, unknown when it cannot be read
        try:
            image = _read_image(shim, "shim")
            whose = f"a key the firmware's db holds ({_names(db)})"
            problems.append(_problem(Path(tmp), shim, image, "shim", db, whose))
            keys = _vendor_keys(image)
        except GuestError as e:
            problems.append(str(e))
        for data, what in ((grub, "GRUB"), (kernel, "kernel")):
            try:
                image = _read_image(data, what)
                if keys is None:  # the shim's line says why: here only whether it is signed at all
                    problems.append("" if image.signatures else f"the guest's {what} is not signed")
                else:
                    whose = f"the key its shim carries ({_names(keys)})"
                    problems.append(_problem(Path(tmp), data, image, what, keys + db, whose))
            except GuestError as e:
                problems.append(str(e))
    return [problem for problem in problems if problem]
