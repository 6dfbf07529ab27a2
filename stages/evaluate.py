"""DVC stage evaluate@<model>: test-split metrics, latency, figures; log and register in MLflow."""

from __future__ import annotations

import argparse

from dlpipe.config import load_params
from dlpipe.errors import exit_on_user_error
from dlpipe.evaluation.run import evaluate


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model family: a train.<name> section of params.yaml")
    result = evaluate(parser.parse_args().model, load_params())
    decision = result["registry"]
    registered = (
        f"; registered {decision['registered_model']} v{decision['version']}"
        f" ({'champion' if decision['promoted'] else 'candidate'})"
        if decision["registered"]
        else f"; not registered: {decision['reason']}"
    )
    print(
        f"evaluate: test_accuracy {result['test_accuracy']:.4f}, macro-F1 "
        f"{result['test_macro_f1']:.4f}, "
        + ", ".join(f"{k} {v}" for k, v in result.items() if k.startswith("latency_"))
        + registered
    )


if __name__ == "__main__":
    main()
