"""Penn Treebank characters (Mikolov's ``ptb.char.{train,valid,test}.txt``).

Format: one sentence per line, symbols separated by spaces, ``_`` between words. Every line
end is a symbol of its own (the model predicts it), written ``\\n`` in the vocabulary and
shown as ``<eol>``; with it the training split has 50 symbols and 5,017,483 positions.

The files are read in place (a read-only shared folder is fine). Online, missing files come
from Mikolov's ``simple-examples`` archive and are checked against the md5 sums of the
original files.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnrnn.data.files import is_present, read_bytes
from bnrnn.errors import DataError, first_line, link_problem

SPLITS = ("train", "valid", "test")
FILE_NAMES = {split: f"ptb.char.{split}.txt" for split in SPLITS}
MD5 = {
    "train": "874909f99060142f6b88cc74c34baaa2",
    "valid": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "test": "1f9a2d1afe00f76e8bfbe09a65439681",
}
ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
ARCHIVE_MEMBER = "./simple-examples/data/{}"
EOL = "\n"


def shown(symbol: str) -> str:
    return "<eol>" if symbol == EOL else repr(symbol)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_symbols(path: Path) -> list[str]:
    """The symbols of one split file in order, a line end after every line; DataError if empty.

    A UTF-8 byte-order mark (some editors write one) is not a symbol: it is dropped.
    """
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DataError(f"{path} is empty: it holds no symbols")
    symbols: list[str] = []
    for line in text.splitlines():
        symbols.extend(line.split())
        symbols.append(EOL)
    return symbols


@dataclass(frozen=True)
class Vocabulary:
    """Symbols in a fixed order; ``index`` maps each to its id."""

    symbols: tuple[str, ...]

    @classmethod
    def from_symbols(cls, symbols: list[str]) -> "Vocabulary":
        return cls(tuple(sorted(set(symbols))))

    @property
    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, symbols: list[str], source: Path) -> torch.Tensor:
        """Symbols -> ids (N,) int64; DataError naming the first unknown symbol and its place."""
        index = self.index
        try:
            # fromiter: a third of the time of torch.tensor(list) on 5M symbols
            ids = np.fromiter((index[s] for s in symbols), dtype=np.int64, count=len(symbols))
            return torch.from_numpy(ids)
        except KeyError as exc:
            position = symbols.index(exc.args[0])
            line_start = position
            while line_start > 0 and symbols[line_start - 1] != EOL:
                line_start -= 1
            line = symbols[:line_start].count(EOL) + 1
            raise DataError(
                f"{source}, line {line}, symbol {position - line_start + 1}: {shown(exc.args[0])} is not in "
                f"the training vocabulary "
                f"({len(self)} symbols from ptb.char.train.txt)"
            ) from None

    def decode(self, ids: torch.Tensor) -> str:
        """Ids -> text in the file's layout (symbols space-separated, line ends as newlines)."""
        out = []
        for i in ids.tolist():
            s = self.symbols[i]
            out.append("\n" if s == EOL else s + " ")
        return "".join(out).replace(" \n", "\n")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(list(self.symbols), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        """A run's vocab.json; DataError naming the file if it is not a list of distinct symbols."""
        try:
            symbols = json.loads(path.read_text(encoding="utf-8"))
            problem = None
            if not isinstance(symbols, list) or not all(isinstance(s, str) and s for s in symbols):
                problem = "not a JSON list of symbols"
            elif len(set(symbols)) != len(symbols) or not symbols:
                problem = "its symbols are not distinct" if symbols else "it is empty"
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = first_line(exc)
        if problem:
            raise DataError(f"{path} is not a vocabulary file ({problem}); delete it, and a resume or bnrnn eval "
                            f"writes it again from the training split in data.root")
        return cls(tuple(symbols))


@dataclass
class PtbCorpus:
    """The three splits as id streams, (N,) int64 each, and the training vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def locate(root: Path) -> dict[str, Path] | None:
    """The three files under root/ptb or root; None if some are missing in both."""
    for folder in (root / "ptb", root):
        paths = {split: folder / name for split, name in FILE_NAMES.items()}
        if all(is_present(p) for p in paths.values()):
            return paths
    return None


def missing_message(root: Path) -> str:
    folder = root / "ptb"
    missing = [name for name in FILE_NAMES.values() if not is_present(folder / name)]
    return (
        f"Penn Treebank characters not found: {folder} lacks {', '.join(missing)}; run online with "
        f"data.download=true, or set data.root to a folder holding ptb/ptb.char.{{train,valid,test}}.txt"
    )


def download(root: Path) -> dict[str, Path]:
    """Fetch simple-examples.tgz, extract the three char files into root/ptb, md5-check them."""
    from torchvision.datasets.utils import download_url

    folder = root / "ptb"
    paths = {split: folder / name for split, name in FILE_NAMES.items()}
    if all(p.is_file() and file_md5(p) == MD5[s] for s, p in paths.items()):
        return paths
    broken = link_problem(folder)
    if broken:
        raise DataError(f"data.root={root} cannot be used: {broken}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        download_url(ARCHIVE_URL, str(folder), "simple-examples.tgz")
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download {ARCHIVE_URL} ({exc}); offline, set data.root to a folder holding "
            f"ptb/ptb.char.{{train,valid,test}}.txt"
        ) from exc
    archive = folder / "simple-examples.tgz"
    try:
        with tarfile.open(archive) as tar:
            for split, path in paths.items():
                member = tar.extractfile(ARCHIVE_MEMBER.format(FILE_NAMES[split]))
                path.write_bytes(member.read())
    except (tarfile.TarError, KeyError, AttributeError, OSError) as exc:
        raise DataError(f"{archive} is not the simple-examples archive ({exc}); delete it and retry") from exc
    archive.unlink()
    for split, path in paths.items():
        if file_md5(path) != MD5[split]:
            raise DataError(f"{path} does not match the original's md5 {MD5[split]}; delete it and retry")
    return paths


def load_ptb(root: str | Path, allow_download: bool) -> PtbCorpus:
    """Read the three splits; the vocabulary is that of the training split."""
    root = Path(root).expanduser()
    paths = locate(root)
    if paths is None:
        if not allow_download:
            raise DataError(missing_message(root))
        paths = download(root)
    train_symbols = read_symbols(paths["train"])
    vocab = Vocabulary.from_symbols(train_symbols)
    return PtbCorpus(
        vocab=vocab,
        train=vocab.encode(train_symbols, paths["train"]),
        valid=vocab.encode(read_symbols(paths["valid"]), paths["valid"]),
        test=vocab.encode(read_symbols(paths["test"]), paths["test"]),
    )


def unigram_bpc(train: torch.Tensor, target: torch.Tensor, vocab_size: int) -> float:
    """Bits per character of the training split's unigram distribution on ``target``.

    The baseline a language model must beat: about 4.4 bits on PTB (log2(50) = 5.64 is the
    uniform distribution's).
    """
    counts = torch.bincount(train, minlength=vocab_size).double()
    log2_p = torch.log2(counts / counts.sum())
    return float(-log2_p[target].mean())
