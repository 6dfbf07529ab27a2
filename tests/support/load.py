"""Trainings and readers loading one tracking server, each a process of its own in a folder of its
own. A training logs through `StageRun` (the train stage's own path: the spool when the server
stops answering), then delivers its spool with `spool.sync`, as `dlpipe sync` does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EPOCHS, STEPS_PER_EPOCH = 4, 30
STEP_KEY, EPOCH_KEYS = "train_loss_step", ("train_loss", "val_loss", "val_accuracy")


def step_value(worker: int, step: int) -> float:
    return round(1.0 / (1 + step) + worker / 1000, 6)


def training(uri: str, folder: str, worker: int, pause_s: float) -> None:
    """One training: a step metric at every step, three epoch metrics each epoch; writes
    `result.json` (its run id, the latency of every logging call the server answered)."""
    from dlpipe.tracking import spool
    from dlpipe.tracking.run import StageRun

    os.chdir(folder)
    run = StageRun(uri, required=True)
    run.start("load", f"load-{worker}", None, {"model": f"load-{worker}"}, {"worker": worker}, 1.0)
    Path("started").touch()  # the test restarts the server once every training is logging
    latencies: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:
        was_active, started = run.active, time.perf_counter()
        run.log_metrics(metrics, step=step)
        if was_active and run.active:
            latencies.append(time.perf_counter() - started)

    for epoch in range(EPOCHS):
        for batch in range(STEPS_PER_EPOCH):
            step = epoch * STEPS_PER_EPOCH + batch
            log({STEP_KEY: step_value(worker, step)}, step)
            time.sleep(pause_s)  # the batch's work
        log({key: step_value(worker, epoch) for key in EPOCH_KEYS}, epoch)
    run.end("FINISHED")
    delivered: list[str] = []
    deadline = time.monotonic() + 180
    while run.run_id and (Path(".dlpipe/spool") / f"{run.run_id}.jsonl").exists():
        try:
            delivered += spool.sync(run.run_id)
        except Exception:  # the server is still down: try again
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    result: dict[str, Any] = {"run_id": run.run_id, "latencies": latencies, "sync": delivered}
    Path("result.json").write_text(json.dumps(result))


def reader(uri: str, folder: str, stop_after_s: float) -> None:
    """Searches runs as the UI's comparison view does until `stop_after_s`; writes `result.json`
    (the latency of every search the server answered, and how many it did not)."""
    from mlflow.tracking import MlflowClient

    os.chdir(folder)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    client, latencies, failed = MlflowClient(uri), [], 0
    end = time.monotonic() + stop_after_s
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            experiment = client.get_experiment_by_name("load")
            if experiment is not None:
                client.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"metrics.{STEP_KEY} > 0",
                    order_by=[f"metrics.{STEP_KEY} DESC"],
                    max_results=100,
                )
            latencies.append(time.perf_counter() - started)
        except Exception:  # the server is restarting
            failed += 1
            time.sleep(0.5)
    Path("result.json").write_text(json.dumps({"latencies": latencies, "failed": failed}))
