"""DVC stage train@<family>: train one model family, resumable, tracked in MLflow.

With train.<family>.nproc > 1 it re-runs itself under torchrun, one process per GPU (or CPU
share); rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import sys

from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error
from dlpipe.training.run import launch, train


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model family: a train.<name> section of params.yaml")
    name = parser.parse_args().model
    params = load_params()
    launch(name, params, sys.argv)
    summary = train(name, params)
    if summary is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    # Exit 0 even when MLflow failed mid-training: the outputs are complete (a rerun would only
    # redo the same training), the undelivered metrics wait on disk, and the evaluate stage,
    # which needs them in MLflow, delivers them first or fails.
    tracking = f"; warning: {summary['tracking']}" if summary["tracking"] else ""
    print(
        f"train@{summary['model']}: best val_accuracy {summary['best']['val_accuracy']:.4f} "
        f"(epoch {summary['best_epoch']}/{summary['epochs']}) in {summary['wall_time_s']:.0f}s"
        + tracking
    )


if __name__ == "__main__":
    main()
