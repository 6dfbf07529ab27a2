"""fetch_all(): tiny mirrors in place of the real data, all-or-nothing output, the stage script."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pandas as pd
import pooch.core
import pytest
from support.archives import TINY_IMDB

from dlpipe.config import FetchConfig, load_params, parse_params
from dlpipe.data.download import MIRROR_HINT, ChecksumError, RemoteFile, SourcesExhaustedError
from dlpipe.data.fetch import fetch_all, fetched_datasets, summary_lines
from dlpipe.datasets import DatasetFormat, imdb, mnist
from dlpipe.datasets.imdb import ImdbSources, read_aclimdb_archive
from dlpipe.datasets.mnist import MNIST_FILES, MnistSources
from dlpipe.errors import DlpipeError

if TYPE_CHECKING:
    from support.servers import Server

ROOT = Path(__file__).resolve().parents[2]
CFG = FetchConfig(connect_timeout_s=1.0, read_timeout_s=1.0, retries=1)
# The built-in datasets the fetch stage downloads, in params.yaml's order.
DATASETS: dict[str, DatasetFormat] = {"mnist": mnist.FORMAT, "imdb": imdb.FORMAT}
# Substitute sources, by format name (FetchContext.sources).
Sources = dict[str, MnistSources | ImdbSources]


def idx_gz(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = struct.pack(f">{1 + len(dims)}I", magic, *dims)
    return gzip.compress(header + payload, mtime=0)


TINY_MNIST = {
    "train-images-idx3-ubyte.gz": idx_gz(2051, (3, 28, 28), bytes(range(256)) * 9 + bytes(48)),
    "train-labels-idx1-ubyte.gz": idx_gz(2049, (3,), bytes([5, 0, 4])),
    "t10k-images-idx3-ubyte.gz": idx_gz(2051, (2, 28, 28), bytes(2 * 784)),
    "t10k-labels-idx1-ubyte.gz": idx_gz(2049, (2,), bytes([7, 2])),
}


def pinned(path: Path) -> RemoteFile:
    return RemoteFile(path.name, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture(autouse=True)
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """pooch's waits between retries are not slept."""
    monkeypatch.setattr(pooch.core, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture
def mirror(
    tmp_path: Path,
    closed_port: int,
    make_acl_archive: Callable[..., Path],
    make_csv_export: Callable[[Path], dict[str, Path]],
) -> tuple[Path, Sources]:
    """A tiny mirror folder (mnist/ + imdb CSVs) and sources pinning its checksums.

    The canonical URLs point at a closed port, so anything not in the mirror fails fast.
    """
    folder = tmp_path / "mirror"
    (folder / "mnist").mkdir(parents=True)
    for name, data in TINY_MNIST.items():
        (folder / "mnist" / name).write_bytes(data)
    csvs = make_csv_export(folder / "imdb")
    archive = make_acl_archive(tmp_path / "aclImdb_v1.tar.gz")
    dead = f"http://127.0.0.1:{closed_port}"
    sources: Sources = {
        "mnist": MnistSources(
            files=tuple(pinned(folder / "mnist" / name) for name in TINY_MNIST),
            url_bases=(f"{dead}/mnist/",),
        ),
        "imdb": ImdbSources(
            csv_files=tuple(pinned(csvs[split]) for split in ("train", "test", "unsup")),
            archive=pinned(archive),
            archive_urls=(f"{dead}/aclImdb_v1.tar.gz",),
        ),
    }
    return folder, sources


def read_raw_imdb(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {
        s: pd.read_parquet(out_dir / "imdb" / f"{s}.parquet") for s in ("train", "test", "unsup")
    }


def test_fetch_from_csv_mirror(mirror: tuple[Path, Sources], tmp_path: Path) -> None:
    folder, sources = mirror
    out_dir = tmp_path / "data" / "raw"
    summary = fetch_all(
        out_dir, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache"
    )
    for name, data in TINY_MNIST.items():
        assert (out_dir / "mnist" / name).read_bytes() == data
    raw = read_raw_imdb(out_dir)
    assert sorted(p.name for p in (out_dir / "imdb").iterdir()) == [
        "test.parquet",
        "train.parquet",
        "unsup.parquet",
    ]
    train = raw["train"]
    assert len(train) == len(TINY_IMDB[("train", "neg")]) + len(TINY_IMDB[("train", "pos")])
    assert train["review_id"].iloc[-1] == "train/pos/2"
    assert train["text"].tolist()[:3] == TINY_IMDB[("train", "neg")][:3]
    assert str(train["label"].dtype) == "int8"
    assert raw["unsup"]["label"].eq(-1).all()
    assert summary["imdb"]["rows"] == {"train": 15, "test": 3, "unsup": 4}
    assert summary["mnist"]["origin"] == f"mirror {folder}"
    assert summary["imdb"]["sources"]["train.csv.gz"] == str(folder / "imdb" / "train.csv.gz")
    assert len(summary_lines(summary)) == 2
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["raw"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["fetched.json", "imdb", "mnist"]
    assert sorted(json.loads((out_dir / "fetched.json").read_text())["datasets"]) == [
        "imdb",
        "mnist",
    ]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == sorted([*TINY_MNIST, "test.csv.gz", "train.csv.gz", "unsup.csv.gz"])


def serve_mirror(http_server: Server, imdb_files: Iterable[Path]) -> None:
    """A URL mirror at /m: the tiny MNIST files, and these files as IMDB's."""
    for name, data in TINY_MNIST.items():
        http_server.serve(f"/m/mnist/{name}", data)
    for path in imdb_files:
        http_server.serve(f"/m/imdb/{path.name}", path.read_bytes())


def test_second_fetch_uses_the_download_cache(
    mirror: tuple[Path, Sources], http_server: Server, tmp_path: Path
) -> None:
    folder, sources = mirror
    serve_mirror(http_server, (folder / "imdb").iterdir())
    args = (CFG, http_server.url("/m"), DATASETS)
    first = fetch_all(tmp_path / "a", *args, sources=sources, cache_dir=tmp_path / "cache")
    assert first["mnist"]["origin"] == f"mirror {http_server.url('/m')}"
    hits = sum(http_server.hits.values())
    assert hits == len(TINY_MNIST) + 3
    second = fetch_all(tmp_path / "b", *args, sources=sources, cache_dir=tmp_path / "cache")
    assert sum(http_server.hits.values()) == hits, "nothing downloaded again"
    assert {second[d]["origin"] for d in second} == {"download cache"}
    for name, data in TINY_MNIST.items():
        assert (tmp_path / "b" / "mnist" / name).read_bytes() == data
    for split, frame in read_raw_imdb(tmp_path / "a").items():
        pd.testing.assert_frame_equal(read_raw_imdb(tmp_path / "b")[split], frame)


def test_archive_mirror_gives_the_same_output(mirror: tuple[Path, Sources], tmp_path: Path) -> None:
    folder, sources = mirror
    from_csv = tmp_path / "from_csv"
    fetch_all(from_csv, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache")
    for csv_file in (folder / "imdb").iterdir():
        csv_file.unlink()
    (folder / "imdb" / "aclImdb_v1.tar.gz").write_bytes(
        (tmp_path / "aclImdb_v1.tar.gz").read_bytes()
    )
    from_archive = tmp_path / "from_archive"
    # A fresh cache: the first one holds the CSVs, which a fetch would take from it.
    summary = fetch_all(
        from_archive, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache2"
    )
    assert summary["imdb"]["sources"] == {
        "aclImdb_v1.tar.gz": str(folder / "imdb" / "aclImdb_v1.tar.gz")
    }
    assert (tmp_path / "cache2" / "aclImdb_v1.tar.gz").is_file()
    assert not (tmp_path / "cache2" / "train.csv.gz").exists()
    for split, frame in read_raw_imdb(from_csv).items():
        pd.testing.assert_frame_equal(read_raw_imdb(from_archive)[split], frame)


def test_url_mirror_without_csv_export_uses_its_archive(
    mirror: tuple[Path, Sources], http_server: Server, tmp_path: Path
) -> None:
    folder, sources = mirror
    serve_mirror(http_server, [tmp_path / "aclImdb_v1.tar.gz"])
    out_dir = tmp_path / "raw"
    summary = fetch_all(
        out_dir,
        CFG,
        http_server.url("/m/"),
        DATASETS,
        sources=sources,
        cache_dir=tmp_path / "cache",
    )
    assert http_server.hits["/m/imdb/train.csv.gz"] == 1  # 404: no export, not retried
    assert summary["imdb"]["origin"] == f"mirror {http_server.url('/m')}"
    expected = read_aclimdb_archive(tmp_path / "aclImdb_v1.tar.gz")
    pd.testing.assert_frame_equal(read_raw_imdb(out_dir)["test"], expected["test"])


@pytest.mark.parametrize("corrupt", ["mnist/t10k-labels-idx1-ubyte.gz", "imdb/unsup.csv.gz"])
@pytest.mark.parametrize("existed", [False, True])
def test_corrupt_mirror_file_leaves_out_dir_alone(
    mirror: tuple[Path, Sources], tmp_path: Path, corrupt: str, existed: bool
) -> None:
    folder, sources = mirror
    bad = folder / corrupt
    bad.write_bytes(bad.read_bytes() + b"\0")
    out_dir = tmp_path / "data" / "raw"
    if existed:
        (out_dir / "mnist").mkdir(parents=True)
        (out_dir / "mnist" / "old.txt").write_text("previous run")
    with pytest.raises(ChecksumError) as err:
        fetch_all(
            out_dir, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache"
        )
    message = str(err.value)
    assert message.startswith(f"checksum mismatch for {bad.name} from {bad}: expected sha256 ")
    assert "\n" not in message
    assert sorted(p.name for p in out_dir.parent.iterdir()) == (["raw"] if existed else [])
    if existed:
        assert [p.name for p in out_dir.rglob("*")] == ["mnist", "old.txt"]


def test_no_mirror_and_no_network_says_how_to_fix_it(
    mirror: tuple[Path, Sources], tmp_path: Path
) -> None:
    _, sources = mirror
    out_dir = tmp_path / "data" / "raw"
    with pytest.raises(SourcesExhaustedError, match="set DLPIPE_DATA_MIRROR"):
        fetch_all(out_dir, CFG, None, DATASETS, sources=sources, cache_dir=tmp_path / "cache")
    assert list(out_dir.parent.iterdir()) == []


def test_relative_mirror_is_resolved_from_the_project_root(
    mirror: tuple[Path, Sources], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sources = mirror
    monkeypatch.chdir(tmp_path)
    summary = fetch_all(
        Path("raw"), CFG, "mirror", DATASETS, sources=sources, cache_dir=tmp_path / "c"
    )
    assert summary["mnist"]["origin"] == f"mirror {tmp_path / 'mirror'}"


def test_missing_mirror_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match="no such folder"):
        fetch_all(tmp_path / "raw", CFG, str(tmp_path / "nope"), DATASETS)
    assert list(tmp_path.iterdir()) == []


def test_stage_script_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DLPIPE_DATA_MIRROR": str(tmp_path / "nope")}
    result = subprocess.run(
        [sys.executable, "stages/fetch.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: DLPIPE_DATA_MIRROR={tmp_path / 'nope'}: no such folder ({tmp_path / 'nope'})"
    ]


def test_fetch_replaces_only_its_own_folders(mirror: tuple[Path, Sources], tmp_path: Path) -> None:
    folder, sources = mirror
    out_dir = tmp_path / "data" / "raw"
    (out_dir / "mnist").mkdir(parents=True)
    (out_dir / "mnist" / "stale.gz").write_bytes(b"from an older fetch")
    (out_dir / "notes.txt").write_text("the user's own file")
    (out_dir / "extra").mkdir()
    (out_dir / "extra" / "scores.csv").write_text("a,b\n")
    fetch_all(out_dir, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "extra",
        "fetched.json",
        "imdb",
        "mnist",
        "notes.txt",
    ]
    assert (out_dir / "notes.txt").read_text() == "the user's own file"
    assert (out_dir / "extra" / "scores.csv").read_text() == "a,b\n"
    assert sorted(p.name for p in (out_dir / "mnist").iterdir()) == sorted(TINY_MNIST)


def test_failed_swap_puts_the_old_output_back(
    mirror: tuple[Path, Sources], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, sources = mirror
    out_dir = tmp_path / "raw"
    (out_dir / "imdb").mkdir(parents=True)
    (out_dir / "imdb" / "train.parquet").write_bytes(b"previous run")
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == out_dir / "imdb" and Path(src).name == "imdb":
            raise OSError("simulated failure moving the new imdb/ in")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        fetch_all(
            out_dir, CFG, str(folder), DATASETS, sources=sources, cache_dir=tmp_path / "cache"
        )
    assert [p.name for p in (out_dir / "imdb").iterdir()] == ["train.parquet"]
    assert (out_dir / "imdb" / "train.parquet").read_bytes() == b"previous run"
    # Each output is swapped on its own: mnist/ (first) is already the new one; no temp folder.
    assert sorted(p.name for p in out_dir.iterdir()) == ["imdb", "mnist"]
    assert sorted(p.name for p in (out_dir / "mnist").iterdir()) == sorted(TINY_MNIST)


def test_dropped_connection_is_retried_then_fails_in_one_line(
    mirror: tuple[Path, Sources], http_server: Server, tmp_path: Path
) -> None:
    _, sources = mirror
    name = "t10k-images-idx3-ubyte.gz"
    for other, data in TINY_MNIST.items():
        http_server.serve(f"/m/mnist/{other}", data)
    data = TINY_MNIST[name]
    short = http_server.serve(f"/m/mnist/{name}", data[: len(data) // 2], length=len(data))
    out_dir = tmp_path / "raw"
    cfg = FetchConfig(connect_timeout_s=1.0, read_timeout_s=1.0, retries=2)
    with pytest.raises(DlpipeError) as err:
        fetch_all(
            out_dir, cfg, http_server.url("/m"), DATASETS, sources=sources, cache_dir=tmp_path / "c"
        )
    assert http_server.hits[f"/m/mnist/{name}"] == 3
    canonical = f"{sources['mnist'].url_bases[0]}{name}"  # a closed port
    assert str(err.value) == (
        f"could not fetch {name}: tried {short} "
        f"(connection dropped mid-download: truncated body, 3 attempts); "
        f"{canonical} (connection failed, 3 attempts); {MIRROR_HINT}"
    )
    assert not out_dir.exists()
    assert name not in {p.name for p in (tmp_path / "c").iterdir()}


def test_stage_script_reports_a_corrupt_mirror_in_one_line(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "mnist").mkdir(parents=True)
    (mirror / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not MNIST")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    env = {**os.environ, "DLPIPE_DATA_MIRROR": str(mirror)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "fetch.py")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    got = hashlib.sha256(b"not MNIST").hexdigest()
    assert result.stderr.splitlines()[-1] == (
        "error: checksum mismatch for train-images-idx3-ubyte.gz from "
        f"{mirror / 'mnist' / 'train-images-idx3-ubyte.gz'}: "
        f"expected sha256 {MNIST_FILES[0].sha256}, got {got}"
    )
    assert list((project / "data").iterdir()) == [], "no data/raw, no temp folder"
    assert list((project / ".dlpipe" / "downloads").iterdir()) == []


def test_fetch_takes_the_datasets_whose_format_downloads(tmp_path: Path) -> None:
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["datasets"]["tickets"] = {"format": "table", "path": "data/own/tickets.csv"}
    params = parse_params(raw, "params.yaml")
    found = fetched_datasets(params, Path("data/raw"))
    assert found == DATASETS, "the user's own table is read where it is, not fetched"
    raw["datasets"]["imdb"]["path"] = "data/elsewhere/imdb"
    with pytest.raises(DlpipeError) as err:
        fetched_datasets(parse_params(raw, "params.yaml"), Path("data/raw"))
    assert str(err.value) == (
        "params.yaml: datasets.imdb.path: the fetch stage writes imdb to data/raw/imdb; "
        "set path: data/raw/imdb"
    )
