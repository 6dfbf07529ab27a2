"""One table renderer for every table dlpipe prints or writes (compare, gates, the report)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False
) -> str:
    """Columns padded to their widest cell: plain text with a rule under the header, or a
    markdown table that also reads well as plain text."""
    widths = [max(len(str(line[i])) for line in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)]
        return f"| {' | '.join(padded)} |" if markdown else "  ".join(padded).rstrip()

    rule = ["-" * max(3, width) for width in widths] if markdown else ["-" * w for w in widths]
    if markdown:
        widths = [max(3, width) for width in widths]
    return "\n".join([line(header), line(rule), *(line(row) for row in rows)])
