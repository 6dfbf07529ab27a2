"""`make bench-scale`: how prepare and one training epoch grow with the data.

Texts: IMDB's reviews at 1x, 4x and 16x their rows, as a user's `table` dataset (train, test and
unlabeled tables; 20 % of the training rows validate). Copy c > 0 of a review is the same review
with its sentences rotated by c places: new rows of the real reviews' words and lengths, not
duplicates (copies of one training review can land in train and validation, so the table
reports cost, not accuracy). Pictures: MNIST's 60,000 training images as a folder of PNG files,
an `images` dataset. Each prepare and one-epoch train stage runs in its own process in a
scratch workspace (its own params.yaml and MLflow store), with the project's tokenizer settings
and its first model of each family, the text model made smaller (`--text-model`, default one
layer and no bigram table) so that the 16x epoch takes minutes: what grows with the rows is the
data's path, which a small network shows best. Wall time and peak RSS come from wait4, the
peak anonymous RSS from /proc. Writes
reports/bench_scale.md and reports/bench_scale.json.

Read the time ratios (each factor's time over 1x's, against the factor), not the absolute
figures: machines of one kind differ 2x.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from bench import machine, measured  # scripts/bench.py: the same process timing and machine record

from dlpipe.errors import DlpipeError, exit_on_user_error
from dlpipe.io import read_json, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "data" / "raw"
MIB = 1024 * 1024
PARTIAL = ROOT / ".dlpipe" / "bench-scale-partial.json"
# The project's text settings that the scaled tables are prepared with (datasets.imdb's).
TOKENIZER_KEYS = (
    "tokenizer",
    "vocab_size",
    "min_frequency",
    "lowercase",
    "max_len",
    "truncation",
    "word_vectors_dim",
    "word_vectors_window",
)


def rotated(texts: pd.Series, copy: int) -> pd.Series:
    """Each text with its sentences rotated by `copy` places (copy 0: the text itself)."""
    if copy == 0:
        return texts

    def rotate(text: str) -> str:
        parts = text.split(". ")
        shift = copy % len(parts)
        return ". ".join(parts[shift:] + parts[:shift])

    return texts.map(rotate)


def scaled_tables(folder: Path, factor: int) -> dict[str, str]:
    """`folder/{train,test,unlabeled}.parquet`: IMDB's splits at `factor` times their rows."""
    folder.mkdir(parents=True)
    files = {}
    for split, name in (("train", "train"), ("test", "test"), ("unsup", "unlabeled")):
        raw = pd.read_parquet(RAW / "imdb" / f"{split}.parquet")
        copies = [
            pd.DataFrame(
                {
                    "id": raw["review_id"].astype(str) + f"#{copy}",
                    "text": rotated(raw["text"].astype(str), copy),
                    **({} if split == "unsup" else {"label": raw["label"].astype(int)}),
                }
            )
            for copy in range(factor)
        ]
        path = folder / f"{name}.parquet"
        pd.concat(copies, ignore_index=True).to_parquet(path, index=False)
        files[name] = str(path)
    return files


def mnist_folder(folder: Path) -> int:
    """MNIST's training images as `folder/<digit>/<n>.png`; the number of files written."""
    from PIL import Image

    with gzip.open(RAW / "mnist" / "train-images-idx3-ubyte.gz") as handle:
        _, count, rows, cols = struct.unpack(">IIII", handle.read(16))
        images = np.frombuffer(handle.read(), np.uint8).reshape(count, rows, cols)
    with gzip.open(RAW / "mnist" / "train-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read()[8:], np.uint8)
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(folder / str(label) / f"{i}.png")
    return count


class Workspace:
    """A scratch project: the project's params with one dataset and one model added."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        (folder / "stages").symlink_to(ROOT / "stages")
        self.params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "PYTHONUNBUFFERED": "1",
        }

    def measure(
        self, dataset: dict[str, Any], family: str, model: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """prepare@scale, then one epoch of train@scale_model: the project's first model of
        `family`, its `model` section updated with `model`."""
        base = next(s for s in self.params["train"].values() if s["family"] == family)
        base = {
            **base,
            "dataset": "scale",
            "epochs": 1,
            "model": {**base["model"], **(model or {})},
        }
        self.params["datasets"] = {"scale": dataset}
        self.params["train"] = {"scale_model": base}
        self.params["gates"] = {}
        text = yaml.safe_dump(self.params, sort_keys=False)
        (self.folder / "params.yaml").write_text(text, encoding="utf-8")
        python = sys.executable
        prep = measured([python, "stages/prepare.py", "scale"], self.folder, self.env)
        train = measured([python, "stages/train.py", "scale_model"], self.folder, self.env)
        card = read_json(self.folder / "reports" / "data" / "scale.json")
        trained = read_json(self.folder / "reports" / "models" / "scale_model" / "train.json")
        prepared = sum(f.stat().st_size for f in (self.folder / "data/prepared/scale").iterdir())
        return {
            "rows": {split: card[split]["count"] for split in ("train", "val", "test")},
            "prepare_s": round(prep.wall_s, 1),
            "prepare_rss_mib": round(prep.peak_rss_mib),
            "prepare_anon_mib": _mib(prep.peak_anon_mib),
            "prepared_mib": round(prepared / MIB),
            "epoch_s": round(trained["train_time_s"], 1),
            "train_stage_s": round(train.wall_s, 1),
            "train_rss_mib": round(train.peak_rss_mib),
            "train_anon_mib": _mib(train.peak_anon_mib),
            "model": " ".join([family, *(f"{k}={v}" for k, v in (model or {}).items())])
            + f", batch {base['batch_size']}",
        }


def _mib(value: float | None) -> int | None:
    return None if value is None else round(value)


def run(
    factors: list[int], family: str, text_model: dict[str, Any], images: bool
) -> dict[str, Any]:
    for raw in ("mnist", "imdb"):
        if not (RAW / raw).is_dir():
            raise DlpipeError(f"data/raw/{raw}: missing; run `dvc repro fetch` first")
    scratch = Path(tempfile.mkdtemp(prefix="dlpipe-bench-scale-"))
    project = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    imdb = {key: project["datasets"]["imdb"][key] for key in TOKENIZER_KEYS}
    rows: dict[str, dict[str, Any]] = {}
    try:
        if images:
            print("bench-scale: a folder of 60,000 PNG files", flush=True)
            work = Workspace(scratch / "images")
            files = mnist_folder(work.folder / "own" / "digits")
            dataset: dict[str, Any] = {
                "format": "images",
                "path": str(work.folder / "own" / "digits"),
                "image_size": [28, 28],
                "channels": 1,
                "val_size": 5000,
                "test_size": 10000,
            }
            rows[f"images {files:,} files"] = {"factor": 1, **work.measure(dataset, "cnn")}
            write_json_atomic(PARTIAL, rows)  # a later failure keeps what was measured
        for factor in factors:
            print(f"bench-scale: texts {factor}x", flush=True)
            work = Workspace(scratch / f"texts-{factor}x")
            tables = scaled_tables(work.folder / "own", factor)
            dataset = {
                **imdb,
                "format": "table",
                "path": tables["train"],
                "test": tables["test"],
                "unlabeled": tables["unlabeled"],
                "id": "id",
                "val_size": 0.2,
            }
            rows[f"texts {factor}x"] = {
                "factor": factor,
                **work.measure(dataset, family, text_model),
            }
            write_json_atomic(PARTIAL, rows)
            shutil.rmtree(work.folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"machine": machine(), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    rows, m = result["rows"], result["machine"]
    texts = [r for name, r in rows.items() if name.startswith("texts")]
    first = texts[0] if texts else None
    lines = [
        "# Cost as the data grows (`make bench-scale`)",
        "",
        f"Generated by scripts/bench_scale.py on {m['cpu']} ({m['cores']} cores; "
        f"{m['cpu_flags']}), torch {m['torch']}, {m['date']}; do not edit.",
        "",
        "Peak RSS counts every page a process touched, the memory-mapped prepared splits "
        "included (page cache the kernel can drop); anonymous is the memory the process alone "
        "holds.",
        "",
        "| data | train/val/test rows | prepare s (x of 1x) | prepare peak RSS (anonymous) | "
        "prepared | one epoch s (x of 1x) | train peak RSS (anonymous) | model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        prep, epoch = str(row["prepare_s"]), str(row["epoch_s"])
        if name.startswith("texts") and first is not None:
            prep += f" ({row['prepare_s'] / first['prepare_s']:.1f}x)"
            epoch += f" ({row['epoch_s'] / first['epoch_s']:.1f}x)"
        counts = "/".join(f"{row['rows'][s]:,}" for s in ("train", "val", "test"))
        cells = [
            name,
            counts,
            prep,
            _memory(row["prepare_rss_mib"], row.get("prepare_anon_mib")),
            f"{row['prepared_mib']:,} MiB",
            epoch,
            _memory(row["train_rss_mib"], row.get("train_anon_mib")),
            row["model"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _memory(peak: int, anon: int | None) -> str:
    return f"{peak:,} MiB" + (f" ({anon:,})" if anon is not None else "")


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--family", default="transformer", help="the text family trained")
    parser.add_argument(
        "--text-model",
        type=json.loads,
        default={"layers": 1, "bigram_buckets": 0},
        help="JSON: keys of the text model's `model` section to change",
    )
    parser.add_argument("--no-images", action="store_true", help="skip the PNG folder")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    result = run(args.factors, args.family, args.text_model, not args.no_images)
    write_json_atomic(args.out / "bench_scale.json", result)
    (args.out / "bench_scale.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
