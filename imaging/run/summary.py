"""What a stage did, in a few lines of Markdown at the top of its executed notebook.

A stage's result is only known when its last cell has run, but a person reading the record
wants it first. So the pipeline, once papermill is done and before the notebook gets its final
name, its HTML render and its place on the audit chain, inserts one Markdown cell (tagged
``summary``) under the notebook's title, rendered here from the result the stage recorded. The
committed notebooks stay as they are; a failed attempt gets the error instead.

Values come from the image and the request (file names, labels, kernel versions): every one goes
through :func:`text`, so nothing in them is Markdown or HTML when the notebook is rendered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat

from imaging.records import human_bytes

TAG = "summary"
# Characters with a meaning in Markdown or HTML where a value can stand (inside a line or a
# table cell): written as numeric character references, which Markdown shows as themselves.
_SPECIAL = set("\\`*_[]<>&|~!")


def text(value: Any) -> str:
    """``value`` as Markdown that shows exactly its characters, on one line."""
    flat = " ".join(str(value).split())
    return "".join(f"&#{ord(c)};" if c in _SPECIAL else c for c in flat)


def code(value: Any) -> str:
    """``value`` shown as a literal (a path, a hash); not a code span, whose backticks a value could end."""
    return f"<code>{text(value)}</code>"


def _size(n: Any) -> str:
    return human_bytes(int(n)) if isinstance(n, int | float) else "?"


def _acquire(r: dict[str, Any]) -> str:
    where = (
        f"partition {text(r['partition'])} of a partitioned {text(r['source_format'])} disk"
        if r.get("partition")
        else f"a {text(r['source_format'])} image holding the filesystem itself"
    )
    return (
        f"**Acquired** {code(r['source'])} ({where}) as {code('work/instance.raw')}: "
        f"{text(r['fs_type'])}, UUID {code(r['uuid'])}, label {code(r.get('label') or '(none)')}, "
        f"{_size(r['size_bytes'])} with {_size(r['used_bytes'])} in use.\n\n"
        f"Filesystem check of the copy: {text(r['fsck'])}. The source was not written to."
        + _esp(r.get("esp"))
        + "".join(f"\n\n**Warning**: {text(w)}" for w in r.get("warnings") or [])
        + _fetched(r.get("fetched"))
    )


def _esp(e: dict[str, Any] | None) -> str:
    """The source's EFI system partition, copied beside the root."""
    if not e:
        return ""
    return (
        f"\n\nEFI system partition: partition {text(e['partition'])}, FAT {code(e['uuid'])}, "
        f"{_size(e['bytes'])}, {text(e['files'])} files, copied to {code(e['path'])}."
    )


def _fetched(f: dict[str, Any] | None) -> str:
    if not f:
        return ""
    return (
        f"\n\nCopied out of {text(f['kind'])} cloud {code(f['cloud'])} from {code(f['where'])}: "
        f"{_size(f['size_bytes'])} ({_size(f['data_bytes'])} of data) in {text(f['seconds'])} s, "
        f"checked against {text(f['verified'])}; sha256 {code(f['sha256'])}."
    )


def _clean(r: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for action in r.get("actions", []):  # a folded row (a directory's many files) counts them all
        counts[str(action.get("action"))] = counts.get(str(action.get("action")), 0) + int(
            action.get("count", 1)
        )
    what = ", ".join(f"{n} {text(kind)}" for kind, n in sorted(counts.items())) or "nothing to do"
    return (
        f"**Cleaned** with profile {code(r['profile'])} ({text(r['profile_reason'])}): "
        f"{len(r.get('operations', []))} operations, {sum(counts.values())} files acted on "
        f"({what}), {_size(r.get('removed_bytes', 0))} removed.\n\n"
        f"Operations: {text(', '.join(r.get('operations', [])))}." + _assumed(r) + _skipped(r)
    )


def _assumed(r: dict[str, Any]) -> str:
    """Detection's warning: the guest is a version or a distro the profile was not written for."""
    return (
        f"\n\n**Warning**: profile assumed: {text(r['profile_assumed'])}."
        if r.get("profile_assumed")
        else ""
    )


def _skipped(r: dict[str, Any]) -> str:
    """Paths the guest's own links made unreachable (loops), which the stage left alone."""
    skipped = r.get("skipped") or []
    if not skipped:
        return ""
    shown = "; ".join(text(s) for s in skipped[:5]) + (
        f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    )
    return f"\n\nSkipped {len(skipped)} paths the guest's own links make unreachable: {shown}."


def _migrate(r: dict[str, Any]) -> str:
    changed = ", ".join(code(c["path"]) for c in r.get("changes", [])) or "none"
    return (
        f"**Migrated** for target {code(r['target'])} with profile {code(r['profile'])}: "
        f"{text(r['files_changed'])} files changed ({changed}).\n\n"
        f"Kernel {code(r['kernel'])}; initrd {text(r['initrd'])}, {_size(r.get('initrd_bytes'))}, "
        f"with {text(r['initrd_modules'])}. Packages: {text(r['packages'])}."
        + _drivers(r.get("drivers") or {})
        + _assumed(r)
        + _skipped(r)
    )


def _drivers(drivers: dict[str, str]) -> str:
    if not drivers:
        return ""
    return (
        "\n\nThe target's drivers: "
        + ", ".join(f"{code(m)} ({text(where)})" for m, where in drivers.items())
        + "."
    )


def _bootable(r: dict[str, Any]) -> str:
    layout, placed, grub, disk = r["layout"], r["placement"], r["grub"], r["disk"]
    if layout.get("scheme") == "gpt":
        return _bootable_gpt(r)
    sectors = layout["partition_sectors"]
    return (
        f"**Made bootable**: a {_size(disk['disk_bytes'])} disk with an MBR ({text(disk['label'])}, "
        f"id {code(disk['disk_id'])}) and one bootable Linux partition; the {text(placed['fs_type'])} "
        f"filesystem (UUID {code(placed['uuid'])}) placed by {text(placed['placement'])} at byte "
        f"{layout['offset_bytes']:,} and grown to {text(placed['block_count'])} blocks of "
        f"{text(layout['block_size'])} bytes; GRUB 2 ({text(grub['grub'])}) with "
        f"{text(grub['entries'])} menu entries, default {code(grub['default_kernel'])}.\n\n"
        "| partition | boot | start | end | sectors | size | type |\n"
        "|---|---|--:|--:|--:|--:|---|\n"
        f"| 1 | * | {layout['start_sector']} | {layout['end_sector']} | {sectors} | "
        f"{_size(layout['partition_bytes'])} | 83 Linux |\n\n"
        f"Sectors = end - start + 1 = {layout['end_sector']} - {layout['start_sector']} + 1 = {sectors}; "
        f"offset = 512 x start = {layout['offset_bytes']}. Final check: {text(disk['fsck'])}."
    )


def _bootable_gpt(r: dict[str, Any]) -> str:
    layout, placed, grub, disk = r["layout"], r["placement"], r["grub"], r["disk"]
    rows = [
        (
            1,
            layout["start_sector"],
            layout["partition_sectors"],
            f"Linux filesystem ({text(placed['fs_type'])}, the root)",
        )
    ]
    if layout.get("bios_boot_sectors"):
        rows.append(
            (14, layout["bios_boot_start"], layout["bios_boot_sectors"], "BIOS boot (GRUB's core image)")
        )
    rows.append((15, layout["esp_start"], layout["esp_sectors"], "EFI System (FAT)"))
    parts = [
        f"| {n} | {start} | {start + count - 1} | {count} | {_size(count * 512)} | {kind} |"
        for n, start, count, kind in rows
    ]
    return (
        f"**Made bootable** for {text(', '.join(disk.get('platforms') or []))}: a {_size(disk['disk_bytes'])} "
        f"GPT disk (id {code(disk['disk_id'])}); the {text(placed['fs_type'])} filesystem (UUID "
        f"{code(placed['uuid'])}) placed by {text(placed['placement'])} at byte {layout['offset_bytes']:,}; "
        f"GRUB 2 ({text(grub['grub'])}) with {text(grub['entries'])} menu entries, default "
        f"{code(grub['default_kernel'])}"
        + (f"; under UEFI, {text(grub['uefi'])}" if grub.get("uefi") else "")
        + ".\n\n| partition | start | end | sectors | size | type |\n|---|--:|--:|--:|--:|---|\n"
        + "\n".join(parts)
        + f"\n\nOffset = 512 x start = {layout['offset_bytes']}; the backup GPT is in the disk's last 33 sectors. "
        f"Final check: {text(disk['fsck'])}."
    )


def _export(r: dict[str, Any]) -> str:
    return (
        f"**Exported** {code(Path(str(r['path'])).name)} ({text(r['format'])}, {_size(r['size_bytes'])} "
        f"for a {_size(r['virtual_size'])} disk) with {text(r['tool'])} in {text(r['seconds'])} s; "
        f"{text(r['check'])}\n\n"
        f"sha256 {code(r['sha256'])}, path {code(r['path'])}."
    )


def _verify(r: dict[str, Any]) -> str:
    screen = "the screen at the end is below, beside the serial log" if r.get("screen") else "no screenshot"
    if r["verdict"] == "booted":
        head = f"**Booted**: {text(r['reason'])} {code(r['matched'])} on the serial console"
        seen = [f"address {code(r['dhcp'])} by DHCP"] if r.get("dhcp") else []
        seen += (
            [f"sshd answered with new host keys ({text(', '.join(r['ssh_host_keys']))})"]
            if r.get("ssh_host_keys")
            else []
        )
        head += ("; " + "; ".join(seen)) if seen else ""
    elif r["verdict"] == "degraded":
        reasons = r.get("reasons") or [r["reason"]]
        head = (f"**Degraded**: it booted ({code(r['matched'])}), but "
                + "; ".join(text(x) for x in reasons[:8]))  # fmt: skip
    else:
        head = f"**Did not boot**: {text(r['reason'])}" + (
            f": {code(r['matched'])}" if r.get("matched") else ""
        )
    return (
        f"{head}, after {text(r['seconds'])} s on target {code(r['target'])} "
        f"({text(r['controller'])} disk controller, {text(r['accel'])}); {screen}.\n\n"
        f"Image {code(r['image'])} ({text(r['format'])})."
        + (f" {text(r['machine_note'])}." if r.get("machine_note") else "")
        + "".join(
            f"\n\nUnder {text(b['firmware'])}: {text(b['verdict'])} ({text(b['reason'])}) in {text(b['seconds'])} s"
            + (f"; {text(b['secure_boot'])}" if b.get("secure_boot") else "")
            + "."
            for b in r.get("boots") or []
        )
    )


def _secrets(r: dict[str, Any]) -> str:
    scan = r.get("scan") or {}
    if r["policy"] == "off":
        return "**Secret scan off** for this request: nothing was looked for."
    said = (
        f"**Scanned** {scan.get('files_read', 0):,} files ({_size(scan.get('bytes_read', 0))}) of "
        f"{scan.get('files_seen', 0):,} under the directories users and services write, in "
        f"{scan.get('seconds', 0)} s; {len(r['findings'])} finding(s), {len(r['allowed'])} allowed, "
        f"policy {text(r['policy'])}."
    )
    if r["removed"]:
        said += f" Removed the files holding the others: {text(', '.join(r['removed']))}."
    elif r["open"]:
        said += f" **{r['open']} open finding(s) go into the image** (listed below, by fingerprint)."
    return said


def _publish(r: dict[str, Any]) -> str:
    shared = f", shared with {text(', '.join(r['shared_with']))}" if r.get("shared_with") else ""
    if "image_id" in r:
        grantees = f" ({text(', '.join(r['grantees']))})" if r.get("grantees") else ""
        return (
            f"**Published** image {code(r['image_id'])} named {code(r['name'])} to {text(r['kind'])} cloud "
            f"{code(r['destination'])} at {code(r['location'])}: {text(r['vis'])}{shared}{grantees}; "
            f"made from the artifact with sha256 {code(r['sha256'])}."
        )
    return (
        f"**Published** {code(r['key'])} to bucket {code(r['bucket'])} at {code(r['endpoint'])}: "
        f"{text(r['vis'])} ({text(r['acl'])}){shared}; {_size(r['size_bytes'])}, sha256 {code(r['sha256'])}."
    )


def _any(r: dict[str, Any]) -> str:
    fields = [f"{text(k)} {code(v)}" for k, v in r.items() if isinstance(v, str | int | float | bool)]
    return "**Completed**: " + ("; ".join(fields) or "no result fields") + "."


SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "00-acquire": _acquire,
    "10-clean": _clean,
    "20-migrate": _migrate,
    "25-secrets": _secrets,
    "30-bootable": _bootable,
    "40-export": _export,
    "50-verify": _verify,
    "60-publish": _publish,
}


def completed(stage: str, result: dict[str, Any]) -> str:
    """The summary of a completed stage, from the result it recorded."""
    try:
        body = SUMMARIES.get(stage, _any)(result)
    except (KeyError, TypeError, ValueError):  # a result from an older version of the stage
        body = _any(result)
    return f"## Summary\n\n{body}"


def failed(stage: str, error: str) -> str:
    """The summary of a failed attempt: the error, and where the notebook shows it."""
    return (
        f"## Summary\n\n**This attempt at {text(stage)} failed**: {text(error)}\n\n"
        "The cell that raised is marked below; the run resumes at this stage."
    )


def insert(notebook: Path, markdown: str) -> None:
    """Put ``markdown`` under the notebook's title cell (first if it has none), replacing an
    earlier summary, so it is the first thing read after the title."""
    nb = nbformat.read(notebook, as_version=4)
    nb.cells = [c for c in nb.cells if TAG not in c.get("metadata", {}).get("tags", [])]
    # Under the first heading, past any banners before it (papermill's, on a failed notebook).
    at = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            break
        if cell.source.startswith("#"):
            at = i + 1
            break
    nb.cells.insert(at, nbformat.v4.new_markdown_cell(markdown, metadata={"tags": [TAG]}))
    nbformat.write(nb, notebook)
