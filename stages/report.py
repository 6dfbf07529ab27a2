"""DVC stage report: reports/summary.md comparing the model families, from DVC outputs only."""

from __future__ import annotations

from dlpipe.errors import exit_on_user_error
from dlpipe.report import write_report


@exit_on_user_error
def main() -> None:
    print(f"report: wrote {write_report()}")


if __name__ == "__main__":
    main()
