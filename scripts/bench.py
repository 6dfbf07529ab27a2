"""`make bench`: dlpipe's defaults beside the programs people would run instead, in one run.

On this machine, one after another: the prepare stages, then per dataset the published programs
(scripts/bench_programs.py: Keras CNN, a tutorial PyTorch loop, the Keras BiLSTM and Transformer
examples, TF-IDF + logistic regression) and dlpipe's train stages with the project's params, each
in its own process (peak RSS from wait4). Stages run in a scratch workspace (its own MLflow
store), so the project's outputs and runs stay untouched. Then a no-op `dvc repro` in the project.

Timings vary 2x between machines and +-25 % between runs: read the ratios, which are measured in
the same run. Writes reports/bench.md and reports/bench.json. `--quick` (CI): data slices, one
epoch per program, dlpipe at its smoke settings; its numbers say nothing about the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlpipe.errors import DlpipeError, exit_on_user_error
from dlpipe.io import read_json, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
KERAS_PYTHON = ROOT / ".venv-keras" / "bin" / "python"
# name -> (dataset, kind, who runs it). Each kind's yardstick is its first program.
PROGRAMS: dict[str, tuple[str, str, str]] = {
    "keras-cnn": ("mnist", "cnn", "keras"),
    "torch-cnn": ("mnist", "cnn", "python"),
    "cnn": ("mnist", "cnn", "dlpipe"),
    "tfidf": ("imdb", "linear", "python"),
    "tfidf-20k": ("imdb", "linear", "python"),
    "nbsvm": ("imdb", "linear", "python"),
    "nbsvm-20k": ("imdb", "linear", "python"),
    "keras-bilstm": ("imdb", "rnn", "keras"),
    "rnn": ("imdb", "rnn", "dlpipe"),
    "keras-transformer": ("imdb", "transformer", "keras"),
    "transformer": ("imdb", "transformer", "dlpipe"),
}


# Each text model's points over the best linear model fit on all 25k training reviews, and on the
# 20k that dlpipe's models train on.
LINEAR_YARDSTICKS = {
    "points_over_linear": ("tfidf", "nbsvm"),
    "points_over_linear_20k": ("tfidf-20k", "nbsvm-20k"),
}


@dataclass(frozen=True)
class Measured:
    """A finished process: wall time, peak RSS (wait4: every page it touched, memory-mapped files
    included), peak anonymous RSS (sampled from /proc: memory only the process holds, not page
    cache the kernel can drop; None where there is no /proc) and its standard output."""

    wall_s: float
    peak_rss_mib: float
    peak_anon_mib: float | None
    output: str


def measured(command: list[str], cwd: Path, env: dict[str, str]) -> Measured:
    """Run `command` and measure it; its standard output also passes through (standard error,
    with the progress bars, goes straight to the terminal)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    anon: list[float] = []
    sampler = threading.Thread(target=_sample_anon, args=(process, anon), daemon=True)
    sampler.start()
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise DlpipeError(f"bench: {' '.join(command[1:3])} failed (exit {status >> 8})")
    return Measured(wall, usage.ru_maxrss / 1024, max(anon) if anon else None, "".join(lines))


def _sample_anon(process: subprocess.Popen[str], peaks: list[float]) -> None:
    """Append RssAnon (MiB) of `process` every 50 ms while it runs."""
    status = Path(f"/proc/{process.pid}/status")
    while process.returncode is None:
        try:
            text = status.read_text()
        except OSError:  # gone, or no /proc
            return
        match = re.search(r"^RssAnon:\s+(\d+) kB", text, re.M)
        if match is None:
            return
        peaks.append(int(match[1]) / 1024)
        time.sleep(0.05)


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Run `command`; its wall time (s), peak RSS (MiB) and standard output."""
    run = measured(command, cwd, env)
    return run.wall_s, run.peak_rss_mib, run.output


class Workspace:
    """A scratch copy of the project's params with the stage scripts, reading the project's raw
    data: dlpipe's stages run here exactly as `dvc repro` runs them."""

    def __init__(self, folder: Path, quick: bool) -> None:
        self.folder = folder
        raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        if quick:
            from dlpipe.smoke.params import smoke_params

            raw = smoke_params(raw)
        self.params = raw
        (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        (folder / "stages").symlink_to(ROOT / "stages")
        (folder / "data").mkdir()
        (folder / "data" / "raw").symlink_to(ROOT / "data" / "raw")
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "PYTHONUNBUFFERED": "1",
        }

    def stage(self, script: str, arg: str) -> tuple[float, float, str]:
        return timed([sys.executable, f"stages/{script}.py", arg], self.folder, self.env)

    def dlpipe_program(self, name: str) -> dict[str, Any]:
        """train@name with the project's params; held-out = its validation split."""
        wall, rss, output = self.stage("train", name)
        record = stage_record(self.folder, name, self.params)
        model_dir = self.folder / "data" / "models" / name
        model, test = load_shipped(model_dir, self.folder)
        return {**record, **shipped_figures(model_dir, model, test),
                "test_accuracy": round(test_accuracy(model, test), 4),
                "stage_wall_s": round(wall, 1), "peak_rss_mib": round(rss),
                "mlflow_logging_s": mlflow_logging_s(output)}  # fmt: skip


LATENCY_ROWS = 256  # rows answered at once; timed as the evaluate stage times them


def load_shipped(model_dir: Path, root: Path) -> tuple[Any, Any]:
    """A train stage's model as evaluate and serving load it, and its dataset's test split."""
    import torch

    from dlpipe.family import load_trained

    model, info, family = load_trained(model_dir)
    prepared = root / "data" / "prepared" / info["dataset"]
    return model, family.inputs.load_split(prepared, "test", torch.device("cpu"))


def shipped_figures(model_dir: Path, model: Any, test: Any) -> dict[str, Any]:
    """What a user ships: model.pt's size (MiB, as eval.json's model_size_mb) and the CPU's
    median time (ms) to answer LATENCY_ROWS test rows at once, as the evaluate stage times it."""
    from dlpipe.config import load_params
    from dlpipe.evaluation.metrics import latency
    from dlpipe.training.runtime import make_runtime

    repeats = load_params(ROOT / "params.yaml").evaluate.latency_repeats
    ms = latency(model, test, make_runtime("cpu", "fp32"), LATENCY_ROWS, repeats)
    return {
        "model_mb": round((model_dir / "model.pt").stat().st_size / 2**20, 1),
        "latency_ms": round(ms, 1),
    }


def test_accuracy(model: Any, test: Any) -> float:
    from dlpipe.training.runtime import make_runtime
    from dlpipe.training.trainer import predict_logits

    logits = predict_logits(model, test, make_runtime("cpu", "fp32"), 512)
    return float((logits.argmax(1) == test.labels).float().mean())


def mlflow_logging_s(output: str) -> float | None:
    """What the train stage printed of its closing MLflow logging (metrics, plot, model)."""
    found = re.search(r"MLflow logging took ([0-9.]+)s", output)
    return float(found.group(1)) if found else None


def stage_record(root: Path, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a train stage recorded in `root`/reports: its epochs and validation accuracies."""
    import csv

    reports = root / "reports" / "models" / name
    trained = read_json(reports / "train.json")
    with open(reports / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    data = read_json(root / "reports" / "data" / f"{trained['dataset']}.json")
    batch = params["train"][name]["batch_size"]
    return {
        "program": f"dlpipe train@{name}, {trained['precision']}, batch {batch}",
        "train_samples": data["train"]["count"],
        "epoch_times_s": [round(float(row["epoch_time_s"]), 2) for row in history],
        "heldout": "val",
        "heldout_accuracy": [round(float(row["val_accuracy"]), 4) for row in history],
    }


def reused_program(name: str) -> dict[str, Any]:
    """train@name as the project's last `make repro` ran it on this machine (--reuse): its own
    records, with the evaluate stage's test accuracy; no per-stage peak RSS is kept there."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    record = stage_record(ROOT, name, params)
    trained = read_json(ROOT / "reports" / "models" / name / "train.json")
    evaluated = read_json(ROOT / "reports" / "models" / name / "eval.json")
    model_dir = ROOT / "data" / "models" / name
    return {
        **record,
        **shipped_figures(model_dir, *load_shipped(model_dir, ROOT)),
        "program": record["program"] + " (from the last make repro, not rerun)",
        "test_accuracy": round(evaluated["test_accuracy"], 4),
        "stage_wall_s": trained["wall_time_s"],
        "peak_rss_mib": None,
    }


def other_program(name: str, runner: str, quick: bool, scratch: Path) -> dict[str, Any]:
    python = str(KERAS_PYTHON) if runner == "keras" else sys.executable
    out = scratch / f"{name}.json"
    command = [python, str(ROOT / "scripts" / "bench_programs.py"), name, "--out", str(out)]
    raw = ROOT / "data" / "raw"
    command += ["--mnist", str(raw / "mnist"), "--imdb", str(raw / "imdb")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    wall, rss, _ = timed(command + (["--quick"] if quick else []), scratch, env)
    record: dict[str, Any] = json.loads(out.read_text())
    return {**record, "stage_wall_s": round(wall, 1), "peak_rss_mib": round(rss)}


def summarise(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """The per-program figures of the table, from its epoch times and held-out accuracies."""
    times, heldout = record["epoch_times_s"], record["heldout_accuracy"]
    train_time = sum(times)
    best = max(range(len(heldout)), key=lambda i: heldout[i])
    dataset, kind, _ = PROGRAMS[name]
    return {
        **record,
        "name": name,
        "dataset": dataset,
        "kind": kind,
        "epochs": len(times),
        "median_epoch_s": round(statistics.median(times), 2),
        "train_time_s": round(train_time, 1),
        "samples_per_s": round(record["train_samples"] * len(times) / train_time),
        "time_to_best_s": round(sum(times[: best + 1]), 1),
    }


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Each program's training time over its kind's yardstick (the first of its kind)."""
    yardstick: dict[str, str] = {}
    for name, row in rows.items():
        first = yardstick.setdefault(row["kind"], name)
        row["time_vs_yardstick"] = round(row["train_time_s"] / rows[first]["train_time_s"], 3)
        row["yardstick"] = first
    for key, linear in LINEAR_YARDSTICKS.items():
        accuracies = [rows[name]["test_accuracy"] for name in linear if name in rows]
        if accuracies:
            for row in rows.values():
                if row["dataset"] == "imdb":
                    row[key] = round(100 * (row["test_accuracy"] - max(accuracies)), 2)


def noop_repro_s() -> float | None:
    """`dvc repro` in the project when nothing changed (None when something did: it would run)."""
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run([*dvc, "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        return None
    start = time.perf_counter()
    subprocess.run([*dvc, "repro"], cwd=ROOT, check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def machine() -> dict[str, Any]:
    import sklearn
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    info = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    line = next((x for x in info if x.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    flags = " ".join(f for f in wanted if f" {f}" in line)
    model = next((x.split(":", 1)[1].strip() for x in info if "model name" in x), "")
    keras = subprocess.run(
        [str(KERAS_PYTHON), "-c", "import tensorflow as t; print(t.__version__)"],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout.strip() if KERAS_PYTHON.exists() else "not installed"  # fmt: skip
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tensorflow": keras,
        "scikit_learn": sklearn.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run(quick: bool, only: list[str], reuse: list[str]) -> dict[str, Any]:
    names = [n for n in PROGRAMS if not only or n in only]
    if any(PROGRAMS[n][2] == "keras" for n in names) and not KERAS_PYTHON.exists():
        raise DlpipeError(f"{KERAS_PYTHON}: missing; `make bench` creates it (TensorFlow)")
    for dataset in ("mnist", "imdb"):
        if not (ROOT / "data" / "raw" / dataset).is_dir():
            raise DlpipeError(f"data/raw/{dataset}: missing; run `dvc repro fetch` first")
    scratch = Path(tempfile.mkdtemp(prefix="dlpipe-bench-"))
    partial = ROOT / ".dlpipe" / "bench-partial.json"
    try:
        work = Workspace(scratch, quick)
        prepare = {}
        for dataset in sorted({PROGRAMS[n][0] for n in names if n not in reuse}):
            wall, rss, _ = work.stage("prepare", dataset)
            prepare[dataset] = {"wall_s": round(wall, 1), "peak_rss_mib": round(rss)}
        rows = {}
        for name in names:
            runner = PROGRAMS[name][2]
            print(f"bench: {name}", flush=True)
            if name in reuse:
                record = reused_program(name)
            elif runner == "dlpipe":
                record = work.dlpipe_program(name)
            else:
                record = other_program(name, runner, quick, scratch)
            rows[name] = summarise(name, record)
            write_json_atomic(partial, rows)  # a later failure keeps what was measured
        add_ratios(rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "quick": quick,
        "machine": machine(),
        "programs": rows,
        "prepare": prepare,
        "noop_repro_s": None if quick else noop_repro_s(),
    }


def targets(
    rows: dict[str, dict[str, Any]], noop_repro_s: float | None = None
) -> list[tuple[str, bool]]:
    """Each target whose programs ran in this bench: its wording with the measured figures."""
    checks: list[tuple[str, bool]] = []
    cnn, keras, loop = rows.get("cnn"), rows.get("keras-cnn"), rows.get("torch-cnn")
    if cnn:
        acc = cnn["test_accuracy"]
        checks.append((f"cnn test accuracy {100 * acc:.2f} % >= 99.2 %", acc >= 0.992))
    for name, base, limit in (("keras-cnn", keras, 0.5), ("torch-cnn", loop, 0.3)):
        if cnn and base:
            ratio = cnn["train_time_s"] / base["train_time_s"]
            checks.append((f"cnn training time {ratio:.2f}x {name}'s <= {limit}x", ratio <= limit))
    if cnn and loop:
        ratio = cnn["samples_per_s"] / loop["samples_per_s"]
        checks.append((f"cnn samples/s {ratio:.1f}x the tutorial loop's >= 3x", ratio >= 3))
    for name, floor in (("rnn", 0.92), ("transformer", 0.92)):
        if name in rows:
            acc = rows[name]["test_accuracy"]
            checks.append(
                (f"{name} test accuracy {100 * acc:.2f} % >= {100 * floor:.1f} %", acc >= floor)
            )
            for key, data in (
                ("points_over_linear_20k", "the same 20k reviews"),
                ("points_over_linear", "all 25k training reviews"),
            ):
                if key in rows[name]:
                    points = rows[name][key]
                    what = f"{name} >= 0.5 points over the best linear model fit on {data}"
                    checks.append((f"{what} ({points:+.2f} points)", points >= 0.5))
    for name, row in rows.items():
        if row.get("mlflow_logging_s") is not None:
            share = row["mlflow_logging_s"] / row["train_time_s"]
            checks.append(
                (f"{name}: MLflow's closing logging {100 * share:.1f} % of its training time "
                 "< 2 %", share < 0.02)
            )  # fmt: skip
    if noop_repro_s is not None:
        checks.append((f"no-op `dvc repro` {noop_repro_s} s < 1.5 s", noop_repro_s < 1.5))
    return checks


def rss(mib: int | None) -> str:
    return "n/a" if mib is None else f"{mib:,} MiB"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# dlpipe beside the programs people run instead"
        + (" (--quick: slices)" if result["quick"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {m['cpu_flags'] or '-'}; "
        f"Python {m['python']}, PyTorch {m['torch']}, TensorFlow {m['tensorflow']}, "
        f"scikit-learn {m['scikit_learn']}; {m['date']}. Written by `make bench` "
        "(scripts/bench.py): one run, one program at a time; compare ratios, not seconds.",
        "",
        "| program | what | epochs | median epoch | samples/s | train time | to best | "
        "test acc | vs best linear 25k / 20k | peak RSS | time vs yardstick | model.pt | "
        f"latency, {LATENCY_ROWS} rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["programs"].items():
        points = " / ".join(f"{r[key]:+.2f}" for key in LINEAR_YARDSTICKS if key in r)
        shipped = (
            f"{r['model_mb']:.1f} MiB | {r['latency_ms']:.0f} ms" if "model_mb" in r else "- | -"
        )
        lines.append(
            f"| {name} | {r['program']} | {r['epochs']} | {r['median_epoch_s']:.1f} s | "
            f"{r['samples_per_s']:,} | {r['train_time_s']:.1f} s | {r['time_to_best_s']:.1f} s "
            f"({r['heldout']}) | {100 * r['test_accuracy']:.2f} % | "
            f"{points + ' pt' if points else ''} | {rss(r['peak_rss_mib'])} | "
            f"{r['time_vs_yardstick']:.2f}x {r['yardstick']} | {shipped} |"
        )
    lines += ["", "Targets (issues #13 and #23), judged from the rows above:", ""]
    verdicts = targets(result["programs"], result["noop_repro_s"])
    lines += [f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in verdicts]
    lines += ["", "Pipeline costs:", ""]
    for dataset, cost in result["prepare"].items():
        lines.append(
            f"- prepare@{dataset}: {cost['wall_s']} s, peak RSS {cost['peak_rss_mib']:,} MiB"
        )
    noop = result["noop_repro_s"]
    unmeasured = "not measured (quick, or the project is not up to date)"
    lines.append(f"- no-op `dvc repro`: {unmeasured if noop is None else f'{noop} s'}")
    for name, r in result["programs"].items():
        if r["heldout"] == "val" and r["peak_rss_mib"] is not None:  # a dlpipe stage, run here
            overhead = r["stage_wall_s"] - r["train_time_s"]
            lines.append(
                f"- train@{name}: stage wall {r['stage_wall_s']} s, of which {overhead:.1f} s "
                f"({100 * overhead / r['stage_wall_s']:.1f} %) outside the epochs (start-up, "
                "data, MLflow, outputs)"
                + (f"; MLflow's closing logging (metrics, plot, model) took "
                   f"{r['mlflow_logging_s']} s" if r.get("mlflow_logging_s") is not None else "")
            )  # fmt: skip
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="slices, one epoch each (CI)")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(PROGRAMS))
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    dlpipe = sorted(n for n, (_, _, runner) in PROGRAMS.items() if runner == "dlpipe")
    parser.add_argument(
        "--reuse", nargs="*", default=[], choices=dlpipe,
        help="take these dlpipe trainings from the project's last make repro (same machine) "
        "instead of training them again",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick and args.reuse:
        raise DlpipeError("--reuse takes full-data trainings: not with --quick")
    result = run(args.quick, args.only, args.reuse)
    stem = "bench-quick" if args.quick else "bench"
    write_json_atomic(args.out / f"{stem}.json", result)
    (args.out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
