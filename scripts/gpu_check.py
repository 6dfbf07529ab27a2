"""`make gpu-check`: the GPU path, checked on a GPU in one call (about 5 minutes on one H100/H200).

On a CUDA machine it runs, in order:

1. the `gpu` tests (tests/training/test_gpu.py: real compute dtypes, CUDA vs CPU loss, MLflow GPU
   metrics);
2. the whole pipeline on the full data with `device: cuda` for every family, in a throw-away copy
   of the working tree (`dlpipe.smoke`'s workspace, DVC run and checks, with the project's own
   params instead of the smoke slices);
3. with 2 or more GPUs, the first family of params.yaml (the CNN) trained and evaluated again in
   that copy as 2 DDP processes (`train.<family>.nproc: 2`, NCCL);

then prints one table (per model: epochs, s/epoch, samples/s, val and test accuracy, peak GPU
memory, the precision the kernels really used) and writes it, with the raw numbers, to
`--out` (default .dlpipe/gpu-check/: table.md, gpu-check.json, the pipeline's reports).

Without CUDA it says so in one line and exits 0. Exit 1 when a step fails (the table holds what
was measured), 2 on a usage problem.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dlpipe.tables import format_table

ROOT = Path(__file__).resolve().parents[1]
HEADER = [
    "model",
    "GPUs",
    "epochs",
    "s/epoch",
    "samples/s",
    "val acc",
    "test acc",
    "peak GPU MB",
    "precision",
]


def no_gpu_reason() -> str | None:
    """None on a usable CUDA machine; else why not, for the one line printed."""
    import torch

    from dlpipe.training.runtime import cuda_unusable_reason, nvidia_driver_present

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not nvidia_driver_present():
        return "no NVIDIA driver on this machine"
    return cuda_unusable_reason() or "torch sees no CUDA device"


def full_run_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Merged over the smoke settings, the project's own params (full data, its epochs and
    models), with every family on the GPU."""
    return {
        "datasets": raw.get("datasets", {}),
        "evaluate": raw.get("evaluate", {}),
        "train": {name: {**section, "device": "cuda"} for name, section in raw["train"].items()},
    }


def model_row(reports: Path, model: str, label: str, gpus: int) -> list[str]:
    """One table row from a model's train.json, history.csv and eval.json."""
    train = json.loads((reports / model / "train.json").read_text())
    with open(reports / model / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    evaluation = json.loads((reports / model / "eval.json").read_text())
    seconds = [float(row["epoch_time_s"]) for row in history]
    peaks = [float(row["peak_gpu_memory_mb"]) for row in history if row.get("peak_gpu_memory_mb")]
    return [
        label,
        str(gpus),
        str(train["epochs"]),
        f"{sum(seconds) / len(seconds):.2f}",
        f"{train['samples_per_s']:,.0f}",
        f"{train['best']['val_accuracy']:.4f}",
        f"{evaluation['test_accuracy']:.4f}",
        f"{max(peaks):,.0f}" if peaks else "n/a",
        str(train["precision"]),
    ]


def run_step(name: str, command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> bool:
    """A command with its output streamed; True when it exits 0 within `timeout`."""
    print(f"gpu-check: {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(command, cwd=cwd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu-check: {name}: over {timeout:.0f}s, stopped", flush=True)
        return False
    print(f"gpu-check: {name}: exit {code} in {time.perf_counter() - start:.0f}s", flush=True)
    return code == 0


def pipeline(out: Path, mirror: str | None, work: Path) -> Path | None:
    """The full pipeline on the GPU in a copy kept under `work`: the copy's repo when it passed
    every smoke check, else None."""
    from dlpipe.smoke.run import run_smoke

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    code = run_smoke(
        ROOT, out, mirror, keep=True, extra=full_run_overrides(raw), timeout=480, tmp_base=str(work)
    )
    copies = list(work.glob("dlpipe-smoke-*/repo"))
    return copies[0] if code == 0 and copies else None


def data_parallel(repo: Path, mirror: str | None, model: str, gpus: int) -> bool:
    """train@<model> and evaluate@<model> as `gpus` DDP processes, in the pipeline's copy."""
    from dlpipe.smoke.workspace import isolated_env

    params = repo / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["train"][model]["nproc"] = gpus
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    env = isolated_env(repo, repo.parent, mirror)
    command = [sys.executable, "-m", "dvc", "repro", f"train@{model}", f"evaluate@{model}"]
    return run_step(f"{model} on {gpus} GPUs (DDP)", command, repo, env, timeout=240)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".dlpipe/gpu-check", help="where the table is written")
    parser.add_argument(
        "--mirror",
        default=os.environ.get("DLPIPE_DATA_MIRROR"),
        help="data mirror for fetch (default: $DLPIPE_DATA_MIRROR)",
    )
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no GPU ({reason}); nothing to check")
        return 0
    import torch

    out = (ROOT / args.out).resolve()
    mirror = args.mirror
    if mirror and "://" not in mirror:
        mirror = str(Path(mirror).expanduser().resolve())
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/training/test_gpu.py"]
    passed = {"gpu tests": run_step("gpu tests", tests, ROOT, env, timeout=240)}
    rows: list[list[str]] = []
    work = Path(tempfile.mkdtemp(prefix="dlpipe-gpu-check-"))
    try:
        repo = pipeline(out / "pipeline", mirror, work)
        passed["pipeline"] = repo is not None
        reports = out / "pipeline" / "reports" / "models"
        models = sorted(p.name for p in reports.iterdir()) if reports.is_dir() else []
        rows += [model_row(reports, model, model, 1) for model in models]
        if gpus >= 2 and repo is not None:
            first = next(iter(yaml.safe_load((ROOT / "params.yaml").read_text())["train"]))
            passed[f"{first} DDP"] = data_parallel(repo, mirror, first, 2)
            if passed[f"{first} DDP"]:
                rows.append(model_row(repo / "reports" / "models", first, f"{first} (DDP)", 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = ", ".join(f"{step} {'PASS' if ok else 'FAIL'}" for step, ok in passed.items())
    title = f"GPU check on {gpus} x {name}, torch {torch.__version__}: {steps}"
    table = format_table(HEADER, rows, markdown=True) if rows else "(no model finished)"
    (out / "table.md").write_text(f"## {title}\n\n{table}\n", encoding="utf-8")
    summary = {"gpus": gpus, "device": name, "steps": passed, "header": HEADER, "rows": rows}
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n== {title}\n{table}\n(written to {out / 'table.md'})")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
