"""Shared fixtures: small generated data in the real formats, the real data when present,
and Hydra composition of the shipped configs."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The GPU path's Triton kernels then run in Triton's CPU interpreter (tests/test_triton_path.py).
    # It must be chosen before triton is first imported: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# CI checks the repository out with the project's shared/ folder beside it.
SHARED_DATA = Path(os.environ.get("BNRNN_SHARED_DATA", REPO.parent / "shared" / "data"))


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzip'd IDX file (MNIST's format)."""
    magic = {3: 2051, 1: 2049}[array.dim()]
    header = struct.pack(f">{1 + array.dim()}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.contiguous().numpy().tobytes())


def make_fake_mnist(root: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """root/MNIST/raw/ with the four files, random 28x28 images and labels."""
    g = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        images[:, :3] = 0  # black leading rows, as in real MNIST
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8))
    return root


# 48 symbols + '_' (between words) + the line end = 50, the size of the real PTB vocabulary.
PTB_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789N$&'*-./<>#\\")


def make_fake_ptb(root: Path, sizes=(4000, 600, 700), seed: int = 0) -> Path:
    """root/ptb/ptb.char.{train,valid,test}.txt in Mikolov's layout: each line ' c c _ c c\\n'.

    The training split uses every symbol of PTB_ALPHABET and '_', so valid/test never hold
    an unknown one. Sizes are approximate symbol counts.
    """
    g = torch.Generator().manual_seed(seed)
    folder = root / "ptb"
    folder.mkdir(parents=True, exist_ok=True)
    letters = PTB_ALPHABET
    for split, size in zip(("train", "valid", "test"), sizes):
        lines, count = [], 0
        if split == "train":
            lines.append(" " + " ".join(letters) + " _ " + " ".join(letters))
            count += 2 * len(letters) + 2
        while count < size:
            words = []
            for _ in range(int(torch.randint(1, 8, (1,), generator=g))):
                word = torch.randint(0, len(letters), (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
                words.append(" ".join(letters[i] for i in word.tolist()))
            line = " " + " _ ".join(words)
            lines.append(line)
            count += len(line.split()) + 1
        (folder / f"ptb.char.{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def fake_ptb(tmp_path_factory) -> Path:
    return make_fake_ptb(tmp_path_factory.mktemp("fake-ptb"))


def shared_data_with(relative: str, what: str) -> Path:
    """SHARED_DATA if it holds ``relative``, else skip the test (CI always has it)."""
    if not (SHARED_DATA / relative).exists():
        pytest.skip(f"{what} not found at {SHARED_DATA / relative} (set BNRNN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_ptb() -> Path:
    return shared_data_with("ptb/ptb.char.train.txt", "real PTB")


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory) -> Path:
    return make_fake_mnist(tmp_path_factory.mktemp("fake-mnist"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    return shared_data_with("MNIST/raw", "real MNIST")


# Keys of a metrics.jsonl record that a clock decides: when it was written, how long it took,
# and the validations' share of the run's time.
CLOCK_KEYS = ("time", "elapsed", "overhead")


def without_clock(record: dict) -> dict:
    """A metrics.jsonl record without what a clock decides: what was measured, not when or
    how long it took."""
    return {k: v for k, v in record.items() if k not in CLOCK_KEYS and not k.startswith("seconds")}


def assert_same_final_weights(run_a: Path, run_b: Path) -> None:
    """Two runs' last checkpoints hold bit-identical model state (weights and population statistics)."""
    from bnrnn.checkpoint import load_checkpoint

    a = load_checkpoint(run_a / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run_b / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def compose(overrides: list[str]):
    """The config `bnrnn train <overrides>` would get (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bnrnn.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


SMALL_MNIST = [
    "model.hidden_size=8", "task.batch_size=16", "task.eval_batch_size=16", "task.valid_size=32",
    "trainer.log_every=1", "trainer.eval_every=2", "trainer.progress=off",
]


SMALL_PTB = [
    "task=ptb", "model.hidden_size=8", "task.batch_size=4", "task.eval_batch_size=3", "task.seq_len=20",
    "task.eval_chunk=16", "trainer.log_every=1", "trainer.eval_every=2", "trainer.progress=off",
]


@pytest.fixture
def small_ptb_cfg(fake_ptb):
    """A composed config for a tiny, fast PTB run on the generated text."""

    def make(*overrides: str):
        return compose([f"data.root={fake_ptb}", "data.download=false", *SMALL_PTB, *overrides])

    return make


@pytest.fixture
def small_mnist_cfg(fake_mnist):
    """A composed config for a tiny, fast MNIST run on the generated data."""

    def make(*overrides: str):
        return compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, *overrides])

    return make


def require_compiled_cpu_loop() -> None:
    """Skip the calling test where the compiled CPU extension cannot be built (no C++
    compiler), but fail it in CI, which has one: there the compiled path must be tested."""
    from bnrnn.kernels.cpu import extension as cpu_extension

    if not cpu_extension.load():
        reason = f"the compiled CPU loop did not build: {cpu_extension.failure()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def limit_gemm():
    """``limit_gemm("blas" | "aten")``: until the test ends, the compiled loops' GEMMs are at
    best torch's BLAS (as on a CPU without AVX-512), or ATen's mm for everything."""
    import contextlib

    from bnrnn.kernels.cpu import extension as cpu_extension

    with contextlib.ExitStack() as stack:
        def limit(kind: str) -> None:
            if cpu_extension.load():
                stack.enter_context(cpu_extension.gemm_limit(kind))

        yield limit
