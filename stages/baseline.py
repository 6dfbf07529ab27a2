"""DVC stage baseline@<dataset>: the dataset's linear yardstick (TF-IDF + logistic regression for
texts, logistic regression on pixels for images), fit beside the deep models."""

from __future__ import annotations

import argparse

from dlpipe.baselines import train_and_evaluate
from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a dataset: a datasets.<name> entry of params.yaml")
    dataset = parser.parse_args().dataset
    result = train_and_evaluate(load_params(), dataset)
    print(
        f"baseline@{dataset}: {result['model']} test_accuracy {result['test_accuracy']:.4f}, "
        f"val_accuracy {result['val_accuracy']:.4f}, fit {result['train_time_s']:.1f}s, "
        f"{result['features']:,} features"
    )


if __name__ == "__main__":
    main()
