"""DVC stage prepare@<dataset>: raw files -> split, encoded arrays + meta.json + a data card."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dlpipe import paths
from dlpipe.config import load_params
from dlpipe.datasets import dataset_settings
from dlpipe.errors import exit_on_user_error
from dlpipe.io import write_json_atomic


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a dataset: a datasets.<name> entry of params.yaml")
    name = parser.parse_args().dataset
    params = load_params()
    # Only this dataset's format module is imported (and is a DVC dep of this stage).
    fmt, settings = dataset_settings(params, name)
    start = time.perf_counter()
    card = fmt.prepare(settings, Path(settings.path), paths.PREPARED_DIR / name, params.seed)
    write_json_atomic(paths.REPORTS_DIR / "data" / f"{name}.json", card)
    counts = ", ".join(f"{split} {card[split]['count']}" for split in ("train", "val", "test"))
    print(f"prepare@{name}: {counts} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
