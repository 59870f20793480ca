"""``unioncam run``'s flags are generated from ``RunConfig``'s fields (issue 27, item 4).

So a flag and its field share a name, a default lives only on the field and the help text
comes from it; the spellings users type today keep working; and renaming the field
``method`` to ``preset`` changed no store's fingerprint. No Ray here: the parser and the
configuration only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import pytest

from pipeline import cli
from pipeline.config import RunConfig
from pipeline.flags import add_flags, comma_list, flag, flag_fields, flag_values
from pipeline.store.layout import STORE_FORMAT
from unioncam import UnionCAMConfig

#: RunConfig fields that are deliberately not generated flags, and why.
NOT_FLAGS = {
    "storage_options": "--storage-option KEY=VALUE, hand-written: every command has it",
    "fault_injection": "test-only failure hooks",
}
POSITIONAL = ("manifest", "store")


def _run_parser() -> argparse.ArgumentParser:
    top = cli.build_parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["run"]


def _parse(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", "m.parquet", "s.zarr", *flags])


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_field_is_a_flag_of_its_name_and_default_or_listed_as_not_one():
    parser, ns = _run_parser(), _parse()
    flagged = {f.name for f in flag_fields(RunConfig)}
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert set(fields) - flagged == set(NOT_FLAGS)
    options = parser._option_string_actions
    for name in flagged:
        f = fields[name]
        if name in POSITIONAL:
            assert f.default is dataclasses.MISSING and getattr(ns, name).endswith(
                (".parquet", ".zarr"))
            continue
        assert _option(name) in options, f"{name}: no flag {_option(name)}"
        assert options[_option(name)].dest == name
        if f.default_factory is not dataclasses.MISSING:  # unset = the class builds it
            assert getattr(ns, name) is None
        else:
            assert getattr(ns, name) == f.default, name


def test_no_flags_give_the_configs_defaults():
    cfg = cli._config_from_args(_parse())
    assert cfg == RunConfig(manifest="m.parquet", store="s.zarr")
    assert cfg.preset == UnionCAMConfig() and cfg.methods == ("unioncam",)


def test_help_text_comes_from_the_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps (also at hyphens)
    for f in flag_fields(RunConfig):
        text = f.metadata["flag"]["help"]
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(default)
        assert "".join((text % {"default": default}).split()) in shown, f.name
    assert "imagesperUnionCAMcall(default32)" in shown  # %(default)s is the field's 32


def test_todays_spellings_set_the_fields_of_the_same_meaning():
    old = cli._config_from_args(_parse(
        "--method", "gradcam,unioncam", "--cpu", "--no-progress", "--no-ray-metrics",
        "--no-dashboard", "--preset", "fast", "--groups", "4", "--gradient", "",
        "--metrics", "insertion, deletion", "--image-size", "64", "--max-units", "2"))
    new = cli._config_from_args(_parse(
        "--methods", "gradcam,unioncam", "--cpu-only", "--no-progress", "--no-ray-metrics",
        "--no-dashboard", "--preset", "fast", "--groups", "4", "--gradient", "",
        "--metrics", "insertion,deletion", "--image-size", "64", "--max-units", "2"))
    assert old == new
    assert old.methods == ("gradcam", "unioncam") and old.cpu_only
    assert not (old.progress or old.ray_metrics or old.dashboard)
    assert old.preset == UnionCAMConfig.preset("fast", groups=4, gradient=())
    assert old.metrics == ("insertion", "deletion") and old.max_units == 2
    assert _parse("--progress").progress is True


def test_a_null_run_does_not_check_the_preset():
    cfg = cli._config_from_args(_parse("--explainer", "null", "--preset", "nope"))
    assert cfg.explainer == "null" and cfg.preset == UnionCAMConfig()
    with pytest.raises(ValueError, match="nope"):
        cli._config_from_args(_parse("--preset", "nope"))


def test_every_subcommand_names_its_handler():
    top = cli.build_parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        assert callable(p.get_default("handler")), name


# ---------------------------------------------------------------------------------------
# the stores' contract: the field renamed, the fingerprint not
def test_fingerprint_keys_are_the_stores_not_the_fields():
    cfg = RunConfig(manifest="m", store="s", methods=("gradcam", "unioncam"), preset="fast",
                    image_size=64)
    settings = cfg.result_settings()
    assert settings["methods"] == ["gradcam", "unioncam"]
    assert settings["method"] == UnionCAMConfig.preset("fast").result_settings()
    assert "preset" not in settings
    by_hand = {"format_version": STORE_FORMAT, "model": "efficientnet-lite0", "weights": None,
               "layer": None, "methods": ["gradcam", "unioncam"],
               "method": UnionCAMConfig.preset("fast").result_settings(), "image_size": 64,
               "target": "predicted", "explainer": "unioncam", "components": False,
               "metrics": []}  # fmt: skip
    blob = json.dumps(by_hand, sort_keys=True, separators=(",", ":"))
    assert cfg.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()


def test_provenance_written_before_the_rename_reads_back_with_its_fingerprint():
    cfg = RunConfig(manifest="m", store="s", preset=UnionCAMConfig.preset("fast", groups=4))
    old = cfg.to_dict()
    old["method"] = old.pop("preset")  # what a store written before the rename holds
    assert RunConfig.from_dict(old) == cfg
    assert RunConfig.from_dict(old).fingerprint() == cfg.fingerprint()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_accepts_a_name_a_dict_or_a_config():
    want = UnionCAMConfig.preset("paper")
    for value in ("paper", want.to_dict(), want):
        assert RunConfig(manifest="m", store="s", preset=value).preset == want
    with pytest.raises(ValueError, match="preset"):
        RunConfig(manifest="m", store="s", preset=3)


# ---------------------------------------------------------------------------------------
# the generator on its own
@dataclasses.dataclass(frozen=True)
class _Toy:
    path: str = flag(metavar="PATH", help="where")
    count: int = flag(7, group="numbers", help="how many (default %(default)s)")
    ratio: float | None = flag(None, group="numbers", help="a ratio")
    names: tuple[str, ...] = flag(("a", "b"), aliases=("--name",), help="names")
    loud: bool = flag(False, help="switch")
    fast: bool = flag(True, help="on unless --no-fast")
    kind: str = flag("x", choices=("x", "y"), help="one of two")
    hidden: int = 0


def _toy(argv: list[str]) -> _Toy:
    p = argparse.ArgumentParser()
    groups = add_flags(p, _Toy)
    assert set(groups) == {"numbers"}
    return _Toy(**flag_values(_Toy, p.parse_args(argv)))


def test_generated_flags_parse_each_kind():
    assert _toy(["p"]) == _Toy(path="p")
    t = _toy(["p", "--count", "3", "--ratio", "0.5", "--name", "c, d", "--loud", "--no-fast",
              "--kind", "y"])  # fmt: skip
    assert t == _Toy("p", 3, 0.5, ("c", "d"), True, False, "y")
    assert _toy(["p", "--names", ""]).names == ()
    with pytest.raises(SystemExit):
        _toy(["p", "--kind", "z"])
    with pytest.raises(SystemExit):
        _toy(["p", "--hidden", "1"])  # a field without flag() is no flag
    assert comma_list(" a, ,b ") == ("a", "b")


def test_a_type_the_generator_cannot_parse_needs_an_explicit_one():
    @dataclasses.dataclass
    class Bad:
        table: dict[str, int] | None = flag(None, help="?")

    with pytest.raises(TypeError, match="Bad.table"):
        add_flags(argparse.ArgumentParser(), Bad)
