"""A flipped byte in a prepared array, a checkpoint or a model file is a clear error (or, for a
checkpoint, a fresh start), never a wrong answer; an interrupted write is never taken as done.

Bytes are flipped in the middle of a tensor's payload (inside the zip member holding the array, past
any header), where neither np.load nor torch.load would notice on their own, and in headers.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support.families import REPO_ROOT
from support.tiny import TinyProject, hook_after_epoch, run_stage_here
from support.trained import RegistryStore, TrainedFolders

from dlpipe.cli import main as cli_main
from dlpipe.data import pictures
from dlpipe.data.tensors import load_split
from dlpipe.datasets import mnist
from dlpipe.datasets.mnist import MnistSettings
from dlpipe.errors import DlpipeError
from dlpipe.family import load_trained
from dlpipe.integrity import MANIFEST, read_manifest, seal
from dlpipe.io import atomic_path
from dlpipe.serving import Predictor
from dlpipe.training.checkpoint import CORRUPT_FOLDER, CheckpointStore


def member_payload(path: Path, suffix: str) -> tuple[int, int]:
    """(offset in the file, size) of the bytes of the largest zip member whose name ends with
    `suffix`: an npz's `<array>.npy`, or one of a torch file's `data/<n>` tensor storages."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if i.filename.endswith(suffix)),
            key=lambda i: i.file_size,
        )
    assert info.compress_type == zipfile.ZIP_STORED, "the payload must be the array's bytes"
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def flip_in_payload(path: Path, suffix: str) -> None:
    """Flip a byte halfway through the member's bytes (an npy header is 128 bytes at most)."""
    start, size = member_payload(path, suffix)
    assert size > 1024, "too small to tell the payload from its header"
    flip(path, start + size // 2)


def one_line(err: pytest.ExceptionInfo[DlpipeError]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# --- prepared arrays ----------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def mnist_settings(raw: Path, val_size: int) -> MnistSettings:
    return MnistSettings(format="mnist", path=str(raw), val_size=val_size)


@pytest.fixture
def prepared_mnist(tmp_path: Path) -> Path:
    """data/prepared/mnist written by the real prepare from tiny IDX files."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("test", 50)):
        images_file, labels_file = mnist.FILES[split]
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        write_idx(raw / images_file, images, mnist.IMAGES_MAGIC)
        write_idx(raw / labels_file, np.arange(count) % 10, mnist.LABELS_MAGIC)
    out = tmp_path / "data" / "prepared" / "mnist"
    mnist.prepare(mnist_settings(raw, 20), raw, out, seed=1)
    return out


def test_prepare_lists_the_sha256_of_every_file_it_writes(prepared_mnist: Path) -> None:
    listed = read_manifest(prepared_mnist, "-")
    assert listed is not None
    on_disk = sorted(p.name for p in prepared_mnist.iterdir() if p.name != MANIFEST)
    assert sorted(listed) == on_disk == ["meta.json", "test.npz", "train.npz", "val.npz"]
    for name, digest in listed.items():
        assert digest == hashlib.sha256((prepared_mnist / name).read_bytes()).hexdigest()
    # sha256sum's own format: `sha256sum -c SHA256SUMS` checks the folder by hand
    first = (prepared_mnist / MANIFEST).read_text().splitlines()[0]
    assert first == f"{listed['meta.json']}  meta.json"
    assert len(load_split(prepared_mnist, "train")) == 180


@pytest.mark.parametrize("where", ["payload", "npy header", "zip directory"])
def test_a_flipped_byte_in_a_prepared_split_is_one_error(prepared_mnist: Path, where: str) -> None:
    path = prepared_mnist / "train.npz"
    if where == "payload":
        flip_in_payload(path, "images.npy")
    elif where == "npy header":
        flip(path, member_payload(path, "images.npy")[0] + 20)
    else:
        flip(path, path.stat().st_size - 30)
    with pytest.raises(DlpipeError) as err:
        load_split(prepared_mnist, "train")
    assert one_line(err) == (
        f"{path}: checksum mismatch (file corrupted or edited); rerun `dvc repro prepare@mnist`"
    )
    assert len(load_split(prepared_mnist, "val")) == 20  # the other splits are untouched


def test_a_changed_meta_json_stops_the_loader_too(prepared_mnist: Path) -> None:
    meta = prepared_mnist / "meta.json"
    meta.write_text(meta.read_text().replace('"num_classes": 10', '"num_classes": 11'))
    with pytest.raises(DlpipeError, match=r"meta.json: checksum mismatch") as err:
        load_split(prepared_mnist, "test")
    one_line(err)


def test_an_interrupted_prepare_is_never_taken_as_done(
    prepared_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepare removes the old manifest first and writes the new one last: a run stopped halfway
    leaves a folder the loaders refuse, though every file in it is whole."""
    raw = prepared_mnist.parents[2] / "raw"
    calls = []

    def fail_on_the_second(dest: Path, **arrays: np.ndarray) -> None:
        calls.append(dest.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    # Every image format writes its splits through prepare_images.
    monkeypatch.setattr(pictures, "write_npz_atomic", fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        mnist.prepare(mnist_settings(raw, 30), raw, prepared_mnist, 2)
    assert not (prepared_mnist / MANIFEST).exists()
    assert not [p for p in prepared_mnist.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(DlpipeError) as err:
        load_split(prepared_mnist, "train")  # rewritten, whole, but its siblings are stale
    assert one_line(err).startswith(f"{prepared_mnist / MANIFEST}: missing (the stage writing")
    assert "rerun `dvc repro prepare@mnist`" in str(err.value)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_listed_leftover(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    # a temporary file a hard kill left behind is never listed as an output
    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half of the new")
    seal(tmp_path)
    assert list(read_manifest(tmp_path, "-") or {}) == ["model.pt"]


def test_the_train_stage_stops_in_one_line_on_a_corrupted_split(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_project.write_params()
    flip_in_payload(tiny_project.root / "data/prepared/mnist/train.npz", "images.npy")
    assert run_stage_here("train", "cnn", monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: data/prepared/mnist/train.npz: checksum mismatch (file corrupted or edited); "
        "rerun `dvc repro prepare@mnist`"
    ]
    assert not (tiny_project.root / "data/models/cnn").exists()


# --- model files ---------------------------------------------------------------------------------


@pytest.fixture
def model_copy(trained_folders: TrainedFolders, tmp_path: Path) -> Path:
    """A copy of the tiny trained folders (sealed as stages/train.py seals them): its root."""
    root = tmp_path / "project"
    shutil.copytree(trained_folders.root, root)
    return root


@pytest.mark.parametrize(
    ("family", "name"),
    [("cnn", "model.pt"), ("cnn", "config.json"), ("rnn", "tokenizer.json")],
)
def test_a_flipped_byte_in_a_model_file_is_one_error(
    model_copy: Path, family: str, name: str
) -> None:
    folder = model_copy / "data/models" / family
    path = folder / name
    if name == "model.pt":
        flip_in_payload(path, "/data/0")  # the first layer's weights, not the pickle header
    else:
        flip(path, path.stat().st_size // 2)
    with pytest.raises(DlpipeError) as err:
        Predictor.from_folder(folder)
    assert one_line(err) == (
        f"{path}: checksum mismatch (file corrupted or edited); rerun `dvc repro train@{family}`"
    )


def test_without_the_check_a_flipped_weight_loads_silently(model_copy: Path) -> None:
    """Why the manifest: torch.load takes a flipped byte in a tensor for a different weight."""
    folder = model_copy / "data/models/cnn"
    good = load_trained(folder)[0].state_dict()
    flip_in_payload(folder / "model.pt", "/data/0")
    (folder / MANIFEST).unlink()  # a folder from before checksums
    bad = load_trained(folder)[0].state_dict()
    assert any(not torch.equal(good[k], bad[k]) for k in good)


def test_dlpipe_predict_on_a_corrupted_model_is_exit_2_and_one_line(
    model_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # The project's params.yaml beside its data/: predict finds model cnn's family there.
    shutil.copyfile(REPO_ROOT / "params.yaml", model_copy / "params.yaml")
    monkeypatch.chdir(model_copy)
    weights = model_copy / "data/models/cnn/model.pt"
    flip_in_payload(weights, "/data/0")
    picture = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (28, 28), 255).save(picture)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", "cnn", str(picture)])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        "error: data/models/cnn/model.pt: checksum mismatch (file corrupted or edited); "
        "rerun `dvc repro train@cnn`"
    ]


def test_the_logged_pyfunc_carries_and_checks_the_checksums(
    registry_store: RegistryStore, tmp_path: Path
) -> None:
    import mlflow
    from support.trained import mlflow_tracking

    with mlflow_tracking(registry_store.uri):
        local = Path(
            mlflow.artifacts.download_artifacts(
                registry_store.model_uris["cnn"], dst_path=str(tmp_path)
            )
        )
    folder = local / "artifacts" / "trained_model"
    source = registry_store.folders.model_dir("cnn")
    listed = read_manifest(folder, "-")
    assert listed == {k: v for k, v in (read_manifest(source, "-") or {}).items() if k in listed}
    assert sorted(listed) == ["config.json", "model.pt"]
    mlflow.pyfunc.load_model(str(local))  # whole: loads
    flip_in_payload(folder / "model.pt", "/data/0")
    with pytest.raises(DlpipeError, match=r"trained_model/model.pt: checksum mismatch"):
        mlflow.pyfunc.load_model(str(local))


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_state() -> dict[str, object]:
    return {"epoch": 3, "model": {"weight": torch.arange(4096, dtype=torch.float32)}}


def test_a_corrupted_checkpoint_is_moved_aside_and_not_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(tmp_path / "checkpoints" / "cnn-abc")
    store.save(checkpoint_state())
    flip_in_payload(store.path, "/data/0")
    assert torch.load(store.path, weights_only=True)["epoch"] == 3  # torch alone would resume it

    assert store.load() is None
    [line] = capsys.readouterr().err.splitlines()
    [aside] = (tmp_path / "checkpoints" / CORRUPT_FOLDER).iterdir()
    assert line == (
        f"warning: checkpoint {store.path} is corrupted (checksum mismatch); moved to {aside}, "
        "training from scratch"
    )
    assert aside.name.startswith("cnn-abc-") and not store.path.exists()
    store.save(checkpoint_state())  # the fresh training checkpoints as usual
    state = store.load()
    assert state is not None and torch.equal(state["model"]["weight"], torch.arange(4096.0))
    store.clear()
    assert aside.exists()  # kept for inspection when the training finishes


def test_a_checkpoint_without_its_checksum_is_not_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(tmp_path / "cnn-abc")
    store.save(checkpoint_state())
    store.checksum.unlink()
    assert store.load() is None
    assert "has no last.pt.sha256; moved to" in capsys.readouterr().err


def test_a_checkpoint_interrupted_while_saved_resumes_the_last_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between writing the checksums and the checkpoint: the old one still loads."""
    store = CheckpointStore(tmp_path / "cnn-abc")
    store.save(checkpoint_state())
    import dlpipe.training.checkpoint as checkpoint

    real = checkpoint.atomic_path

    def killed_at_the_checkpoint(dest: Path):  # type: ignore[no-untyped-def]
        if dest.name == "last.pt":
            raise KeyboardInterrupt
        return real(dest)

    monkeypatch.setattr(checkpoint, "atomic_path", killed_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        store.save({**checkpoint_state(), "epoch": 4})
    monkeypatch.undo()
    state = store.load()
    assert state is not None and state["epoch"] == 3
    store.save({**checkpoint_state(), "epoch": 5})
    assert len(store.checksum.read_text().split()) == 1


def test_training_after_a_corrupted_checkpoint_starts_over_and_seals_its_model(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stage end to end: interrupted, its checkpoint corrupted, rerun -> a warning, all epochs
    trained afresh, a sealed model folder; then a flipped weight stops the evaluate stage."""
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=2))

    def stop(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        hook_after_epoch(patch, stop)
        assert run_stage_here("train", "cnn", patch) == 130  # Ctrl-C
    [checkpoint] = (tiny_project.root / ".dlpipe/checkpoints").glob("cnn-*/last.pt")
    flip_in_payload(checkpoint, "/data/0")
    capsys.readouterr()

    assert run_stage_here("train", "cnn", monkeypatch) == 0
    out, err = capsys.readouterr()
    assert "resuming" not in out and "epoch 1/2" in out and "epoch 2/2" in out
    assert "is corrupted (checksum mismatch); moved to" in err
    folder = tiny_project.root / "data/models/cnn"
    listed = read_manifest(folder, "-")
    assert listed is not None and {"model.pt", "config.json", "mlflow_run.json"} <= set(listed)
    load_trained(folder)  # sealed as written

    flip_in_payload(folder / "model.pt", "/data/0")
    assert run_stage_here("evaluate", "cnn", monkeypatch) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: data/models/cnn/model.pt: checksum mismatch (file corrupted or edited); "
        "rerun `dvc repro train@cnn`"
    ]
