"""What a GPU command carries is complete and installable (issue 24), checked offline.

The device machine reaches no package index, so a wheel whose requirement is neither
carried nor on its image fails there, at the cost of a borrowed GPU's minutes. These tests
build small wheels here (real zips with minimal METADATA) to show the checks catch what
they must, and run the same checks on the real ``.whl/`` when ``prepare`` made one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("packaging")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_carry", REPO / "benchmarks" / "gpu_carry.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(where: Path, name: str, requires: list[str], files: dict[str, bytes] | None = None,
               record: bool = True) -> Path:  # fmt: skip
    """A real wheel: METADATA, WHEEL, the given files and a correct RECORD."""
    dist = f"{name}-1.0.dist-info"
    members = {f"{name}/__init__.py": b"", **(files or {})}
    members[f"{dist}/METADATA"] = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
        + [f"Requires-Dist: {r}" for r in requires]
    ).encode() + b"\n"  # fmt: skip
    members[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    path = where / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        rows = []
        for n, data in members.items():
            info = zipfile.ZipInfo(n)
            if n.endswith("/raylet"):  # an executable, whose bits pip restores from the zip
                info.external_attr = 0o100755 << 16
            z.writestr(info, data)
            rows.append(f"{n},{_hash(data)},{len(data)}")
        if record:
            z.writestr(f"{dist}/RECORD", "\n".join(rows + [f"{dist}/RECORD,,"]) + "\n")
    return path


def test_closure_counts_carried_image_and_markers_and_names_what_is_missing(tmp_path):
    a = make_wheel(tmp_path, "alpha", [
        "beta>=1",                                   # carried
        "Typing_Extensions>=4; python_version < '3.13'",  # on the image (names normalised)
        "tomli; python_version < '3.11'",            # not for Python 3.12
        "pywin32; sys_platform == 'win32'",          # not for Linux
        "sphinx; extra == 'docs'",                   # an extra: not installed
        "colorful",                                  # neither: must be named
    ])  # fmt: skip
    b = make_wheel(tmp_path, "beta", ["numpy>=2", "missing-dep; platform_machine == 'x86_64'"])
    missing = gc.missing_requirements([a, b], {"typing-extensions", "numpy"})
    assert missing == [f"{a.name} needs colorful",
                       f"{b.name} needs missing-dep; platform_machine == 'x86_64'"]  # fmt: skip
    assert gc.missing_requirements([a, b], {"typing-extensions", "numpy", "colorful",
                                            "missing-dep"}) == []  # fmt: skip


def test_vendored_metadata_inside_a_wheel_is_not_its_requirements(tmp_path):
    # Ray vendors aiohttp with its own METADATA deep inside; only the top dist-info counts.
    inner = b"Metadata-Version: 2.1\nName: aiohttp\nVersion: 3\nRequires-Dist: yarl\n"
    w = make_wheel(tmp_path, "outer", [], {"outer/thirdparty/aiohttp-3.dist-info/METADATA": inner})
    assert gc.wheel_metadata(w) == ("outer", [])


def test_two_versions_of_one_package_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    one = make_wheel(tmp_path, "zarr", [])
    two = make_wheel(tmp_path / "a", "zarr", []).rename(tmp_path / "zarr-2.0-py3-none-any.whl")
    assert gc.duplicate_wheels([one, two]) == [f"{one.name} and {two.name}"]


def test_slimmed_wheel_drops_jars_and_maps_and_its_record_matches(tmp_path):
    big = bytes(range(256)) * 4096
    w = make_wheel(tmp_path, "ray", ["click"], {
        "ray/jars/ray_dist.jar": big,
        "ray/dashboard/client/build/static/js/main.js": b"console.log(1)",
        "ray/dashboard/client/build/static/js/main.js.map": big,
        "ray/core/src/ray/raylet/raylet": b"\x7fELF binary",
    })  # fmt: skip
    assert gc.record_problems(w) == []
    saved = gc.slim_wheel(w, w)
    assert saved > 0
    with zipfile.ZipFile(w) as z:
        names = set(z.namelist())
        assert "ray/jars/ray_dist.jar" not in names
        assert not any(n.endswith(".js.map") for n in names)
        assert "ray/dashboard/client/build/static/js/main.js" in names
        assert z.getinfo("ray/core/src/ray/raylet/raylet").external_attr == 0o100755 << 16
        rows = list(csv.reader(io.StringIO(z.read("ray-1.0.dist-info/RECORD").decode())))
    assert {r[0] for r in rows} == names
    assert gc.record_problems(w) == []
    assert gc.wheel_metadata(w) == ("ray", ["click"])


def test_record_problems_catches_a_zip_d_that_left_record_stale(tmp_path):
    w = make_wheel(tmp_path, "pkg", [], {"pkg/jar.bin": b"x" * 100, "pkg/keep.py": b"k = 1\n"})
    # What `zip -d pkg.whl pkg/jar.bin` does: the member goes, RECORD still names it.
    src = zipfile.ZipFile(w)
    out = tmp_path / "stale.whl"
    with zipfile.ZipFile(out, "w") as z:
        for i in src.infolist():
            if i.filename != "pkg/jar.bin":
                data = src.read(i)
                z.writestr(i, data.replace(b"k = 1", b"k = 2") if i.filename == "pkg/keep.py"
                           else data)  # fmt: skip
    assert gc.record_problems(out) == ["in RECORD, not in the wheel: pkg/jar.bin",
                                       "hash or size differs: pkg/keep.py"]  # fmt: skip


def test_image_list_holds_what_the_pipeline_takes_from_the_image():
    image = gc.image_packages()
    # What the pipeline imports without carrying it (the list).
    for name in ("torch", "torchvision", "pyarrow", "fsspec", "xarray", "tqdm", "scikit-image",
                 "aiohttp", "msgpack", "protobuf", "grpcio", "pyyaml", "requests", "click",
                 "filelock", "numpy", "packaging", "typing-extensions"):  # fmt: skip
        assert name in image, name
    assert "ray" not in image and "zarr" not in image
    assert "2026-11-17" in gc.IMAGE_LIST.read_text()  # the date the list was read


def test_carried_total_counts_tree_and_the_carried_folder(tmp_path):
    tree, more = gc.carried_bytes(gc.REPO, [tmp_path])
    assert more == 0 and tree > 100_000
    (tmp_path / "w.whl").write_bytes(b"x" * 1000)
    assert gc.carried_bytes(gc.REPO, [tmp_path]) == (tree, 1000)


_REAL = sorted((REPO / ".whl").glob("*.whl"))


@pytest.mark.skipif(not _REAL, reason="no .whl/: `bash benchmarks/gpu_pipeline.sh prepare` "
                    "makes it (downloads)")  # fmt: skip
def test_prepared_wheels_are_closed_installable_and_fit():
    assert gc.missing_requirements(_REAL, gc.image_packages()) == []
    assert gc.duplicate_wheels(_REAL) == []
    names = {gc.wheel_metadata(w)[0] for w in _REAL}
    assert {"ray", "zarr", "numcodecs"} <= names
    (ray,) = [w for w in _REAL if w.name.startswith("ray-")]
    assert gc.record_problems(ray) == []
    with zipfile.ZipFile(ray) as z:
        assert not any(n.startswith("ray/jars/") or n.endswith(".js.map") for n in z.namelist())
    tree, more = gc.carried_bytes(REPO, [REPO / ".whl"])
    assert (tree + more) / 2**20 <= gc.LIMIT_MIB
