"""DVC stage fetch: the raw MNIST and IMDB files into data/raw, verified against pinned checksums.

Set DLPIPE_DATA_MIRROR (a folder or URL base holding mnist/ and imdb/) to fetch without network.
"""

from __future__ import annotations

import os

from dlpipe import paths
from dlpipe.config import load_params
from dlpipe.data.fetch import fetch_all, summary_lines
from dlpipe.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    params = load_params()
    summary = fetch_all(paths.RAW_DIR, params.fetch, os.environ.get("DLPIPE_DATA_MIRROR"))
    for line in summary_lines(summary):
        print(f"fetch: {line}")


if __name__ == "__main__":
    main()
