"""DVC stage fetch: the built-in datasets' raw files into data/raw, verified against pinned
checksums. A user's own files are read where `datasets.<name>.path` says.

Set DLPIPE_DATA_MIRROR (a folder or URL base, a folder per dataset) to fetch without network.
"""

from __future__ import annotations

import os

from dlpipe import paths
from dlpipe.config import load_params
from dlpipe.data.fetch import fetch_all, fetched_datasets, summary_lines
from dlpipe.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    params = load_params()
    datasets = fetched_datasets(params, paths.RAW_DIR)
    summary = fetch_all(paths.RAW_DIR, params.fetch, os.environ.get("DLPIPE_DATA_MIRROR"), datasets)
    for line in summary_lines(summary):
        print(f"fetch: {line}")
    if not summary:
        print("fetch: no dataset to download (every dataset's files are the user's own)")


if __name__ == "__main__":
    main()
