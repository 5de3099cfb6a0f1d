"""Command line: ``python -m imaging export|convert|resume|verify|sample|audit|report|serve|worker|db|users``.

``export`` and ``convert`` print, as their last line on stdout, one JSON object describing the
result (``path``, ``sha256``, ``format``, ``target``, ``run``, ``verified``, ...); everything
else goes to stderr.
Errors are one line on stderr: exit 2 for bad parameters or input, 1 for a failed stage,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from imaging import config
from imaging.errors import ImagingError, ParameterError, SourceError, SpaceError, StoreError
from imaging.run.request import Request


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=False) + "\n")
    sys.stdout.flush()


def _export(args: argparse.Namespace) -> int:
    from imaging import sparse
    from imaging.clouds import acquire
    from imaging.clouds import settings as cloud_settings
    from imaging.run import pipeline, preflight

    target, fmt = "", "qcow2"
    if args.kind == "image":  # made for where it is published, unless the options say
        target, fmt = cloud_settings.image_machine(cloud_settings.from_environment(), args.destination)
    request = Request.create(
        source=args.source,
        name=args.name,
        format=args.format or fmt,
        target=args.target or target or None,
        out=str(Path(args.out).resolve()) if args.out else "",
        snapshots=args.snapshots,
        layout=args.layout,
        firmware=args.firmware,
        placement=args.placement,
        disk_size=args.disk_size,
        fs_type=args.fs_type,
        grub_timeout=args.grub_timeout,
        kernel_args=args.kernel_args,
        boot_timeout=args.boot_timeout,
        boot_marker=args.boot_marker,
        keep_work=True if args.keep_work else None,
        accel=args.accel,
        profile=args.profile,
        platforms=_words(args.platforms),
        clean=_words(args.clean),
        remove_users=_words(args.remove_users),
        xen_console=args.xen_console,
        runlevel=args.runlevel,
        selinux=args.selinux,
        enforcing_arg=True if args.enforcing_arg else None,
        root_password_hash_file=args.root_password_hash_file,
        packages_install=_words(args.install),
        packages_remove=_words(args.remove),
        packages_room=args.packages_room,
        kernel=args.kernel,
        secrets=args.secrets,
        secrets_allow=args.allow_secret or None,
        **_format_options(args),
        kind=args.kind,
        vis=args.vis,
        shared_with=args.shared_with,
        destination=args.destination,
    )
    if args.run is not None:
        config.check_run_id(args.run)
    if args.run is None or not (config.runs_dir() / args.run).exists():
        # Everything that can be told before a run exists fails here, leaving nothing behind.
        src = acquire.inspect(request.source)
        preflight.check_export(request, src)  # the format's size limit, the MBR's
        sparse.check_space(config.runs_dir(), 2 * src.data_bytes + (64 << 20), "hold the run's work files")
        if request.out:
            sparse.check_space(Path(request.out), src.data_bytes + (64 << 20), "write the artifact")
    ws, request = pipeline.open_run(args.run, request)
    return _execute(ws, request)


def _words(value: str | None) -> list[str] | None:
    """``a,b,-c`` -> ``["a", "b", "-c"]``; None when the option was not given."""
    return None if value is None else [w for w in value.replace(",", " ").split() if w]


def _format_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "vmdk_subformat": args.vmdk_subformat,
        "compress": True if args.compress else None,
        "ovf_version": args.ovf_version,
    }


def _convert(args: argparse.Namespace) -> int:
    from imaging.formats import export, limits
    from imaging.run import pipeline

    disk = Path(args.disk)
    name = args.name or disk.name.split(".", 1)[0]
    request = Request.create(
        kind="convert-verify" if args.verify else "convert",
        source=str(disk.resolve()) if disk.exists() else str(disk),
        name=name,
        format=args.format,
        target=args.target,
        out=str(Path(args.out).resolve()),
        boot_timeout=args.boot_timeout,
        boot_marker=args.boot_marker,
        accel=args.accel,
        **_format_options(args),
    )
    # Everything that can be told before a run exists fails here, leaving nothing behind: a
    # missing or unreadable disk, one qemu-img cannot read, one that refers to other files, one
    # over the format's size limit.
    from imaging.sparse import check_space

    found = export.input_disk(None, request.kind, request.source)
    fmt = config.check_format(request.format)
    limits.check_fits(found.virtual_size, fmt, request.vmdk_subformat)
    artifact = export.artifact_path(Path(request.out), request.slug, fmt)
    if artifact == Path(found.path).resolve():
        raise ParameterError(f"{artifact} is the input disk itself: choose another --out or --name")
    check_space(Path(request.out), export.space_needed(found.data_bytes), "write the artifact")
    ws, request = pipeline.open_run(args.run, request)
    return _execute(ws, request)


def _execute(ws: Any, request: Any) -> int:
    from imaging.run import pipeline

    try:
        result = pipeline.execute(ws, request)
    except pipeline.StageFailed as e:
        _write_report(ws.root)
        pipeline.push_record(ws)
        print(
            f"imaging: error: {e} (run {ws.id}; resume with: python -m imaging resume {ws.id})",
            file=sys.stderr,
        )
        return 1
    _write_report(ws.root)
    unpushed = pipeline.push_record(ws)
    if unpushed:
        raise ImagingError(f"run {ws.id} completed, but its record is not all in the store: {unpushed}")
    _print_json(result)
    if (result.get("boot") or {}).get("verdict") == "degraded":
        # The artifact is made, but a user could not rely on it: say so, and exit non-zero.
        print(f"imaging: degraded boot: {result['boot'].get('reason')} (run {ws.id})", file=sys.stderr)
        return 3
    return 0


def _write_report(root: Path) -> None:
    """Every run ends with its report.html (completed or failed); a report that cannot be made
    is said on stderr and changes nothing about the run's outcome."""
    from imaging.run import report

    try:
        path = report.write(root)
    except Exception as e:  # nbconvert and friends raise many kinds
        print(f"imaging: no report for {root.name}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return
    print(f"imaging: report: {path}", file=sys.stderr, flush=True)


def _resume(args: argparse.Namespace) -> int:
    from imaging.run import pipeline

    ws, request = pipeline.open_run(args.run, None)
    # An admin's answer to the scan's findings (the service passes its policy on every resume).
    secrets = args.secrets or request.secrets
    allow = list(dict.fromkeys([*request.secrets_allow, *(args.allow_secret or [])]))
    if (secrets, allow) != (request.secrets, request.secrets_allow):
        request = pipeline.amend(ws, request, secrets=secrets, secrets_allow=allow)
    return _execute(ws, request)


def _add_secret_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("secret scan (25-secrets)")
    g.add_argument(
        "--secrets",
        choices=["auto", "fail", "warn", "clean", "off"],
        help="what a secret found in the guest does: fail, warn, clean (remove its file) or off "
        "(default auto: fail for a public image, warn otherwise)",
    )
    g.add_argument(
        "--allow-secret",
        metavar="FINGERPRINT",
        action="append",
        help="a finding's fingerprint (from 25-secrets) that is meant to be there; repeat for more",
    )


def _verify(args: argparse.Namespace) -> int:
    from imaging.boot import evidence, verify
    from imaging.formats import gce, ova

    # An OVA pins its machine, a GCE tarball is GCE's; any other disk boots where the default says.
    path = Path(args.path)
    if args.format:
        kind = args.format
    else:
        kind = "ova" if ova.is_ova(path) else "gce" if gce.is_gce(path) else "raw"
    target = args.target or config.default_target(kind if kind in ("ova", "gce") else "raw")
    result = verify.boot(
        args.path,
        target,
        marker=args.boot_marker,
        timeout=args.boot_timeout,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        prefer_accel=args.accel,
        expect=evidence.Expect(
            ssh=True if "ssh" in args.require else None, dhcp=True if "dhcp" in args.require else None
        ),  # fmt: skip
        fmt=args.format or "",
    )
    _print_json(result.to_dict())
    verify.require_booted(result)
    return 3 if result.verdict == "degraded" else 0


def _sample(args: argparse.Namespace) -> int:
    from imaging.samples import catalog

    print(catalog.ensure_sample(args.kind))
    return 0


FORMATS = "raw, qcow2, vmdk, vdi, vhd, vhdx, ova or gce"


def _add_format_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vmdk-subformat", choices=["streamOptimized", "monolithicSparse"],
                   help="for --format vmdk (default streamOptimized; an OVA always holds streamOptimized)")  # fmt: skip
    p.add_argument("--compress", action="store_true", help="compressed qcow2 (qemu-img -c, parallel)")
    p.add_argument("--ovf-version", choices=["1.0", "2.0"], help="for --format ova: 1.0 (SHA1, default) or 2.0 (SHA256)")  # fmt: skip


def _audit(args: argparse.Namespace) -> int:
    from imaging.run import audit
    from imaging.workspace import Workspace

    report = audit.verify(Workspace.open(args.run, create=False).root, args.head)
    _print_json(report.to_dict())
    print(f"imaging: {report.message}", file=sys.stderr)
    return 0 if report.ok else 1


def _report(args: argparse.Namespace) -> int:
    from imaging.run import report
    from imaging.workspace import Workspace

    if args.all == bool(args.runs):
        raise ParameterError("name one or more runs, or --all")
    directory = config.runs_dir()
    if args.all:
        roots = report.runs(directory) if directory.is_dir() else []
    else:
        roots = [Workspace.open(run, create=False).root for run in args.runs]
    pages = [str(report.write(root)) for root in roots]
    index = report.write_index(directory) if directory.is_dir() else None
    _print_json({"reports": pages, "index": str(index) if index else None})
    return 0


def _service_logging(log_format: str = "text") -> None:
    from imaging.service import logs

    logs.configure(log_format)


def _serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from imaging.service import api, schema, settings

    loaded = settings.load(args.config)
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.no_worker:
        changes["worker"] = loaded.worker.model_copy(update={"embedded": False})
    loaded = loaded.model_copy(update=changes)
    loaded.signing_key()  # refused now, not at the first mail, when hosts would not share it
    _service_logging(loaded.log_format)
    with schema.database(loaded, stop=True):
        app = api.create_app(loaded)
        worker = _embedded_worker(args.config) if loaded.worker.embedded else None
        workers = loaded.worker.concurrency if worker else 0
        where = "private PostgreSQL in the state directory" if loaded.private_database else "shared database"
        print(f"imaging: serving on http://{loaded.host}:{loaded.port} ({where}, {workers} embedded workers)",
              file=sys.stderr, flush=True)  # fmt: skip
        # uvicorn stops on SIGTERM, then raises it again with the handler that was there before:
        # this one, so that the worker and the private cluster are stopped below.
        signal.signal(signal.SIGTERM, _terminated)
        try:
            # Our own access log (api.py): uvicorn's would write approval tokens from query strings.
            uvicorn.run(app, host=loaded.host, port=loaded.port, access_log=False, log_config=None)
        except _Terminated:
            pass
        finally:
            if worker is not None:
                _stop(worker)
    return 0


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _embedded_worker(config_file: str | None) -> Any:
    """``serve``'s own worker: ``python -m imaging worker`` in a process of its own, which the
    kernel stops should ``serve`` die (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import subprocess

    def die_with_parent() -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)

    argv = [sys.executable, "-m", "imaging", "worker", *(["--config", config_file] if config_file else [])]
    return subprocess.Popen(argv, cwd=config.PROJECT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def _stop(proc: Any) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=150)  # its runs get 60 s each to clean up
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker(args: argparse.Namespace) -> int:
    from imaging.service import schema, settings, store, worker

    loaded = settings.load(args.config)
    loaded.signing_key()
    _service_logging(loaded.log_format)
    with schema.database(loaded, start=False) as url:
        return worker.serve_forever(loaded, store.Store(url), args.concurrency)


def _users(args: argparse.Namespace) -> int:
    from imaging.service import schema, settings, store

    loaded = settings.load(args.config)
    if args.action != "list":
        config.check_name(args.name)
        if args.action == "add" and args.email:
            settings.check_email(args.email)
    with schema.database(loaded) as url:
        db = store.Store(url)
        try:
            if args.action == "list":
                for u in db.users():
                    print(f"{u.name}\t{u.role}\t{u.email or '-'}")
                return 0
            if args.action == "add":
                token = db.add_user(args.name, admin=args.admin, email=args.email)
            else:
                token = db.new_token(args.name)
        finally:
            db.close()
    # The only time the token is shown: the store keeps its hash.
    print(token)
    return 0


def _db(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine

    from imaging.service import postgres, schema, settings

    loaded = settings.load(args.config)
    cluster = postgres.running(loaded.cluster()) if loaded.private_database else contextlib.nullcontext()
    with cluster:
        engine = create_engine(loaded.sqlalchemy_url)
        try:
            if args.action == "upgrade":
                before, after = schema.upgrade(engine)
                print(f"imaging: database schema {before or 'none'} -> {after}", file=sys.stderr)
            else:
                revision, _ = schema.current(engine)
                print(f"imaging: database schema {revision or 'none'} (this imaging: {schema.head()})",
                      file=sys.stderr)  # fmt: skip
                schema.require_current(engine)
        finally:
            engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imaging", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="run every stage: source image -> bootable, verified artifact")
    e.add_argument(
        "source",
        help="instance image (raw, qcow2, vmdk, vdi, vhd, vhdx), sample:kvm / sample:xen, or a cloud's "
        "instance: eucalyptus://CLOUD/i-..., ec2://CLOUD/i-..., openstack://CLOUD/SERVER-ID (clouds in $IMAGING_CLOUDS)",
    )
    e.add_argument(
        "--name",
        required=True,
        help="the image's name: 1-255 printable characters (files use a safe slug of it)",
    )
    e.add_argument(
        "--format", help=f"{FORMATS} (default qcow2; for --kind image, the destination cloud's image_format)"
    )
    e.add_argument(
        "--target",
        help=f"target machine ({', '.join(config.available('targets'))}; default: by format, virtualbox "
        "for ova and vdi, gce for gce, else kvm; for --kind image, the destination cloud's image_target)",
    )
    e.add_argument("--out", help="directory for the artifact (default: the run's out/)")
    e.add_argument("--run", help="run id (default: <name>-<UTC time>); an existing failed run resumes")
    e.add_argument(
        "--snapshots",
        choices=["drop", "keep"],
        help="a btrfs guest's snapshots (default drop: they predate cleaning)",
    )
    e.add_argument("--layout", choices=["aligned", "legacy"], help="partition 1 at 1 MiB, or at sector 63")
    e.add_argument(
        "--firmware",
        choices=["bios", "uefi", "hybrid"],
        help="what the disk boots under (default: hybrid where the target and the guest boot both; "
        "uefi uses the guest's signed shim and GRUB for Secure Boot where it has them)",
    )
    e.add_argument(
        "--placement", choices=["copy", "mkfs"], help="block-copy the filesystem, or mkfs + copy files"
    )
    e.add_argument("--disk-size", help="auto, a size (10G) or extra room (+1G)")
    e.add_argument(
        "--fs-type", choices=["keep", "ext2", "ext3", "ext4"], help="filesystem for --placement mkfs"
    )
    e.add_argument("--grub-timeout", type=int, help="GRUB menu timeout in seconds")
    e.add_argument("--kernel-args", help="extra kernel arguments for every menu entry")
    e.add_argument("--boot-timeout", type=int, help="time limit of the boot check, seconds")
    e.add_argument("--boot-marker", help="regular expression in the serial log that proves the boot")
    e.add_argument("--keep-work", action="store_true", help="keep work/ after a completed run")
    e.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="QEMU accelerator for the boot check")
    _add_secret_options(e)
    g = e.add_argument_group("clean and migrate (10-clean, 20-migrate)")
    g.add_argument("--profile", help=f"distro profile: auto or {', '.join(config.available('profiles'))}")
    g.add_argument(
        "--platforms",
        help="cloud platforms whose traces go, comma-separated (default atmosphere,eucalyptus)",
    )
    g.add_argument(
        "--clean", metavar="OPS", help="clean operations to add (name) or drop (-name), or all/none"
    )
    g.add_argument("--remove-users", metavar="USERS", help="accounts the user-account operation removes")
    g.add_argument(
        "--xen-console",
        choices=["serial", "remove"],
        help="move the Xen console's getty to ttyS0, or remove it",
    )
    g.add_argument("--runlevel", type=int, help="default runlevel to set in inittab (default: keep)")
    g.add_argument(
        "--selinux", choices=["disabled", "permissive", "keep"], help="SELinux mode (default disabled)"
    )
    g.add_argument("--enforcing-arg", action="store_true", help="add enforcing=0 to the kernel line")
    g.add_argument(
        "--root-password-hash-file",
        metavar="FILE",
        help="file holding root's new password as a crypt(3) hash",
    )
    g.add_argument(
        "--install", metavar="PACKAGES", help="packages to install in the guest (its own package manager)"
    )
    g.add_argument(
        "--remove", metavar="PACKAGES", help="packages to remove from the guest (before installing)"
    )
    g.add_argument(
        "--packages-room",
        metavar="SIZE",
        help="room the guest's filesystem is grown by for --install (sparse; default 2G)",
    )
    g.add_argument("--kernel", help="kernel version to boot (default: the newest that is not Xen-only)")
    _add_format_options(e)
    e.add_argument("--kind", help="pipeline: export (default), or image (export, then publish)")
    e.add_argument("--vis", choices=["public", "private", "selected"], help="image requests: visibility")
    e.add_argument("--shared-with", action="append", metavar="USER", help="with --vis selected (repeat)")
    e.add_argument("--destination", help="image requests: s3 (default) or a cloud named in $IMAGING_CLOUDS")
    e.set_defaults(func=_export)

    c = sub.add_parser("convert", help="the export stage alone: a bootable disk -> the artifact")
    c.add_argument(
        "disk", help="a bootable disk in any format qemu-img reads (raw, qcow2, vmdk, vdi, vhd, vhdx)"
    )
    c.add_argument("--format", required=True, help=FORMATS)
    c.add_argument("--out", required=True, help="directory for the artifact")
    c.add_argument("--name", help="artifact name (default: the disk's file name up to the first '.')")
    c.add_argument(
        "--target",
        help=f"target machine ({', '.join(config.available('targets'))}; default: by format, virtualbox "
        "for ova and vdi, gce for gce, else kvm; for --kind image, the destination cloud's image_target)",
    )
    c.add_argument("--verify", action="store_true", help="boot the artifact afterwards (stage 50-verify)")
    c.add_argument("--run", help="run id (default: <name>-<UTC time>); an existing failed run resumes")
    c.add_argument("--boot-timeout", type=int, help="time limit of the boot check, seconds")
    c.add_argument("--boot-marker", help="regular expression in the serial log that proves the boot")
    c.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="QEMU accelerator for the boot check")
    _add_format_options(c)
    c.set_defaults(func=_convert)

    r = sub.add_parser("resume", help="run a failed run again, from the stage that failed")
    r.add_argument("run", help="run id (a directory under runs/)")
    _add_secret_options(r)
    r.set_defaults(func=_resume)

    v = sub.add_parser("verify", help="boot any artifact on a target's hardware")
    v.add_argument("path")
    v.add_argument("--format", help=f"the artifact's format ({FORMATS}; default: what qemu-img finds, once the "
                   "image is known to refer to no other file)")  # fmt: skip
    v.add_argument(
        "--target", help="target machine (default: virtualbox for an OVA, gce for a GCE tar.gz, else kvm)"
    )
    v.add_argument(
        "--boot-marker", default="", help="regular expression proving the boot (besides a login prompt)"
    )
    v.add_argument("--boot-timeout", type=int, default=240)
    v.add_argument(
        "--log-dir", help="where to keep serial.log and screen.png (the screen at the end of the boot)"
    )
    v.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    v.add_argument(
        "--require",
        type=lambda s: [w for w in s.split(",") if w],
        default=[],
        help="what a booted verdict needs besides the marker or login prompt: ssh, dhcp (comma-separated; "
        "otherwise they are recorded if seen)",
    )
    v.set_defaults(func=_verify)

    s = sub.add_parser("sample", help="build (once) and print the path of a sample instance image")
    s.add_argument("kind", nargs="?", default="kvm")
    s.set_defaults(func=_sample)

    a = sub.add_parser("audit", help="verify a run's audit chain; names the file that changed, if one did")
    a.add_argument("run", help="run id (a directory under runs/) or path")
    a.add_argument("--head", help="the head hash the run is expected to have (from its completion mail)")
    a.set_defaults(func=_audit)

    rp = sub.add_parser("report", help="one HTML page per run for an auditor, and the index of all runs")
    rp.add_argument("runs", nargs="*", metavar="RUN", help="run id (a directory under runs/) or path")
    rp.add_argument("--all", action="store_true", help="every run under the runs directory")
    rp.set_defaults(func=_report)

    sv = sub.add_parser("serve", help="the request service: HTTP API, mails, and an embedded worker")
    sv.add_argument("--config", help="settings file (default: $IMAGING_CONFIG or <state dir>/service.yaml)")
    sv.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default 8080)")
    sv.add_argument(
        "--no-worker", action="store_true", help="no embedded worker: run `imaging worker` beside it"
    )
    sv.set_defaults(func=_serve)

    w = sub.add_parser("worker", help="run approved requests' jobs from the shared database (until SIGTERM)")
    w.add_argument("--config", help="settings file")
    w.add_argument("--concurrency", type=int, help="requests run at once (default: the settings')")
    w.set_defaults(func=_worker)

    d = sub.add_parser(
        "db", help="the service's database schema: upgrade it (migrations), or show its status"
    )
    d.add_argument("action", choices=["upgrade", "status"])
    d.add_argument("--config", help="settings file")
    d.set_defaults(func=_db)

    u = sub.add_parser("users", help="the service's users: add (prints the token once), token, list")
    u.add_argument("action", choices=["add", "token", "list"])
    u.add_argument("name", nargs="?", default="", help="user name")
    u.add_argument("--admin", action="store_true", help="add: an admin (approves requests)")
    u.add_argument("--email", help="add: address for the admins' mails")
    u.add_argument("--config", help="settings file")
    u.set_defaults(func=_users)
    return p


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` once the command is done, without the interpreter's teardown: freeing
    the modules of papermill, nbconvert and jupyter took 0.4-0.6 s of every command here. Exit
    handlers still run and the standard streams are flushed; with a thread of ours still
    working (not a daemon), the ordinary exit waits for it as always."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the ordinary way
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: as the ordinary exit would
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("imaging: interrupted; partial files removed", file=sys.stderr)
        return 130
    except (ParameterError, SourceError, SpaceError) as e:
        print(f"imaging: error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:  # a user that exists already (bad input), or no database (a failure)
        print(f"imaging: error: {e}", file=sys.stderr)
        return 2 if e.status < 500 else 1
    except ImagingError as e:
        print(f"imaging: error: {e}", file=sys.stderr)
        return 1
