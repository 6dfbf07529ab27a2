"""Where the raw data comes from and what it must hash to.

The checksums are the trust anchor of the pipeline: every byte that reaches `data/raw` is checked
against them, whichever mirror or URL it came from (sha256 only: the canonical md5s, which
torchvision checks, add nothing to it). `Sources` bundles them so tests can substitute tiny files
with their own checksums.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """A file known by name and sha256 (pooch's `registry` entry for it)."""

    name: str
    sha256: str


MNIST_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
)

# The URL bases torchvision tries, in its order.
MNIST_URL_BASES: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

IMDB_ARCHIVE = RemoteFile(
    "aclImdb_v1.tar.gz",
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
)
IMDB_ARCHIVE_URLS: tuple[str, ...] = (
    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
)

# The CSV export a data mirror may hold under imdb/ (only mirrors have it; no canonical URL).
# Names are `<split>.csv.gz`, one per IMDB split.
IMDB_CSV_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "train.csv.gz",
        "cbc41dac47c1920eceffdfac3fc0d9672b2a74b7a34530faa596bf31a74494c5",
    ),
    RemoteFile(
        "test.csv.gz",
        "c7a55369304c9ac8f81e94941ef1bc255e7a3f672fa54c8074c9d76db374e218",
    ),
    RemoteFile(
        "unsup.csv.gz",
        "2ddf053487bc407557a7d226bb64121e4c11d9c18c8db30804b451b7385b2c96",
    ),
)


@dataclass(frozen=True)
class Sources:
    """Everything `fetch_all` needs to know about the data's origin; tests pass their own."""

    mnist_files: tuple[RemoteFile, ...] = MNIST_FILES
    mnist_url_bases: tuple[str, ...] = MNIST_URL_BASES
    imdb_csv_files: tuple[RemoteFile, ...] = IMDB_CSV_FILES
    imdb_archive: RemoteFile = IMDB_ARCHIVE
    imdb_archive_urls: tuple[str, ...] = IMDB_ARCHIVE_URLS


DEFAULT_SOURCES = Sources()
