"""``bench/RESULTS.md``: each benchmark owns one ``## <name>`` section and rewrites only that one."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str) -> None:
    """Replace (or append) the ``## <name>`` section of RESULTS.md, leaving the other sections alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    section = f"## {name}\n\n{text.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old)
    else:
        new = old.rstrip() + "\n\n" + section
    RESULTS.write_text(new.rstrip() + "\n")
