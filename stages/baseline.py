"""DVC stage baseline: TF-IDF + logistic regression on IMDB, the yardstick of the text models."""

from __future__ import annotations

from dlpipe.baseline import train_and_evaluate
from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    result = train_and_evaluate(load_params())
    print(
        f"baseline: {result['model']} test_accuracy {result['test_accuracy']:.4f}, "
        f"val_accuracy {result['val_accuracy']:.4f}, fit {result['train_time_s']:.1f}s, "
        f"{result['features']:,} features"
    )


if __name__ == "__main__":
    main()
