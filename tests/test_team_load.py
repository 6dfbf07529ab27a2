"""One tracking server on PostgreSQL under load: 8 trainings logging per-step and per-epoch
metrics at once, 2 readers searching runs, and the server killed and restarted in the middle.
Nothing is lost or doubled: every run ends FINISHED with every step exactly once, what the server
missed is delivered from the spools once. The latencies are printed (measured, not asserted)."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from support.load import EPOCH_KEYS, EPOCHS, STEP_KEY, STEPS_PER_EPOCH, reader, step_value, training
from support.postgres import postgres_bin
from support.servers import MlflowServer, started

TRAININGS, READERS = 8, 2


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else float("nan")
    )


@pytest.mark.slow
@pytest.mark.integration
def test_eight_trainings_and_two_readers_through_a_restarted_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if postgres_bin() is None:
        print("PostgreSQL is not installed: the server runs on sqlite instead")
        backend = f"sqlite:///{tmp_path / 'server.db'}"
    else:
        backend = request.getfixturevalue("postgres_uri")
    server = MlflowServer(tmp_path / "server", backend=backend, workers=4)
    context = multiprocessing.get_context("spawn")
    with started(server):
        processes = []
        for worker in range(TRAININGS):
            folder = tmp_path / f"training-{worker}"
            folder.mkdir()
            processes.append(
                context.Process(target=training, args=(server.url, str(folder), worker, 0.1))
            )
        for index in range(READERS):
            folder = tmp_path / f"reader-{index}"
            folder.mkdir()
            processes.append(context.Process(target=reader, args=(server.url, str(folder), 40.0)))
        started_at = time.monotonic()
        for process in processes:
            process.start()
        deadline = time.monotonic() + 180  # spawned processes start slowly on a busy machine
        while not all((tmp_path / f"training-{w}/started").exists() for w in range(TRAININGS)):
            assert time.monotonic() < deadline, "the trainings did not all start their runs"
            time.sleep(0.5)
        time.sleep(4)  # every training is logging
        server.kill()
        time.sleep(3)
        server.start()
        restarted = time.monotonic() - started_at
        for process in processes:
            process.join(300)
        assert [p.exitcode for p in processes] == [0] * len(processes)
        wall = time.monotonic() - started_at

        client = MlflowClient(server.url)
        results = [json.loads((tmp_path / f"training-{w}/result.json").read_text())
                   for w in range(TRAININGS)]  # fmt: skip
        spooled = [r for r in results if r["sync"]]
        assert spooled, "the restart hit no training: nothing was spooled"
        for worker, result in enumerate(results):
            run = client.get_run(result["run_id"])
            assert run.info.status == "FINISHED", (worker, run.info.status)
            history = client.get_metric_history(result["run_id"], STEP_KEY)
            steps = sorted(m.step for m in history)
            assert steps == list(range(EPOCHS * STEPS_PER_EPOCH)), (worker, steps)  # once each
            assert all(m.value == step_value(worker, m.step) for m in history)
            for key in EPOCH_KEYS:
                assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == (
                    list(range(EPOCHS))
                )

    logging = [t for r in results for t in r["latencies"]]
    readers = [
        json.loads((tmp_path / f"reader-{i}/result.json").read_text()) for i in range(READERS)
    ]
    searches = [t for r in readers for t in r["latencies"]]
    print(
        f"{TRAININGS} trainings x {EPOCHS * STEPS_PER_EPOCH + EPOCHS} logging calls, {READERS} "
        f"readers, server {'PostgreSQL' if 'postgresql' in backend else 'sqlite'} with 4 workers, "
        f"restarted at {restarted:.0f} s, all done in {wall:.0f} s\n"
        f"log_metrics answered: {len(logging)}, p50 {percentile(logging, 50) * 1000:.1f} ms, "
        f"p99 {percentile(logging, 99) * 1000:.1f} ms\n"
        f"search_runs answered: {len(searches)}, p50 {percentile(searches, 50) * 1000:.1f} ms, "
        f"p99 {percentile(searches, 99) * 1000:.1f} ms, refused while down: "
        f"{sum(r['failed'] for r in readers)}\n"
        f"trainings that spooled and synced: {len(spooled)}: "
        + "; ".join(line for r in spooled for line in r["sync"])
    )
