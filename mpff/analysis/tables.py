"""Formatting shared by the offline tools: Markdown tables, and numbers, shares and sizes as text.

No mpff imports: the report, the comparison and the prediction all format through these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: What a table shows for a figure that does not exist.
MISSING = "–"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (for a CLI's single error line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def md_table(headers: list[str], rows: Iterable[list[str]], numeric_from: int = 1) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    rows = list(rows)
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(x: float | None) -> str:
    return MISSING if x is None else f"{x:,.2f}"


def fmt_percent(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage."""
    return MISSING if x is None or math.isnan(x) else f"{100.0 * x:.{digits}f} %"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_ratio(x: float | None) -> str:
    return MISSING if x is None else f"{x:.2f}"


def fmt_number(x: float | None, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)
