"""What one device command carries, made to fit and proved complete (issue 24).

The GPU machine we borrow starts bare, reaches no package index and takes at most 64 MiB of
files per command (the tree plus the wheels beside it). Ray's wheel alone is 79 MB, of which
32 MB is the Java worker runtime (``ray/jars/``) that a Python job never loads, and 1.5 MB
the dashboard's source maps. So ``benchmarks/gpu_pipeline.sh prepare`` calls this module to:

* ``slim``: rewrite a wheel without those members, with a RECORD regenerated from what is
  left (pip checks each file's hash and size against it, so a ``zip -d`` alone leaves a
  RECORD that names missing files);
* ``check``: prove the closure (every ``Requires-Dist`` of every carried wheel, evaluated for
  the device's Python 3.12 on Linux x86-64 without extras, is carried or on the device
  image's package list, ``benchmarks/gpu_image_packages.txt``) and print the total a
  command carries, refusing above 60 MiB (the limit is 64: room for a results file or two).

Kept in Python, not shell, so that tests/test_gpu_carry.py can check it on built wheels.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
IMAGE_LIST = REPO / "benchmarks" / "gpu_image_packages.txt"
#: The refusal line: the device takes 64 MiB a command; 4 MiB stay free for what changes.
LIMIT_MIB = 60.0
#: The device's interpreter (KINDS.md: Python 3.12.3 at /opt/torch/.venv) on Linux x86-64.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def drop_from_ray(name: str) -> bool:
    """Members of Ray's wheel a Python job on one machine never reads."""
    return name.startswith("ray/jars/") or name.endswith(".js.map")


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _record_name(names: Iterable[str]) -> str:
    (record,) = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    return record


def slim_wheel(src: Path, dst: Path, drop: Callable[[str], bool] = drop_from_ray) -> int:
    """Write ``src`` without the members ``drop`` names, RECORD regenerated; bytes saved.

    Writing to a new file (not ``zip -d`` in place) keeps the original intact if anything
    fails half-way; ``dst`` may be ``src``'s final name once the new file is complete.
    """
    tmp = dst.with_name(dst.name + ".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        record = _record_name(zin.namelist())
        rows = []
        for info in zin.infolist():
            if info.filename == record or drop(info.filename) or info.is_dir():
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            rows.append((info.filename, _record_hash(data), str(len(data))))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(rows)
        w.writerow((record, "", ""))
        zout.writestr(record, buf.getvalue())
    before = src.stat().st_size
    os.replace(tmp, dst)
    if dst != src and src.exists():
        src.unlink()
    return before - dst.stat().st_size


def record_problems(wheel: Path) -> list[str]:
    """What pip's install check would object to: RECORD rows vs the zip's members."""
    with zipfile.ZipFile(wheel) as z:
        record = _record_name(z.namelist())
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        members = {i.filename for i in z.infolist() if not i.is_dir()}
        bad = [f"in RECORD, not in the wheel: {n}" for n in sorted(rows.keys() - members)]
        bad += [f"in the wheel, not in RECORD: {n}" for n in sorted(members - rows.keys())]
        for n in sorted(members & rows.keys()):
            if n == record:
                continue
            _, h, size = rows[n]
            data = z.read(n)
            if h != _record_hash(data) or size != str(len(data)):
                bad.append(f"hash or size differs: {n}")
    return bad


def wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """(canonical name, Requires-Dist lines) from the wheel's own top-level METADATA.

    Only ``<name>-<version>.dist-info/METADATA`` at the root counts: Ray vendors aiohttp and
    others under ``ray/_private/.../thirdparty_files`` with their own METADATA files.
    """
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        msg = HeaderParser().parsestr(z.read(meta).decode("utf-8"))
    return canonicalize_name(msg["Name"]), msg.get_all("Requires-Dist") or []


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    """The device image's package names (one a line; ``#`` starts a comment)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def missing_requirements(wheels: Iterable[Path], image: set[str]) -> list[str]:
    """``"wheel needs req"`` for each requirement neither carried nor on the image."""
    metas = [(w, *wheel_metadata(w)) for w in wheels]
    carried = {name for _, name, _ in metas}
    missing = []
    for w, _, reqs in metas:
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
                continue
            name = canonicalize_name(req.name)
            if name not in carried and name not in image:
                missing.append(f"{w.name} needs {line}")
    return missing


def duplicate_wheels(wheels: Iterable[Path]) -> list[str]:
    """Names carried twice: two versions of one package stop the whole install."""
    seen: dict[str, str] = {}
    dups = []
    for w in wheels:
        name = canonicalize_name(w.name.split("-")[0])
        if name in seen:
            dups.append(f"{seen[name]} and {w.name}")
        seen[name] = w.name
    return dups


def carried_bytes(repo: Path = REPO, extra: Iterable[Path] = ()) -> tuple[int, int]:
    """(tree bytes, extra bytes): what the device tool sends for one command.

    The tree is the tracked files plus the untracked files git does not ignore (the tool's
    rule); ``extra`` are the carried ignored paths (``.whl/``), counted file by file.
    """
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    tree = sum(os.path.getsize(repo / f) for f in files if f and os.path.isfile(repo / f))
    more = 0
    for p in extra:
        paths = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
        more += sum(q.stat().st_size for q in paths)
    return tree, more


def check(whl: Path, repo: Path = REPO, limit_mib: float = LIMIT_MIB) -> int:
    """Closure, duplicates, RECORDs and the total; one line and a non-zero code on refusal."""
    wheels = sorted(whl.glob("*.whl"))
    if not wheels:
        print(f"gpu_carry: no wheels in {whl}: run `bash benchmarks/gpu_pipeline.sh prepare`")
        return 2
    problems = missing_requirements(wheels, image_packages())
    problems += [f"two versions carried: {d}" for d in duplicate_wheels(wheels)]
    for w in wheels:
        problems += [f"{w.name}: {p}" for p in record_problems(w)[:3]]
    tree, more = carried_bytes(repo, [whl])
    mib = (tree + more) / 2**20
    print(f"gpu_carry: {len(wheels)} wheels {more / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB"
          f" = {mib:.1f} MiB per device command (limit {limit_mib:.0f} MiB)")  # fmt: skip
    for p in problems:
        print(f"gpu_carry: {p}")
    if mib > limit_mib:
        print(f"gpu_carry: refused: {mib:.1f} MiB > {limit_mib:.0f} MiB; carry less")
        return 1
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slim", help="drop ray/jars/ and *.js.map from a wheel, in place")
    s.add_argument("wheel", type=Path)
    c = sub.add_parser("check", help="closure, RECORDs and the carried total")
    c.add_argument("whl", type=Path, nargs="?", default=REPO / ".whl")
    a = p.parse_args(argv)
    if a.cmd == "slim":
        saved = slim_wheel(a.wheel, a.wheel)
        print(f"gpu_carry: {a.wheel.name} slimmed by {saved / 1e6:.1f} MB "
              f"to {a.wheel.stat().st_size / 1e6:.1f} MB")  # fmt: skip
        return 0
    return check(a.whl)


if __name__ == "__main__":
    sys.exit(main())
