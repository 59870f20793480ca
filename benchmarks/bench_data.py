"""Manifest build rate and worker read time: loose files vs WebDataset tars vs Parquet shards.

The same photos (the ImageNet sample, repeated to ``--images``; or the suite's
scikit-image photos with ``--photos``) are written three ways: loose JPEGs, WebDataset
tars of ``--shard-size`` samples (``key.jpg`` + ``key.cls``) and HF-style Parquet shards
(``image: struct<bytes, path>`` + ``label``, row groups of 100 as ``datasets`` writes
them). For each it times, in interleaved rounds (best round reported):

* **build**: ``unioncam manifest``'s builder over the whole dataset, rows/s;
* **read**: what a worker does to hold a unit's bytes in memory, ms/unit: loose files are
  ``read_unit`` + one ``read_bytes`` per row (as ``load_row`` does), shards ``read_unit``
  (the coalesced range reads / one read per source row group).

Local files come from the page cache after the first round (so this measures the
per-object cost, not the disk); ``--s3`` runs the same on the loopback S3 server the
tests use (moto: real HTTP, no network latency).

    python benchmarks/bench_data.py --images 4096 --out benchmarks/results/bench_data_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import REPO, SAMPLE, loadavg, markdown_table, sample_rows

from pipeline.data.build import build_from_list
from pipeline.data.build_shards import build_from_parquet_shards, build_from_webdataset
from pipeline.data.decode import read_bytes
from pipeline.data.manifest import Manifest


def write_dataset(root: Path, rows: list[tuple[str, int]], shard_size: int) -> None:
    """``root/loose/*.jpg``, ``root/wds/*.tar`` and ``root/hf/*.parquet`` of the same photos."""
    for d in ("loose", "wds", "hf"):
        (root / d).mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image), ("label", pa.int64())])
    for s in range(0, len(rows), shard_size):
        part = rows[s : s + shard_size]
        datas = [Path(p).read_bytes() for p, _ in part]
        with tarfile.open(root / "wds" / f"{s // shard_size:06d}.tar", "w") as tar:
            for i, (data, (_, lab)) in enumerate(zip(datas, part, strict=True)):
                for ext, payload in (("jpg", data), ("cls", str(lab).encode())):
                    ti = tarfile.TarInfo(f"{s + i:08d}.{ext}")
                    ti.size = len(payload)
                    tar.addfile(ti, io.BytesIO(payload))
                (root / "loose" / f"{s + i:08d}.jpg").write_bytes(data)
        table = pa.table({"image": [{"bytes": d, "path": f"{s + i:08d}.jpg"}
                                    for i, d in enumerate(datas)],
                          "label": [lab for _, lab in part]}, schema=schema)  # fmt: skip
        pq.write_table(table, root / "hf" / f"train-{s // shard_size:05d}.parquet",
                       row_group_size=100)  # fmt: skip


def upload(root: Path, bucket: str, fs) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{bucket}/{f.relative_to(root).as_posix()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--unit-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photos", action="store_true",
                    help="the suite's scikit-image photos instead of the ImageNet sample")
    ap.add_argument("--s3", action="store_true", help="on the loopback S3 server (moto)")
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        folder = SAMPLE
        if a.photos or not (SAMPLE / "labels.csv").exists():
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import write_photo_folder

            folder = write_photo_folder(tmp / "photos")
        rows = sample_rows(a.images, folder)
        write_dataset(tmp / "data", rows, a.shard_size)
        so = None
        with contextlib.ExitStack() as stack:
            base = str(tmp / "data")
            out = str(tmp)
            if a.s3:
                sys.path.insert(0, str(REPO / "tests"))
                from s3server import S3Server

                s3 = stack.enter_context(S3Server())
                so, bucket = s3.storage_options, s3.make_bucket()
                upload(tmp / "data", bucket, s3.filesystem())
                base = out = bucket
            loose = [(f"{base}/loose/{i:08d}.jpg", lab) for i, (_, lab) in enumerate(rows)]
            builders: dict[str, Callable[[], Manifest]] = {
                "loose files": lambda: build_from_list(
                    loose, f"{out}/loose.parquet", unit_size=a.unit_size, storage_options=so),
                "WebDataset tars": lambda: build_from_webdataset(
                    f"{base}/wds", f"{out}/wds.parquet", unit_size=a.unit_size,
                    storage_options=so),
                "Parquet shards": lambda: build_from_parquet_shards(
                    f"{base}/hf", f"{out}/hf.parquet", unit_size=a.unit_size,
                    storage_options=so),
            }  # fmt: skip
            build_s: dict[str, list[float]] = {k: [] for k in builders}
            read_s: dict[str, list[float]] = {k: [] for k in builders}
            mb = {}
            names = list(builders)
            for r in range(a.rounds):
                for name in names[r % 3:] + names[: r % 3]:
                    t0 = time.perf_counter()
                    m = builders[name]()
                    build_s[name].append(time.perf_counter() - t0)
                    m = Manifest.open(m.uri, storage_options=so, validate=False)
                    t0 = time.perf_counter()
                    total = 0
                    for u in range(m.num_units):
                        unit = m.read_unit(u)
                        if m.shard_kind is None:
                            total += sum(len(read_bytes(x.uri, so)) for x in unit)
                        else:
                            total += sum(len(x.data or b"") for x in unit)
                    read_s[name].append((time.perf_counter() - t0) / m.num_units)
                    mb[name] = total / 2**20
                    print(f"  [round {r + 1}/{a.rounds}] {name}: build {build_s[name][-1]:.2f}"
                          f" s, read {1000 * read_s[name][-1]:.1f} ms/unit (load {loadavg()})",
                          file=sys.stderr)  # fmt: skip
        where = "loopback S3 (moto)" if a.s3 else "local disk (page cache)"
        title = (f"Manifest build and unit reads, {a.images} photos ({mb['loose files']:.0f} MiB)"
                 f", units of {a.unit_size}, shards of {a.shard_size}, {where}; best of "
                 f"{a.rounds} interleaved rounds")
        lb, lr = min(build_s["loose files"]), min(read_s["loose files"])
        table = [[n, a.images / min(build_s[n]), lb / min(build_s[n]),
                  1000 * min(read_s[n]), lr / min(read_s[n])] for n in names]  # fmt: skip
        header = ["dataset as", "build rows/s", "build x loose", "read ms/unit",
                  "read x loose"]  # fmt: skip
        markdown_table(title, header, table)
        if a.out:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                markdown_table(title, header, table)
            Path(a.out).write_text(buf.getvalue().lstrip() + f"\nload at the end: {loadavg()}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
