"""Where the raw data comes from and what it must hash to.

The checksums are the trust anchor of the pipeline: every byte that reaches `data/raw` is checked
against them, whichever mirror or URL it came from. `Sources` bundles them so tests can substitute
tiny files with their own checksums.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """A file known by name and content hash (md5 where the canonical publisher only gives md5)."""

    name: str
    sha256: str
    md5: str | None = None


MNIST_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "d53e105ee54ea40749a09fcbcd1e9432",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "9fb629c4189551a2d022fa330f9573f3",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
)

# The URL bases torchvision tries, in its order.
MNIST_URL_BASES: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

IMDB_SPLITS: tuple[str, ...] = ("train", "test", "unsup")

IMDB_ARCHIVE = RemoteFile(
    "aclImdb_v1.tar.gz",
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
    "7c2ac02c03563afcf9b574c7e56c153a",
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
        "5fe0e778c059b7e3a0296c1716064ed6",
    ),
    RemoteFile(
        "test.csv.gz",
        "c7a55369304c9ac8f81e94941ef1bc255e7a3f672fa54c8074c9d76db374e218",
        "82eb981f1cc203e33c0a1b2c50bf9fa7",
    ),
    RemoteFile(
        "unsup.csv.gz",
        "2ddf053487bc407557a7d226bb64121e4c11d9c18c8db30804b451b7385b2c96",
        "2c2c0843d98b144b9eacf9d8f4caab8d",
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
