"""One table renderer for every table dlpipe prints or writes (compare, gates, sweeps, the
report, evaluation mistakes): tabulate's, with each cell shown as given."""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False
) -> str:
    """Plain text with a rule under the header, or a GitHub-flavoured markdown table (which
    also reads well as plain text). Cells are never re-parsed as numbers: callers format them."""
    return tabulate(
        [[str(cell) for cell in row] for row in rows],
        [str(name) for name in header],
        tablefmt="github" if markdown else "simple",
        disable_numparse=True,
    )
