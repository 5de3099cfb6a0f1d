"""Fuzzed images: the KVM sample (ext3, partitionless), and the same disk as qcow2 and as a
monolithicSparse VMDK, mutated where their metadata is, each exported through the CLI.

A case is (seed, kind, mutations): bit flips, byte values and block swaps, each at an offset
into a named region (the ext superblock, group descriptors, bitmaps, the used part of the inode
table, a directory's or a key file's inode, directory blocks, indirect blocks, the journal; the
qcow2 header, L1, L2 and refcount tables; the VMDK header, descriptor, grain directory and
table). Regions are found on the pristine image with e2fsprogs' own dumpe2fs and debugfs and the
container headers' documented layouts, so a mutation names what it hits and replays on a sample
rebuilt later. Every case must end within its bounds on time and tree memory with exit 0 and a
verified artifact, or a one-line ``imaging:`` error and no exception but the product's own in
its notebooks; and the host as it was (no mount, loop device, process or stray file left).

Each case is ``imaging export`` (to qcow2), the CLI's ``main`` run in a fork of a worker that
imported the CLI and compiled its page templates once (bounded.warm_cli): a new Python doing
that again for every case cost about 0.8 s of a case's 4.4 s of CPU, and a thousand cases must
fit in a part of an hour on two cores. All the run starts (its zygote, kernels and tools)
starts as in any run; a share of cases (``--boot-share``) also runs 50-verify's boot.

    python -m tests.campaigns.fuzz_images --cases 1000 --seed 1 --jobs 2

A case that fails is written to the corpus (tests/data/fuzz-corpus/, one small JSON file each);
``--corpus-only`` replays just those, and the short form (tests/integration/test_fuzz.py) always
replays them too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imaging import errors
from imaging.samples import catalog, kvm
from tests.integration.bounded import CASE_SECONDS, TREE_MEMORY, Measured, measured_cli, parameters, warm_cli
from tests.integration.conftest import leftovers

CORPUS = Path(__file__).resolve().parents[1] / "data" / "fuzz-corpus"
KINDS = ("ext", "qcow2", "vmdk")
# Held by a case that boots: two campaigns (or a campaign and the short form) never boot at once.
BOOT_LOCK = Path(tempfile.gettempdir()) / "imaging-fuzz-boot.lock"
UNBOOTED = "export-unbooted"  # the pipeline of a case that does not boot (parameters_for)
# The artifact's format: qcow2's checksum reads the data only, where a raw disk's reads every byte
# of the virtual size (1.7 GB: over a second of a case's 4-5 s of CPU).
FORMAT = "qcow2"
ARTIFACT = f"fuzz.{FORMAT}"
# Paths whose inode and first data block are mutated: what every stage reads or the boot needs.
DIRECTORIES = ("/", "/etc", "/bin", "/sbin", "/boot", "/lib", "/var", "/var/log", "/root", "/lost+found")
FILES = ("/etc/fstab", "/etc/inittab", "/etc/os-release", "/sbin/init", "/bin/busybox")
# Exceptions a stage may end with: the product's own (imaging/errors.py), each a one-line refusal.
ALLOWED = {
    name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)
}
OPS = ("flip",) * 5 + ("set",) * 2 + ("swap",)
VALUES = (0x00, 0xFF, 0x7F, 0x80, 0x01)


@dataclass(frozen=True)
class Region:
    offset: int
    length: int


@dataclass(frozen=True)
class Case:
    seed: str
    kind: str
    mutations: tuple[dict[str, Any], ...]
    boot: bool = True  # the whole export, 50-verify's boot included; else the stages before it

    def describe(self) -> str:
        return (f"{self.kind} seed={self.seed}{'' if self.boot else ' unbooted'} "
                + json.dumps(list(self.mutations), separators=(",", ":")))  # fmt: skip


@dataclass
class Outcome:
    case: Case
    verdict: str  # survived | refused | failed
    why: str  # the refusal's line, or what went wrong
    code: int
    seconds: float
    peak_rss: int
    peak_group: int | None
    stderr_tail: str = ""
    problems: list[str] = field(default_factory=list)


# -- the regions ----------------------------------------------------------------------------


def _run(argv: list[str | os.PathLike[str]], input: str | None = None) -> str:
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          input=input).stdout  # fmt: skip


def ext_regions(image: Path) -> dict[str, Region]:
    """The ext filesystem's metadata in ``image``, as e2fsprogs reports it."""
    head = _run(["dumpe2fs", image])
    block = int(re.search(r"^Block size:\s+(\d+)", head, re.M).group(1))  # type: ignore[union-attr]
    inode_size = int(re.search(r"^Inode size:\s+(\d+)", head, re.M).group(1))  # type: ignore[union-attr]
    group0 = head[head.index("Group 0:") : head.index("Group 1:")]
    group1 = head[head.index("Group 1:") : head.index("Group 2:")]

    def at(text: str, what: str) -> tuple[int, int]:
        m = re.search(what + r" at (\d+)(?:-(\d+))?", text)
        assert m, what
        return int(m.group(1)), int(m.group(2) or m.group(1))

    used = re.search(r"Free inodes: (\d+)-", group0)
    used_inodes = int(used.group(1)) - 1 if used else 1
    table = at(group0, "Inode table")[0]
    regions = {
        "superblock": Region(1024, 1024),
        "gdt": Region(at(group0, "Group descriptors")[0] * block, block),
        "block-bitmap": Region(at(group0, "Block bitmap")[0] * block, block),
        "inode-bitmap": Region(at(group0, "Inode bitmap")[0] * block, block),
        "inode-table": Region(table * block, used_inodes * inode_size),
        "backup-superblock": Region(at(group1, "Backup superblock")[0] * block, 1024),
    }
    paths = [*DIRECTORIES, *FILES]
    script = "".join(f"imap {p}\nblocks {p}\n" for p in paths) + "stat <8>\n"
    kernels = [
        line.split("/")[5]
        for line in _run(["debugfs", "-R", "ls -p /boot", image]).splitlines()
        if "/vmlinuz-" in line
    ]
    script += "".join(f"stat /boot/{k}\n" for k in kernels[:1])
    out = _run(["debugfs", "-f", "-", image], input=script)
    for chunk in out.split("debugfs: ")[1:]:
        command, _, text = chunk.partition("\n")
        verb, _, arg = command.partition(" ")
        if verb == "imap" and (m := re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", text)):
            regions[f"inode:{arg}"] = Region(int(m.group(1)) * block + int(m.group(2), 16), inode_size)
        elif verb == "blocks" and text.split() and text.split()[0].isdigit():
            regions[f"{'dir' if arg in DIRECTORIES else 'data'}:{arg}"] = Region(
                int(text.split()[0]) * block, block
            )
        elif verb == "stat":
            indirect = re.findall(r"\((D?IND)\):(\d+)", text)
            name = "journal" if arg == "<8>" else "kernel"
            if arg == "<8>" and (first := re.search(r"\(0(?:-\d+)?\):(\d+)", text)):
                regions["journal-superblock"] = Region(int(first.group(1)) * block, 1024)
                regions["journal-blocks"] = Region(int(first.group(1)) * block, 4 * block)
            for kind, number in indirect[:2]:
                regions[f"{kind.lower()}:{name}"] = Region(int(number) * block, block)
    return regions


def _mapped(container: Path, fmt: str, regions: dict[str, Region]) -> dict[str, Region]:
    """The ext regions inside a qcow2 or VMDK, where the container keeps their bytes."""
    extents = json.loads(_run(["qemu-img", "map", "--output=json", "-f", fmt, container]))
    found = {}
    for name, r in regions.items():
        for e in extents:
            if (
                e.get("data")
                and "offset" in e
                and e["start"] <= r.offset
                and r.offset + r.length <= e["start"] + e["length"]
            ):
                found[f"ext:{name}"] = Region(e["offset"] + r.offset - e["start"], r.length)
                break
    return found


def qcow2_regions(image: Path) -> dict[str, Region]:
    with open(image, "rb") as f:
        head = f.read(104)
        fields = struct.unpack(">4sIQIIQIIQQIIQ", head[:72])
        cluster = 1 << fields[4]
        l1_size, l1_offset, refcount_offset = fields[7], fields[8], fields[9]
        header_length = struct.unpack(">I", head[100:104])[0] if fields[1] >= 3 else 72
        regions = {
            "qcow2:header": Region(0, header_length),
            "qcow2:header-extensions": Region(header_length, 256),
            "qcow2:l1": Region(l1_offset, l1_size * 8),
        }
        f.seek(refcount_offset)
        table = struct.unpack(f">{cluster // 8}Q", f.read(cluster))
        used = max((i for i, v in enumerate(table) if v), default=0) + 1
        regions["qcow2:refcount-table"] = Region(refcount_offset, used * 8)
        if table[0]:
            regions["qcow2:refcount-block"] = Region(table[0], 512)
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(l1_size * 8))
        for i, entry in enumerate(e & 0x00FFFFFFFFFFFE00 for e in l1[:2]):
            if entry:
                regions[f"qcow2:l2-{i}"] = Region(
                    entry, 1024
                )  # the first 1024 entries' bytes: where the data is
    return regions


def vmdk_regions(image: Path) -> dict[str, Region]:
    with open(image, "rb") as f:
        head = f.read(512)
        _magic, _version, _flags, capacity, grain, desc_offset, desc_size, per_gt, rgd, gd = struct.unpack(
            "<4sIIQQQQIQQ", head[:64]
        )
        f.seek(desc_offset * 512)
        descriptor = f.read(desc_size * 512).rstrip(b"\0")
        tables = -(-capacity // (grain * per_gt))
        f.seek(gd * 512)
        first_table = struct.unpack("<I", f.read(4))[0]
    return {
        "vmdk:header": Region(0, 80),
        "vmdk:descriptor": Region(desc_offset * 512, len(descriptor)),
        "vmdk:grain-directory": Region(gd * 512, tables * 4),
        "vmdk:redundant-grain-directory": Region(rgd * 512, tables * 4),
        "vmdk:grain-table-0": Region(first_table * 512, per_gt * 4),
    }


def _fixed_cid(image: Path) -> None:
    """qemu-img writes a random CID, of varying length, into the descriptor: fixed here, so that
    an offset into the descriptor means the same byte in every campaign."""
    with open(image, "r+b") as f:
        head = f.read(512)
        desc_offset, desc_size = struct.unpack("<QQ", head[28:44])
        f.seek(desc_offset * 512)
        text = f.read(desc_size * 512)
        fixed = re.sub(rb"\bCID=[0-9a-f]+", b"CID=0badc0de", text, count=1)
        f.seek(desc_offset * 512)
        f.write(fixed.rstrip(b"\0").ljust(len(text), b"\0"))


@dataclass
class Bases:
    """The pristine image of each kind, and its regions."""

    images: dict[str, Path]
    regions: dict[str, dict[str, Region]]


def make_bases(work: Path) -> Bases:
    raw = catalog.ensure_sample("kvm")
    ext = ext_regions(raw)
    qcow2, vmdk = work / "base.qcow2", work / "base.vmdk"
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    _run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw, vmdk])
    _fixed_cid(vmdk)
    return Bases(
        {"ext": raw, "qcow2": qcow2, "vmdk": vmdk},
        {
            "ext": {f"ext:{k}": v for k, v in ext.items()},
            "qcow2": {**qcow2_regions(qcow2), **_mapped(qcow2, "qcow2", ext)},
            "vmdk": {**vmdk_regions(vmdk), **_mapped(vmdk, "vmdk", ext)},
        },
    )


# -- the cases ------------------------------------------------------------------------------


def _offset(rng: random.Random, length: int) -> int:
    """An offset into a region, nearer its start more often: where a table's used entries, a
    directory's names and a header's fields are (the rest is mostly padding)."""
    return min(int(length * rng.random() ** 2), length - 1)


def make_case(seed: str, regions: dict[str, dict[str, Region]], boot_share: float = 1.0) -> Case:
    """Case ``seed``: its kind and mutations follow from the seed alone; whether it boots, from
    the seed and ``boot_share`` (the share of cases that run 50-verify)."""
    rng = random.Random(seed)
    boot = rng.random() < boot_share
    kind = rng.choice(KINDS)
    names = sorted(regions[kind])
    if kind != "ext":
        # Half the mutations at the container's own tables, half at the filesystem inside it.
        own = [n for n in names if not n.startswith("ext:")]
        names = own * max(1, (len(names) - len(own)) // len(own)) + [
            n for n in names if n.startswith("ext:")
        ]
    mutations = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        where = rng.choice(names)
        region = regions[kind][where]
        op = rng.choice(OPS)
        if op == "swap":
            other = rng.choice(names)
            length = min(rng.choice((16, 64, 256, 4096)), region.length, regions[kind][other].length)
            mutations.append({"op": "swap", "where": where, "at": _offset(rng, region.length - length + 1),
                              "other": other, "other_at": _offset(rng, regions[kind][other].length - length + 1),
                              "length": length})  # fmt: skip
        elif op == "set":
            mutations.append({"op": "set", "where": where, "at": _offset(rng, region.length),
                              "value": rng.choice(VALUES)})  # fmt: skip
        else:
            mutations.append({"op": "flip", "where": where, "at": _offset(rng, region.length),
                              "bit": rng.randrange(8)})  # fmt: skip
    return Case(seed, kind, tuple(mutations), boot)


def mutate(case: Case, bases: Bases, dest: Path) -> None:
    """The case's image at ``dest``: a sparse copy of its base with the mutations applied."""
    _run(["cp", "--sparse=always", bases.images[case.kind], dest])
    regions = bases.regions[case.kind]
    with open(dest, "r+b") as f:
        for m in case.mutations:
            if m["where"] not in regions:
                raise KeyError(f"region {m['where']} is not in this {case.kind} image (the sample changed?)")
            offset = regions[m["where"]].offset + m["at"]
            if m["op"] == "flip":
                byte = os.pread(f.fileno(), 1, offset)[0]
                os.pwrite(f.fileno(), bytes([byte ^ (1 << m["bit"])]), offset)
            elif m["op"] == "set":
                os.pwrite(f.fileno(), bytes([m["value"]]), offset)
            else:
                other = regions[m["other"]].offset + m["other_at"]
                a, b = os.pread(f.fileno(), m["length"], offset), os.pread(f.fileno(), m["length"], other)
                os.pwrite(f.fileno(), b, offset)
                os.pwrite(f.fileno(), a, other)
    dest.chmod(0o444)  # a source: the pipeline must never write to it


# -- one case, exported and judged ----------------------------------------------------------


def _notebook_errors(runs: Path) -> list[str]:
    """Exceptions in the run's executed notebooks that are not the product's own refusals."""
    found = []
    for notebook in runs.glob("*/notebooks/*.ipynb"):
        try:
            cells = json.loads(notebook.read_text())["cells"]
        except (OSError, ValueError, KeyError) as e:
            found.append(f"{notebook.name}: unreadable ({e})")
            continue
        for cell in cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error" and out.get("ename") not in ALLOWED:
                    found.append(f"{notebook.name}: {out.get('ename')}: {str(out.get('evalue'))[:200]}")
    return found


def judge(
    case: Case, m: Measured, where: Path, source: Path, before: tuple[int, int], limit: float
) -> Outcome:
    runs, out, tmp = where / "runs", where / "out", where / "tmp"
    lines = m.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    problems = []
    if m.timed_out or m.seconds >= limit:
        problems.append(f"hang: still running after {limit:.0f} s")
    if m.code not in (0, 1, 2, 3):
        problems.append(f"exit {m.code}")
    if "Traceback" in m.stderr:
        problems.append("a traceback on stderr")
    problems += [f"in a notebook: {e}" for e in _notebook_errors(runs)]
    if m.peak_group is not None and m.peak_group > TREE_MEMORY:
        problems.append(f"tree memory {m.peak_group >> 20} MiB")
    problems += [f"outlived the run: {p}" for p in m.outlived]
    # A sandbox group a run leaves is under its own groups (a group is made under its maker's):
    # one elsewhere is another test's on this host, a killed run's that its resume removes.
    problems += [
        p for p in leftovers(where) if not p.startswith("control group: ") or not m.box or f"/{m.box}/" in p
    ]
    problems += [f"left in TMPDIR: {p.name}" for p in tmp.iterdir()] if tmp.is_dir() else []
    if (source.stat().st_size, source.stat().st_mtime_ns) != before:
        problems.append("the source changed")
    made = sorted(p.name for p in out.iterdir())
    if m.code == 0:
        verdict, why = "survived", "exported"
        try:
            result = json.loads(m.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {}
        artifact = Path(str(result.get("path")))
        if not artifact.is_file() or (out / f"{ARTIFACT}.sha256").read_text().split()[:1] != [
            result.get("sha256")
        ]:
            problems.append(f"exit 0 without its artifact and checksum: {m.stdout[-300:]!r}")
        elif case.boot and result.get("verified") is not True:
            problems.append(f"exit 0, the artifact not verified: {m.stdout[-300:]!r}")
        if made != [ARTIFACT, f"{ARTIFACT}.sha256"]:
            problems.append(f"--out holds {made}")
    else:
        verdict, why = "refused", re.sub(r" \(run \S+; resume with: .*\)$", "", last)
        if not last.startswith("imaging: "):
            problems.append(f"the last line of stderr is not imaging's: {last[:200]!r}")
        # A degraded boot keeps its artifact (exit 3), and so does a failed one: the run resumes
        # at 50-verify with it. Before the boot check, nothing may be left.
        complete = [ARTIFACT, f"{ARTIFACT}.sha256"]
        if made and not (made == complete and (m.code == 3 or _refused_in(why) == "refused in 50-verify")):
            problems.append(f"nothing should be in --out after this refusal, found {made}")
    # What a person needs to see of a failure: the traceback where there is one.
    tail = (
        m.stderr[m.stderr.find("Traceback") :][:4000] if "Traceback" in m.stderr else "\n".join(lines[-8:])
    )
    return Outcome(case, "failed" if problems else verdict, "; ".join(problems) or why, m.code, m.seconds,
                   m.peak_rss, m.peak_group, tail, problems)  # fmt: skip


def parameters_for(work: Path) -> Path:
    """The project's parameters, plus the pipeline of an unbooted case: every stage of an
    export but the boot check."""
    target = parameters(work)
    defaults = yaml.safe_load((target / "defaults.yaml").read_text())
    defaults["pipelines"][UNBOOTED] = [s for s in defaults["pipelines"]["export"] if s != "50-verify"]
    (target / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    return target


def run_case(
    case: Case, bases: Bases, work: Path, limit: float = CASE_SECONDS, keep: bool = False
) -> Outcome:
    where = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    try:
        for d in ("runs", "out", "tmp"):
            (where / d).mkdir()
        source = where / f"source.{'raw' if case.kind == 'ext' else case.kind}"
        mutate(case, bases, source)
        before = (source.stat().st_size, source.stat().st_mtime_ns)
        env = {**os.environ, "IMAGING_RUNS": str(where / "runs"), "IMAGING_PROGRESS": "0",
               "TMPDIR": str(where / "tmp"), "IMAGING_PARAMETERS": str(work / "parameters")}  # fmt: skip
        args = ["export", str(source), "--name", "fuzz", "--format", FORMAT, "--profile", "generic",
                "--boot-marker", kvm.MARKER, "--out", str(where / "out"), "--kind", "export" if case.boot else UNBOOTED]  # fmt: skip
        with open(BOOT_LOCK, "a") as lock:
            if case.boot:  # one boot at a time on this host, whatever else runs
                fcntl.flock(lock, fcntl.LOCK_EX)
            m = measured_cli(args, env, limit, warm=True)
        return judge(case, m, where, source, before, limit)
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", where], check=False)


# -- the corpus and the campaign ------------------------------------------------------------


def corpus_cases(corpus: Path = CORPUS) -> list[tuple[str, Case]]:
    cases = []
    for path in sorted(corpus.glob("*.json")):
        spec = json.loads(path.read_text())
        cases.append(
            (path.name, Case(spec["seed"], spec["kind"], tuple(spec["mutations"]), spec.get("boot", True)))
        )
    return cases


def keep_failure(outcome: Outcome, corpus: Path = CORPUS) -> Path:
    """A failed case into the corpus: its spec (not its image) and what it found."""
    corpus.mkdir(parents=True, exist_ok=True)
    case = outcome.case
    path = corpus / f"{case.kind}-{re.sub(r'[^A-Za-z0-9]+', '-', case.seed)}.json"
    spec = {**asdict(case), "mutations": list(case.mutations), "found": outcome.why, "exit": outcome.code,
            "stderr_tail": outcome.stderr_tail}  # fmt: skip
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def campaign(cases: list[Case], bases: Bases, work: Path, jobs: int, limit: float = CASE_SECONDS,
             log: Any = sys.stderr) -> list[Outcome]:  # fmt: skip
    """Every case, ``jobs`` at once; on Ctrl-C, the cases done so far (the running ones are
    stopped with their control groups)."""
    parameters_for(work)
    outcomes: list[Outcome] = []
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=warm_cli) as pool:
        futures = {pool.submit(run_case, c, bases, work, limit): c for c in cases}
        try:
            for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
                o = future.result()
                outcomes.append(o)
                print(f"[{n}/{len(cases)}] {o.verdict} in {o.seconds:.1f} s, exit {o.code}: {o.case.describe()}\n"
                      f"    {o.why[:300]}", file=log, flush=True)  # fmt: skip
                if o.verdict == "failed":
                    print("    | " + o.stderr_tail.replace("\n", "\n    | "), file=log, flush=True)
        except KeyboardInterrupt:
            print(f"fuzz: interrupted after {len(outcomes)} cases", file=log, flush=True)
            for f in futures:
                f.cancel()
    return outcomes


def _refused_in(line: str) -> str:
    stage = re.match(r"imaging: error: (\d\d-[a-z]+): ", line)
    return f"refused in {stage.group(1)}" if stage else "refused before the run"


def summary(outcomes: list[Outcome], wall: float) -> str:
    counts = Counter(o.verdict for o in outcomes)
    where = Counter((_refused_in(o.why) if o.verdict == "refused" else o.verdict) for o in outcomes)
    kinds = Counter(f"{o.case.kind} {o.verdict}" for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.seconds)
    hungriest = max(outcomes, key=lambda o: o.peak_group or o.peak_rss)
    lines = [
        f"cases run: {len(outcomes)} in {wall:.0f} s",
        f"survived (exported; booted and verified: {sum(o.case.boot for o in outcomes if o.verdict == 'survived')}): "
        f"{counts['survived']}",
        f"refused with a one-line error: {counts['refused']}",
        f"failed: {counts['failed']}",
        f"worst time: {slowest.seconds:.1f} s ({slowest.verdict}: {slowest.case.describe()[:160]})",
        f"worst tree memory: control group peak {(hungriest.peak_group or 0) >> 20} MiB, "
        f"summed RSS {max(o.peak_rss for o in outcomes) >> 20} MiB",
        "by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(where.items())),
        "by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    ]
    survived = [o.seconds for o in outcomes if o.verdict == "survived"]
    refused = [o.seconds for o in outcomes if o.verdict == "refused"]
    if survived:
        lines.append(f"survivors' mean time {sum(survived) / len(survived):.1f} s")
    if refused:
        lines.append(f"refusals' mean time {sum(refused) / len(refused):.1f} s")
    lines += [f"FAILED: {o.case.describe()}: {o.why}" for o in outcomes if o.verdict == "failed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.campaigns.fuzz_images", description=__doc__.splitlines()[0]
    )
    p.add_argument("--cases", type=int, default=1000, help="new cases to run (besides the corpus)")
    p.add_argument("--seed", default="1", help="the campaign's seed: case i's is SEED:i")
    p.add_argument("--jobs", type=int, default=2, help="cases at once")
    p.add_argument("--boot-share", type=float, default=1.0,
                   help="share of the new cases that run the whole export, boot included (the rest stop after 40-export)")  # fmt: skip
    p.add_argument("--case-seconds", type=float, default=CASE_SECONDS, help="one case's time limit")
    p.add_argument(
        "--corpus", type=Path, default=CORPUS, help="where failed cases are kept and replayed from"
    )
    p.add_argument("--no-corpus", action="store_true", help="do not replay the corpus")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (the export's loop mounts and the control groups that bound each case)")
    work = Path(tempfile.mkdtemp(prefix="fuzz-images-", dir=args.work))
    try:
        t0 = time.monotonic()
        bases = make_bases(work)
        replayed = [] if args.no_corpus else [c for _, c in corpus_cases(args.corpus)]
        new = [make_case(f"{args.seed}:{i}", bases.regions, args.boot_share) for i in range(args.cases)]
        print(f"fuzz: {len(new)} new cases (seed {args.seed}), {len(replayed)} from the corpus, {args.jobs} at once",
              file=sys.stderr)  # fmt: skip
        outcomes = campaign(replayed + new, bases, work, args.jobs, args.case_seconds)
        for o in outcomes:
            if o.verdict == "failed" and o.case not in replayed:
                print(f"kept in the corpus: {keep_failure(o, args.corpus)}", file=sys.stderr)
        print(summary(outcomes, time.monotonic() - t0))
        return 1 if any(o.verdict == "failed" for o in outcomes) else 0
    finally:
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    sys.exit(main())
