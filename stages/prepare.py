"""DVC stage prepare@<dataset>: raw files -> split, encoded arrays + a data card."""

from __future__ import annotations

import argparse
import importlib
import time

from dlpipe import paths
from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", choices=["mnist", "imdb"])
    dataset = parser.parse_args().dataset
    params = load_params()
    # Imported by name so prepare@mnist runs none of the IMDB code (and DVC deps stay exact).
    module = importlib.import_module(f"dlpipe.data.{dataset}")
    start = time.perf_counter()
    card = module.prepare(
        paths.RAW_DIR / dataset,
        paths.PREPARED_DIR / dataset,
        paths.REPORTS_DIR / "data" / f"{dataset}.json",
        getattr(params.prepare, dataset),
        params.seed,
    )
    counts = ", ".join(f"{split} {card[split]['count']}" for split in ("train", "val", "test"))
    print(f"prepare@{dataset}: {counts} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
