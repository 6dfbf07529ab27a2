"""Promotions racing from separate processes on one tracking server, a round at a time: each
worker is a clone on its own machine (its own folder and client, nothing shared but the server),
with random delays around every registry call so that reads and writes interleave."""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROUNDS, WORKERS = 20, 3
MODEL = "race"  # registered as dlpipe-race
SLOWED = (
    "create_model_version",
    "search_model_versions",
    "get_registered_model",
    "set_registered_model_alias",
)


def _slowed(client: Any, rng: random.Random) -> Any:
    """`client` with a random pause of up to 60 ms before and after each registry call."""

    def slowed(call: Any) -> Any:
        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(rng.uniform(0, 0.06))
            result = call(*args, **kwargs)
            time.sleep(rng.uniform(0, 0.06))
            return result

        return slow

    for name in SLOWED:
        setattr(client, name, slowed(getattr(client, name)))
    return client


def _worker(uri: str, folder: str, index: int, barrier: threading.Barrier) -> None:
    from mlflow.tracking import MlflowClient

    from dlpipe.config import RegistryConfig
    from dlpipe.registry import register_and_promote

    os.chdir(folder)
    rng = random.Random(index)
    client = _slowed(MlflowClient(uri), rng)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    for round_ in range(ROUNDS):
        barrier.wait()
        time.sleep(rng.uniform(0, 0.2))
        value = round(0.5 + 0.5 * rng.random() * (round_ + 1) / ROUNDS, 4)  # champions move
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, "test_accuracy", value)
        metrics = {"test_accuracy": value}
        source = f"runs:/{run_id}/model"
        register_and_promote(MODEL, source, run_id, metrics, RegistryConfig(), client)
        barrier.wait()


def run_race(uri: str, folder: Path) -> Iterator[list[tuple[int, float]]]:
    """Run ROUNDS rounds of WORKERS concurrent promotions; after each, every version so far as
    (version, test_accuracy), in version order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(MODEL) is None:
        client.create_experiment(MODEL)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS + 1, timeout=180)
    workers = []
    for index in range(WORKERS):
        clone = folder / f"clone-{index}"
        clone.mkdir()
        workers.append(
            context.Process(target=_worker, args=(uri, str(clone), index, barrier), daemon=True)
        )
        workers[-1].start()
    try:
        for _ in range(ROUNDS):
            barrier.wait()  # go
            barrier.wait()  # every worker has promoted
            versions = client.search_model_versions(f"name = 'dlpipe-{MODEL}'")
            yield sorted((int(v.version), float(v.tags["test_accuracy"])) for v in versions)
    finally:
        barrier.abort()  # a failed check must not leave the workers waiting for the next round
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
        assert [w.exitcode for w in workers] == [0] * WORKERS, "a racing promotion failed"
