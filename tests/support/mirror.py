"""The real data: where the verified MNIST and IMDB files are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_mirror() -> str:
    """Where the real files are: DLPIPE_DATA_MIRROR if set, else `../shared/datasets` beside the
    repo. Where neither holds the data the test is skipped, saying so in one line; under CI=true
    it fails instead, so that a CI without its data never passes with its real tests skipped."""
    mirror = os.environ.get("DLPIPE_DATA_MIRROR") or str(REPO_ROOT.parent / "shared" / "datasets")
    if "://" not in mirror and not (
        Path(mirror, "mnist").is_dir() and Path(mirror, "imdb").is_dir()
    ):
        missing = f"no data mirror with mnist/ and imdb/ at {mirror} (set DLPIPE_DATA_MIRROR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {missing}", pytrace=False)
        pytest.skip(missing)
    return mirror
