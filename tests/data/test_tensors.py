"""Prepared splits on disk: written a block of rows at a time, memory-mapped when loaded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dlpipe.data.tensors import load_split, map_npz
from dlpipe.integrity import write_manifest_of
from dlpipe.io import Blocks, write_npz_atomic


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(0, 500, size=(1000, 37), dtype=np.int32),
        "lengths": rng.integers(1, 38, size=1000, dtype=np.int32),
        "labels": np.arange(1000, dtype=np.int64) % 3,
        "row_id": np.array([f"r{i}" for i in range(1000)]),
    }


def in_blocks(array: np.ndarray, rows: int) -> Blocks:
    return Blocks(
        array.shape, array.dtype, (array[i : i + rows] for i in range(0, len(array), rows))
    )


def test_streamed_blocks_write_np_savez_bytes(tmp_path: Path) -> None:
    data = arrays()
    expected = io.BytesIO()
    np.savez(expected, **data)  # type: ignore[arg-type]  # numpy stub: **kwargs vs allow_pickle
    write_npz_atomic(tmp_path / "s.npz", **{**data, "tokens": in_blocks(data["tokens"], 64)})
    assert (tmp_path / "s.npz").read_bytes() == expected.getvalue()


def test_blocks_that_miss_rows_are_refused_and_leave_no_file(tmp_path: Path) -> None:
    tokens = arrays()["tokens"]
    short = Blocks(tokens.shape, tokens.dtype, iter([tokens[:10]]))
    with pytest.raises(ValueError, match="10 rows written, 1000 declared"):
        write_npz_atomic(tmp_path / "s.npz", tokens=short)
    assert list(tmp_path.iterdir()) == []


def test_a_split_is_memory_mapped_not_read(tmp_path: Path) -> None:
    data = arrays()
    write_npz_atomic(tmp_path / "train.npz", **data)
    write_manifest_of(tmp_path, ["train.npz"])
    mapped = map_npz(tmp_path / "train.npz")
    assert isinstance(mapped["tokens"], np.memmap)
    for name, array in data.items():
        np.testing.assert_array_equal(mapped[name], array)
    split = load_split(tmp_path, "train")
    assert torch.equal(split.features["tokens"], torch.from_numpy(data["tokens"]))
    (inputs, lengths), labels = split.batch(torch.tensor([3, 1]))
    assert inputs.shape == (2, int(data["lengths"][[3, 1]].max()))
    assert labels.tolist() == [0, 1]


def test_a_compressed_split_is_one_error(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "train.npz", **arrays())
    with pytest.raises(ValueError, match="not an uncompressed .npy"):
        map_npz(tmp_path / "train.npz")
