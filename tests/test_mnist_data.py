"""MNIST files, splits, permutation and batch order."""

import gzip
import stat

import pytest
import torch

from bnrnn.data.batches import SequenceBatches
from bnrnn.data.mnist import load_mnist, make_permutation, to_sequences
from bnrnn.errors import DataError
from conftest import make_fake_mnist, write_idx


def test_reads_generated_idx_files(fake_mnist):
    arrays = load_mnist(fake_mnist, allow_download=False)
    assert arrays.train_images.shape == (96, 28, 28) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_labels.shape == (32,) and arrays.test_labels.dtype == torch.int64
    seq = to_sequences(arrays.train_images[:2])
    assert seq.shape == (2, 784) and 0 <= seq.min() and seq.max() <= 1
    # Row-major pixel order: step 28 is row 1, column 0.
    assert seq[0, 28] == arrays.train_images[0, 1, 0].float() / 255


def test_missing_files_are_named_and_nothing_is_written(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, allow_download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "data.root" in message
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_magic", "short_payload"])
def test_corrupt_files_give_a_clear_error_naming_the_file(tmp_path, damage):
    root = make_fake_mnist(tmp_path, n_train=8, n_test=4)
    target = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        target.write_bytes(b"not a gzip file at all")
    elif damage == "bad_magic":
        write_idx(target, torch.zeros(8, 28, 28, dtype=torch.uint8))
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(b"\x00\x00\x09\x99" + raw[4:]))
    else:
        raw = gzip.decompress(data)
        target.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError) as info:
        load_mnist(root, allow_download=False)
    assert str(target) in str(info.value)


def test_read_only_data_folder_is_only_read(tmp_path):
    root = make_fake_mnist(tmp_path, n_train=8, n_test=4)
    raw = root / "MNIST" / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    for folder in (raw, raw.parent, root):
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        arrays = load_mnist(root, allow_download=True)  # files present: no download, no write
        assert arrays.train_images.shape[0] == 8
    finally:
        for folder in (root, raw.parent, raw):
            folder.chmod(stat.S_IRWXU)
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


def test_permutation_is_a_true_permutation_and_a_function_of_the_seed():
    perm = make_permutation(seed=3)
    assert perm.shape == (784,)
    assert torch.equal(torch.sort(perm).values, torch.arange(784))
    assert torch.equal(perm, make_permutation(seed=3))
    assert not torch.equal(perm, make_permutation(seed=4))
    assert not torch.equal(perm, torch.arange(784))


def test_authors_with_replacement_draw_is_available_and_drops_pixels():
    draw = make_permutation(seed=0, with_replacement=True)
    distinct = len(set(draw.tolist()))
    assert draw.shape == (784,) and 450 < distinct < 550  # about 1 - 1/e of the pixels


def test_training_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch():
    inputs = torch.arange(40, dtype=torch.float32).unsqueeze(1).expand(40, 3).contiguous()
    labels = torch.arange(40)
    batches = SequenceBatches(inputs, labels, batch_size=8, shuffle=True)
    assert len(batches) == 5
    epoch0 = [y for _, y in batches.iterate(epoch=0, seed=1)]
    assert [y.tolist() for y in epoch0] == [y.tolist() for _, y in batches.iterate(epoch=0, seed=1)]
    epoch1 = [y for _, y in batches.iterate(epoch=1, seed=1)]
    assert torch.cat(epoch0).tolist() != torch.cat(epoch1).tolist()
    assert sorted(torch.cat(epoch0).tolist()) == list(range(40))
    resumed = [y for _, y in batches.iterate(epoch=0, seed=1, start=3)]
    assert [y.tolist() for y in resumed] == [y.tolist() for y in epoch0[3:]]
    x, y = next(batches.iterate(epoch=0, seed=1))
    assert x.shape == (3, 8, 1)  # time-major
    torch.testing.assert_close(x[:, :, 0].t(), inputs[y])


def test_evaluation_batches_keep_every_example_in_order():
    batches = SequenceBatches(torch.zeros(10, 4), torch.arange(10), batch_size=4, shuffle=False)
    assert [y.tolist() for _, y in batches.iterate()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
