"""DVC stage train@<family>: train one model family, resumable, tracked in MLflow."""

from __future__ import annotations

import argparse

from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error
from dlpipe.training.run import train


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model family: a train.<name> section of params.yaml")
    summary = train(parser.parse_args().model, load_params())
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
