"""One-line messages: every error the pipeline stores, logs or prints is one line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["error_line", "int_list", "one_line", "ranges_text"]


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with its whitespace collapsed to single spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def error_line(e: BaseException, bare: tuple[type[BaseException], ...] = ()) -> str:
    """``Type: message`` of an exception on one line; exceptions of the ``bare`` types (whose
    message is meant for the user as is) and messages that already name their type keep
    just the message. A missing file's name is added when the message lacks it."""
    text = one_line(e)
    name = type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    if not text:
        return name
    if isinstance(e, bare) or text.startswith(name):
        return text
    return f"{name}: {text}"


def ranges_text(values: Sequence[int], sep: str = ", ") -> str:
    """``[1, 2, 3, 7]`` -> ``1-3, 7``: integers as a user types them (``--classes 1-3,7``);
    ``sep=","`` keeps a long list of units one short line."""
    out: list[str] = []
    vals = sorted(set(values))
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return sep.join(out)


def int_list(text: str, what: str) -> list[int]:
    """``1,2,5-8`` -> [1, 2, 5, 6, 7, 8]: integers as a user types them (``--rows``,
    ``--classes``), the inverse of :func:`ranges_text`; a bad list is one line."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{what}: expected integers like 1,2,5-8, got {text!r}") from None
    return out
