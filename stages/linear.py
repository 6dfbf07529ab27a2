"""DVC stage linear@<dataset>: the dataset's linear models (TF-IDF + logistic regression and
NBSVM for texts, logistic regression on pixels for images), fit beside the deep models."""

from __future__ import annotations

import argparse

from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error
from dlpipe.linear import fit_and_evaluate


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a dataset: a datasets.<name> entry of params.yaml")
    fit_and_evaluate(load_params(), parser.parse_args().dataset)


if __name__ == "__main__":
    main()
