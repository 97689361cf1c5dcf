"""The reviewed data files of fidelity mode (mps_overrides.txt,
common_mps_dtypes.txt, test_mps_expectations.txt): one record a line,
whitespace-separated fields, the last one free text, ``#`` comments."""

from __future__ import annotations

from collections.abc import Iterator


def records(path: str, fields: int) -> Iterator[tuple[int, str, list[str]]]:
    """``(line number, line, parts)`` for each record of ``path``; ``parts``
    has at most ``fields`` entries (the readers check the count, since a
    short line is theirs to report with their format)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield number, line, line.split(None, fields - 1)
