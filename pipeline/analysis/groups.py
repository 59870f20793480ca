"""Groups of classes: which classes are analysed together (strategies need many rows).

Why groups: a class with a handful of images cannot be clustered into strategies (the
200-photo ImageNet sample has one image per class), but "dogs" or "wheeled vehicles" can.
A grouping maps a class index to a group name. Sources:

* ``"class"``: every class is its own group (for datasets with many images per class).
* ``"imagenet"``: the grouping shipped with the package, ``pipeline/data/imagenet_groups.csv``:
  each of ImageNet-1k's 1,000 classes in one of 38 coarse **WordNet** categories (dog,
  canine, feline, bird, fish, insect, ..., wheeled vehicle, container, device, structure,
  food, ...). It was generated offline from WordNet 3.0 (Debian's ``wordnet-base``,
  ``/usr/share/wordnet``) by :func:`wordnet_groups`: a class goes to the first category
  of :data:`WORDNET_CATEGORIES` that is among its WordNet hypernyms (all paths), so more
  specific categories win (a dog is in "dog", not "mammal"); ``tests/test_analysis.py``
  regenerates it when WordNet is installed and checks it is unchanged.
* a CSV file with columns ``class_index,group`` (more columns are ignored): your own.
* ``"auto"`` (the default of :func:`pipeline.analysis.store_analysis.analyze`): ``class``
  when the median class has at least :data:`AUTO_MIN_ROWS` rows, else ``imagenet``.

Classes a grouping does not name go to the group ``"other"``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

__all__ = [
    "AUTO_MIN_ROWS",
    "OTHER",
    "WORDNET_CATEGORIES",
    "Grouping",
    "load_grouping",
    "wordnet_groups",
]

#: ``auto`` analyses classes one by one when the median class has this many rows.
AUTO_MIN_ROWS = 20
#: The group of classes a grouping does not name.
OTHER = "other"
#: The shipped ImageNet grouping.
IMAGENET_GROUPS = Path(__file__).resolve().parents[1] / "data" / "imagenet_groups.csv"
#: (group, WordNet 3.0 noun synset offset), most specific first.
WORDNET_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("dog", "02084071"),
    ("canine", "02083346"),  # wolves, foxes, wild dogs
    ("feline", "02120997"),
    ("bear", "02131653"),
    ("primate", "02469914"),
    ("ungulate", "02370806"),
    ("rodent", "02329401"),
    ("aquatic mammal", "02062017"),
    ("mammal", "01861778"),
    ("bird", "01503061"),
    ("fish", "02512053"),
    ("reptile", "01661091"),
    ("amphibian", "01627424"),
    ("insect", "02159955"),
    ("arachnid", "01769347"),
    ("crustacean", "01974773"),
    ("mollusc", "01940736"),
    ("invertebrate", "01905661"),
    ("animal", "00015388"),
    ("wheeled vehicle", "04576211"),
    ("craft", "03125870"),  # boats, aircraft
    ("vehicle", "04524313"),
    ("musical instrument", "03800933"),
    ("clothing", "03051540"),
    ("furniture", "03405725"),
    ("container", "03094503"),
    ("structure", "04341686"),
    ("device", "03183080"),
    ("implement", "03563967"),  # tools, utensils
    ("equipment", "03294048"),
    ("covering", "03122748"),
    ("food", "00021265"),
    ("food", "07555863"),  # solid food
    ("fruit", "13134947"),
    ("geological formation", "09287968"),
    ("fungus", "12992868"),
    ("plant", "00017222"),
    ("person", "00007846"),
    ("artifact", "00021939"),
)


class Grouping:
    """Class index -> group name, and the groups' order (group index = position)."""

    def __init__(self, mapping: dict[int, str], source: str) -> None:
        self.mapping = {int(c): str(g) for c, g in mapping.items()}
        self.source = source

    def group_of(self, c: int) -> str:
        return self.mapping.get(int(c), OTHER)

    def names(self, classes: list[int] | None = None) -> list[str]:
        """Group names, sorted (only those of ``classes`` when given)."""
        if classes is None:
            return sorted(set(self.mapping.values()) | {OTHER})
        return sorted({self.group_of(c) for c in classes})


def _read_csv(text: str, where: str) -> dict[int, str]:
    reader = csv.DictReader(io.StringIO(text))
    cols = {c.strip().lower(): c for c in reader.fieldnames or []}
    cc = next((cols[c] for c in ("class_index", "class", "index", "target") if c in cols), None)
    gc = cols.get("group")
    if cc is None or gc is None:
        raise ValueError(
            f"grouping {where}: needs columns class_index,group (found {reader.fieldnames})"
        )
    out: dict[int, str] = {}
    for i, row in enumerate(reader, start=2):
        try:
            c = int(str(row[cc]).strip())
        except ValueError:
            raise ValueError(f"grouping {where} line {i}: class {row[cc]!r} is not an integer"
                             ) from None  # fmt: skip
        g = str(row[gc] or "").strip()
        if not g:
            raise ValueError(f"grouping {where} line {i}: empty group for class {c}")
        if c in out and out[c] != g:
            raise ValueError(f"grouping {where}: class {c} is in two groups ({out[c]}, {g})")
        out[c] = g
    return out


def load_grouping(source: str | os.PathLike[str]) -> Grouping:
    """A grouping from ``"class"``, ``"imagenet"`` or a CSV path (see the module docstring)."""
    s = os.fspath(source)
    if s == "class":
        return _PerClass()
    if s == "imagenet":
        return Grouping(_read_csv(IMAGENET_GROUPS.read_text(encoding="utf-8"), "imagenet"),
                        "imagenet")  # fmt: skip
    path = Path(s)
    if not path.is_file():
        raise FileNotFoundError(
            f"grouping {s}: no such file (use 'class', 'imagenet' or a CSV class_index,group)"
        )
    return Grouping(_read_csv(path.read_text(encoding="utf-8"), s), f"file {path.name}")


class _PerClass(Grouping):
    """Every class its own group, named by its index."""

    def __init__(self) -> None:
        super().__init__({}, "class")

    def group_of(self, c: int) -> str:
        return f"{int(c)}"

    def names(self, classes: list[int] | None = None) -> list[str]:
        return [f"{int(c)}" for c in sorted(set(classes or []))]


def wordnet_groups(synsets: list[str], wordnet_dir: str | os.PathLike[str] = "/usr/share/wordnet"
                   ) -> list[str]:  # fmt: skip
    """The group of each ImageNet synset (``n02084071``-style ids) from WordNet 3.0's
    ``data.noun``: the first of :data:`WORDNET_CATEGORIES` among its hypernyms (``@`` and
    instance ``@i`` pointers, all paths), else :data:`OTHER`."""
    parents: dict[str, list[str]] = {}
    with open(Path(wordnet_dir) / "data.noun", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(" "):
                continue  # the licence header
            f = line.split(" | ", 1)[0].split()
            offset, n_words = f[0], int(f[3], 16)
            i = 4 + 2 * n_words
            n_ptr = int(f[i])
            ptrs = f[i + 1 : i + 1 + 4 * n_ptr]
            parents[offset] = [ptrs[j + 1] for j in range(0, len(ptrs), 4)
                               if ptrs[j] in ("@", "@i") and ptrs[j + 2] == "n"]  # fmt: skip
    out = []
    for s in synsets:
        seen, todo = set(), [s.lstrip("n")]
        while todo:
            o = todo.pop()
            if o not in seen:
                seen.add(o)
                todo += parents.get(o, [])
        out.append(next((g for g, o in WORDNET_CATEGORIES if o in seen), OTHER))
    return out
