"""OpenStack through openstacksdk: a server's snapshot (Nova createImage) downloaded from Glance,
and finished images published to Glance with their visibility and members.

Copying out: the server is looked up, Nova is asked for a snapshot image, the image is waited
for (``active`` within the cloud's time limit), then downloaded into the run's work directory and
kept only when its size, MD5 and (where Glance has it) multihash match Glance's record; a qcow2
snapshot is converted by 00-acquire like any qcow2 source. The snapshot image, made only for
the copy, is deleted afterwards (``keep_snapshot`` keeps it).

Publishing: a new image named as the request, qcow2 in a bare container, uploaded and waited for;
``visibility`` public, private or shared, and for shared one member per user (the users' project
ids come from the cloud's settings). An upload that fails leaves no image behind. A disk that boots
UEFI only gets the image properties that make Nova boot it with UEFI on a q35 machine
(:func:`firmware_properties`); a hybrid disk needs none, Nova's BIOS boots it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging import sparse
from imaging.clouds.kept import KEEP, find_snapshot, forget_snapshot, note_snapshot
from imaging.clouds.resume import Cut, resumable_download
from imaging.clouds.settings import CloudSource, OpenStack
from imaging.clouds.transfer import Fetched, HashBeside
from imaging.errors import ImagingError, ParameterError, SourceError
from imaging.progress import bytes_bar
from imaging.records import Record

_CHUNK = 1 << 20
FORMATS = ("raw", "qcow2")
# Nova's image properties for a guest that boots UEFI only: UEFI (OVMF) firmware, on the q35
# machine type rather than the i440fx one BIOS guests get.
UEFI_PROPERTIES = {"hw_firmware_type": "uefi", "hw_machine_type": "q35"}


class CloudError(ImagingError):
    """OpenStack refused or failed a call; the message names the call, never a credential."""


def connect(cloud: OpenStack) -> Any:
    import openstack

    kwargs: dict[str, Any] = dict(
        auth_type=cloud.auth_type,
        auth={k: v.get_secret_value() for k, v in cloud.auth.items()},
        load_yaml_config=False,
        load_envvars=False,
    )
    if cloud.region:
        kwargs["region_name"] = cloud.region
    if cloud.compute_endpoint:
        kwargs["compute_endpoint_override"] = cloud.compute_endpoint
    if cloud.image_endpoint:
        kwargs["image_endpoint_override"] = cloud.image_endpoint
    return openstack.connect(**kwargs)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _explain(e: BaseException, what: str, cloud_name: str) -> ImagingError:
    from openstack import exceptions as osx

    status = getattr(e, "status_code", None)
    if isinstance(e, osx.NotFoundException) or status == 404:
        return SourceError(f"{cloud_name}: {what}: not found")
    if status in (401, 403) or type(e).__name__ in ("Unauthorized", "Forbidden"):
        return CloudError(
            f"{cloud_name}: {what}: the cloud refused the credentials ({status or type(e).__name__})"
        )
    return CloudError(f"{cloud_name}: {what}: {_line(e)}")


def _call(cloud_name: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as osx

    try:
        return fn(*args, **kwargs)
    except (osx.SDKException, ksa.ClientException) as e:
        raise _explain(e, what, cloud_name) from None


def wait_image(conn: Any, cloud: OpenStack, cloud_name: str, image_id: str, what: str) -> Any:
    """Until Glance says the image is active; CloudError when it is killed or the limit passes."""
    deadline = time.monotonic() + cloud.image_timeout
    while True:
        image = _call(cloud_name, f"image {image_id}", conn.image.get_image, image_id)
        if image.status == "active":
            return image
        if image.status in ("killed", "deleted", "pending_delete"):
            raise CloudError(f"{cloud_name}: image {image_id} of {what} is {image.status}")
        if time.monotonic() >= deadline:
            raise CloudError(
                f"{cloud_name}: image {image_id} of {what} did not become active within "
                f"{cloud.image_timeout:g} s (still {image.status})"
            )
        time.sleep(min(cloud.poll_seconds, max(0.0, deadline - time.monotonic())))


def _delete_image(conn: Any, image_id: str) -> None:
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as osx

    try:
        conn.image.delete_image(image_id, ignore_missing=True)
    except (osx.SDKException, ksa.ClientException):
        pass


def find_server(src: CloudSource, cloud: OpenStack) -> Any:
    """The server, or SourceError (not found) / CloudError (credentials refused, unreachable)."""
    return _call(src.cloud, f"server {src.instance}", connect(cloud).compute.get_server, src.instance)


def _kept_image(conn: Any, src: CloudSource, cloud_name: str, work: Path) -> Any:
    """The snapshot image an earlier, cut copy of this server kept, if Glance still has it active."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as osx

    image_id = find_snapshot(work, str(src))
    if image_id is None:
        return None
    try:
        image = conn.image.get_image(image_id)
    except (osx.SDKException, ksa.ClientException):
        image = None
    if image is None or image.status != "active":
        _delete_image(conn, image_id)
        forget_snapshot(work)
        return None
    return image


def fetch(src: CloudSource, cloud: OpenStack, work: Path) -> Fetched:
    """Snapshot the server, wait, download the snapshot into ``work/source.<format>``. A copy
    cut mid-way keeps what arrived and the snapshot image: the next call downloads the rest of
    the same image."""
    t0 = time.monotonic()
    conn = connect(cloud)
    server = _call(src.cloud, f"server {src.instance}", conn.compute.get_server, src.instance)
    image = _kept_image(conn, src, src.cloud, work)
    if image is None:
        name = f"imaging copy of {src.instance} {time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        image = _call(src.cloud, f"snapshot of server {src.instance}", conn.compute.create_server_image, server,
                      name, metadata={"imaging:source": src.instance})  # fmt: skip
        note_snapshot(work, str(src), str(image.id))
    cut = False
    try:
        image = wait_image(conn, cloud, src.cloud, image.id, f"server {src.instance}")
        fmt = str(image.disk_format or "")
        if fmt not in FORMATS:
            raise SourceError(
                f"{src.cloud}: the snapshot of {src.instance} is {fmt or 'of no format'}, not raw or qcow2"
            )
        dest = work / f"source.{fmt}"
        got = download(conn, src.cloud, image, dest, f"download {src.instance}")
    except Cut as e:
        cut = True
        raise Cut(f"{e}; its snapshot image {image.id} is kept for the resume") from None
    except KEEP:  # what arrived stays (resume.py): so does the image it is of
        cut = True
        raise
    finally:
        if not cut:
            forget_snapshot(work)
            if not cloud.keep_snapshot:
                _delete_image(conn, image.id)
    return Fetched(
        source=str(src), cloud=src.cloud, kind="openstack", path=str(dest), format=fmt, size_bytes=got.size,
        data_bytes=got.data_bytes, digest=got.digest, verified=got.checked, seconds=round(time.monotonic() - t0, 3),
        where=f"server {server.id} via image {image.id}", snapshot=image.id,
    )  # fmt: skip


@dataclass(frozen=True)
class Downloaded:
    size: int
    data_bytes: int
    digest: str  # "<algo>:<hex>" of the whole image: Glance's multihash where it has one
    checked: str
    resumed_bytes: int  # held from an earlier, cut download and not fetched again


def download(conn: Any, cloud_name: str, image: Any, dest: Path, desc: str | None = None) -> Downloaded:
    """Glance image ``image``'s data into ``dest`` (sparse), checked against its size, MD5 and
    multihash. A cut keeps what arrived (:class:`~imaging.clouds.resume.Cut`); the next call for
    the same image asks Glance only for the rest (HTTP Range, which Glance honours with 206 and a
    Content-Range), and the checks still cover the whole file: on a mismatch nothing is kept."""
    size = int(image.size or 0)
    checksum, algo, value = (
        str(image.checksum or ""),
        str(image.hash_algo or ""),
        str(image.hash_value or ""),
    )
    identity: dict[str, object] = {"image": str(image.id), "checksum": checksum, "os_hash_value": value}
    md5 = HashBeside(hashlib.md5(usedforsecurity=False))
    # The record's digest is the multihash Glance checks too (sha512 by default): one pass fewer
    # than a digest of our own. Only a Glance without multihash gets a sha256 of ours.
    multi = hashlib.new(algo) if algo and value else hashlib.sha256()
    what = f"download of image {image.id}"
    with contextlib.ExitStack() as stack:
        part = stack.enter_context(resumable_download(dest, size, identity))
        bar = stack.enter_context(bytes_bar(size, desc))
        stack.callback(lambda: md5.close())  # the one in use when the block ends
        got = start = part.prefix()
        part.hash_prefix(_Both(md5, multi), start)  # one read of what a cut copy kept
        bar.update(start)
        if got < size:
            response = _open(conn, cloud_name, image.id, start)
            try:
                if response.status_code == 200 and start:  # the whole image after all: from byte 0
                    md5.close()
                    md5, multi = HashBeside(hashlib.md5(usedforsecurity=False)), hashlib.new(multi.name)
                    got = 0
                for chunk in response.iter_content(chunk_size=_CHUNK):
                    if got + len(chunk) > size:
                        raise SourceError(
                            f"{cloud_name}: image {image.id} sends more than its {size:,} bytes"
                        )
                    md5.update(chunk)
                    multi.update(chunk)
                    part.write(got, chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except SourceError:
                raise
            except Exception as e:  # requests' and urllib3's errors for a cut connection
                raise Cut(f"{cloud_name}: {what} cut after {got:,} of {size:,} bytes ({_line(e)}): "
                          "what arrived is kept for the next attempt") from None  # fmt: skip
            finally:
                response.close()
        if got != size:
            raise Cut(f"{cloud_name}: {what} ended after {got:,} of {size:,} bytes: what arrived is kept "
                      "for the next attempt")  # fmt: skip
        if checksum and md5.hexdigest() != checksum:
            raise SourceError(f"{cloud_name}: {what} does not match its MD5: nothing kept")
        if algo and value and multi.hexdigest() != value:
            raise SourceError(f"{cloud_name}: {what} does not match its {algo}: nothing kept")
        resumed = part.resumed_bytes if start else 0
    checked = (
        "size" + (", MD5" if checksum else "") + (f" and {algo}" if algo and value else "") + " from Glance"
    )
    return Downloaded(size, sparse.data_bytes(dest), f"{multi.name}:{multi.hexdigest()}", checked, resumed)


class _Both:
    def __init__(self, *hashes: Any) -> None:
        self.hashes = hashes

    def update(self, data: bytes) -> None:
        for h in self.hashes:
            h.update(data)


def _open(conn: Any, cloud_name: str, image_id: str, start: int) -> Any:
    """The image data's response from byte ``start`` on (206), or whole (200) from a Glance that
    ignores Range; a connection refused or cut before an answer is a :class:`Cut`."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as osx

    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = conn.image.get(f"images/{image_id}/file", stream=True, headers=headers)
    except (ksa.ConnectFailure, ksa.ConnectionError) as e:
        raise Cut(f"{cloud_name}: download of image {image_id}: {_line(e)}: what arrived is kept") from None
    expected = 206 if start else 200
    if response.status_code not in (200, expected):
        try:
            osx.raise_from_response(response)
            raise CloudError(f"{cloud_name}: download of image {image_id}: HTTP {response.status_code}")
        except osx.SDKException as e:
            raise _explain(e, f"download of image {image_id}", cloud_name) from None
        finally:
            response.close()
    if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(
        f"bytes {start}-"
    ):
        response.close()
        raise CloudError(f"{cloud_name}: download of image {image_id}: Glance answered a range from {start} "
                         f"with {response.headers.get('Content-Range')!r}")  # fmt: skip
    return response


@dataclass(frozen=True)
class Uploaded(Record):
    cloud: str
    image_id: str
    name: str
    disk_format: str
    visibility: str
    members: list[str]
    size_bytes: int
    checksum: str
    seconds: float
    properties: dict[str, str]  # what was set besides imaging_run (the firmware's)


def firmware_properties(firmware: str) -> dict[str, str]:
    """The Glance properties a disk that boots with ``firmware`` needs (bios, uefi, hybrid)."""
    return dict(UEFI_PROPERTIES) if firmware == "uefi" else {}


def members_for(cloud: OpenStack, cloud_name: str, vis: str, shared_with: list[str]) -> list[str]:
    if vis != "selected":
        return []
    missing = [u for u in shared_with if u not in cloud.projects]
    if missing:
        raise ParameterError(
            f"{cloud_name}: no project id for {', '.join(missing)} (add them under clouds.{cloud_name}.projects)"
        )
    return [cloud.projects[u] for u in shared_with]


def publish(cloud: OpenStack, cloud_name: str, artifact: Path, disk_format: str, name: str, run: str,
            vis: str, shared_with: list[str], firmware: str = "bios") -> Uploaded:  # fmt: skip
    """The artifact as a new Glance image with its visibility and members, and the properties
    its ``firmware`` needs."""
    t0 = time.monotonic()
    members = members_for(cloud, cloud_name, vis, shared_with)
    properties = firmware_properties(firmware)
    visibility = {"public": "public", "private": "private", "selected": "shared"}[vis]
    conn = connect(cloud)
    image_id = ""
    try:
        image = _call(
            cloud_name, "create an image", conn.image.create_image, name=name, filename=str(artifact),
            disk_format=disk_format, container_format="bare", visibility=visibility, allow_duplicates=True,
            wait=False, timeout=cloud.image_timeout, meta={"imaging_run": run, **properties},
        )  # fmt: skip
        image_id = str(image.id)
        image = wait_image(conn, cloud, cloud_name, image_id, name)
        if int(image.size or 0) != artifact.stat().st_size:
            raise CloudError(
                f"{cloud_name}: image {image_id} holds {image.size} bytes, not {artifact.stat().st_size}"
            )
        for project in members:
            _call(
                cloud_name,
                f"share {image_id} with {project}",
                conn.image.add_member,
                image_id,
                member_id=project,
            )
    except BaseException:
        if image_id:
            _delete_image(conn, image_id)
        raise
    return Uploaded(
        cloud=cloud_name, image_id=image_id, name=name, disk_format=disk_format, visibility=visibility,
        members=members, size_bytes=int(image.size or 0), checksum=str(image.checksum or ""),
        seconds=round(time.monotonic() - t0, 3), properties=properties,
    )  # fmt: skip
