"""`make docs`: the README's results table is the report's, copied between its markers.

`--check` (CI) fails when the README's copy differs from `reports/summary.md`'s, so the front door
never shows numbers the committed results do not, or when one of its links points at no file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- results: copied from reports/summary.md by `make docs`; do not edit -->"
END = "<!-- end of results -->"


def report_table(summary: str) -> str:
    """The first markdown table of the report: one row per model and baseline."""
    match = re.search(r"^\|.*\|\n(?:^\|.*\|\n)+", summary, re.M)
    if match is None:
        raise SystemExit("error: reports/summary.md has no table; run `dvc repro report`")
    return match[0]


def with_table(readme: str, table: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"error: README.md lacks the markers {START!r} ... {END!r}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def broken_links(readme: str) -> list[str]:
    """The README's relative link targets that do not exist in the checkout."""
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    return [t for t in local if t and not (ROOT / t).exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the README is stale")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    table = report_table((ROOT / "reports" / "summary.md").read_text(encoding="utf-8"))
    updated = with_table(readme, table)
    if args.check:
        if broken := broken_links(readme):
            print(f"error: README.md links to missing files: {', '.join(broken)}")
            sys.exit(1)
        if updated != readme:
            print("error: README.md's results differ from reports/summary.md; run `make docs`")
            sys.exit(1)
        print("README.md's results table matches reports/summary.md")
    elif updated != readme:
        readme_path.write_text(updated, encoding="utf-8")
        print("README.md: results table updated from reports/summary.md")


if __name__ == "__main__":
    main()
