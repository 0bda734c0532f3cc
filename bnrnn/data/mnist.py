"""MNIST as pixel sequences: sequential MNIST and permuted MNIST.

The four original IDX files (``*-idx?-ubyte.gz``) are read straight from their gzip form, so a
read-only folder such as a shared data mount is never written to (torchvision's own MNIST
class extracts into its root). Missing files are downloaded with torchvision's mirrors and
checksums when ``download`` is on; otherwise one sentence says what is missing and where.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bnrnn.data.files import is_present, read_bytes
from bnrnn.errors import DataError, link_problem

IMAGE_SIDE = 28
SEQ_LEN = IMAGE_SIDE * IMAGE_SIDE  # 784 pixels, one per time step
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_MAGIC = {3: 2051, 1: 2049}  # images (3 dims), labels (1 dim), unsigned bytes


@dataclass
class MnistArrays:
    """Raw MNIST: images uint8 (N, 28, 28), labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def candidate_dirs(root: Path) -> list[Path]:
    """Where the .gz files may sit: root/MNIST/raw (torchvision's layout), root/raw, root."""
    return [root / "MNIST" / "raw", root / "raw", root]


def locate_files(root: Path) -> dict[str, Path] | None:
    for folder in candidate_dirs(root):
        paths = {key: folder / name for key, name in FILES.items()}
        if all(is_present(p) for p in paths.values()):
            return paths
    return None


def missing_files_message(root: Path) -> str:
    folder = root / "MNIST" / "raw"
    missing = [name for name in FILES.values() if not is_present(folder / name)]
    return (
        f"MNIST not found: {folder} lacks {', '.join(missing)}; run online with "
        f"data.download=true, or set data.root to a folder holding MNIST/raw/ with the four "
        f"original .gz files"
    )


def download(root: Path) -> dict[str, Path]:
    """Fetch the four files into root/MNIST/raw, md5-checked; DataError if that fails."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity, download_url

    folder = root / "MNIST" / "raw"
    broken = link_problem(folder)
    if broken:
        raise DataError(f"data.root={root} cannot be used: {broken}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {folder} to download MNIST into ({exc.strerror})") from exc
    for filename, md5 in MNIST.resources:
        target = folder / filename
        if check_integrity(str(target), md5):
            continue
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_url(mirror + filename, str(folder), filename, md5)
                break
            except Exception as exc:  # network errors come in many types
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataError(
                f"could not download {filename} ({'; '.join(errors)}); offline, set data.root to "
                f"a folder holding MNIST/raw/ with the four original .gz files"
            )
    return {key: folder / name for key, name in FILES.items()}


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """Read a gzip'd IDX file of unsigned bytes with ``dims`` dimensions; DataError if corrupt."""
    compressed = read_bytes(path)  # unreadable is not corrupt: that error says so
    try:
        raw = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete it and download it again") from exc
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path} is corrupt (only {len(raw)} bytes); delete it and download it again")
    magic, *shape = struct.unpack(f">{1 + dims}I", raw[:header])
    if magic != IDX_MAGIC[dims]:
        raise DataError(f"{path} is not an MNIST IDX file with {dims} dimension(s) (magic number {magic})")
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise DataError(f"{path} is corrupt ({len(raw)} bytes, the header promises {expected})")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_mnist(root: str | Path, allow_download: bool) -> MnistArrays:
    root = Path(root).expanduser()
    paths = locate_files(root)
    if paths is None:
        if not allow_download:
            raise DataError(missing_files_message(root))
        paths = download(root)
    arrays = MnistArrays(
        train_images=read_idx(paths["train_images"], 3),
        train_labels=read_idx(paths["train_labels"], 1).long(),
        test_images=read_idx(paths["test_images"], 3),
        test_labels=read_idx(paths["test_labels"], 1).long(),
    )
    for split in ("train", "test"):
        images, labels = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
        if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(
                f"MNIST {split} files disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}"
            )
        # Checked now, not at the first batch that holds one: an out-of-range test label would
        # otherwise crash the final test, after all the training.
        bad = ((labels < 0) | (labels >= NUM_CLASSES)).nonzero().flatten()
        if len(bad):
            raise DataError(
                f"{paths[split + '_labels']} holds label {int(labels[bad[0]])} at index {int(bad[0])} "
                f"({len(bad)} such); MNIST labels are 0-{NUM_CLASSES - 1}"
            )
    return arrays


def make_permutation(seed: int, length: int = SEQ_LEN, with_replacement: bool = False) -> torch.Tensor:
    """The fixed pixel order of permuted MNIST: (length,) int64, a function of ``seed`` alone.

    ``with_replacement`` reproduces the authors' ``randint(0, 784, 784)`` draw, which repeats
    some pixels and drops about a third of them; the default is a true permutation.
    """
    generator = torch.Generator().manual_seed(seed)
    if with_replacement:
        return torch.randint(0, length, (length,), generator=generator)
    return torch.randperm(length, generator=generator)


def to_sequences(images: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> float pixel sequences (N, 784) in [0, 1], optionally reordered."""
    seq = images.reshape(images.shape[0], -1).float().div_(255.0)
    return seq if order is None else seq[:, order]
