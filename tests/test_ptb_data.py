"""PTB characters: reading, vocabulary, the three batch cuts, and bad input."""

import math
import shutil

import pytest
import torch

from bnrnn.data.ptb import EOL, SPLITS, Vocabulary, load_ptb, read_symbols, unigram_bpc
from bnrnn.data.streams import IGNORE, LengthBatches, StreamBatches, WindowBatches
from bnrnn.errors import DataError


def copy_corpus(source, target):
    shutil.copytree(source / "ptb", target / "ptb")
    return target


def test_vocabulary_is_the_training_symbols_plus_the_line_end(fake_ptb):
    corpus = load_ptb(fake_ptb, allow_download=False)
    assert len(corpus.vocab) == 50
    assert corpus.vocab.symbols[0] == EOL and "_" in corpus.vocab.symbols
    assert list(corpus.vocab.symbols) == sorted(corpus.vocab.symbols)
    lines = (fake_ptb / "ptb" / "ptb.char.train.txt").read_text().splitlines()
    assert corpus.train.numel() == sum(len(line.split()) + 1 for line in lines)
    assert int((corpus.train == 0).sum()) == len(lines)  # one line end per line


def test_a_byte_order_mark_is_not_a_symbol(fake_ptb, tmp_path):
    root = copy_corpus(fake_ptb, tmp_path)
    for split in SPLITS:
        path = root / "ptb" / f"ptb.char.{split}.txt"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what some editors save
    with_bom, plain = load_ptb(root, allow_download=False), load_ptb(fake_ptb, allow_download=False)
    assert len(with_bom.vocab) == 50 and with_bom.vocab == plain.vocab
    assert torch.equal(with_bom.train, plain.train) and torch.equal(with_bom.test, plain.test)


@pytest.mark.parametrize("split", SPLITS)
def test_decode_inverts_encode(fake_ptb, split):
    corpus = load_ptb(fake_ptb, allow_download=False)
    text = (fake_ptb / "ptb" / f"ptb.char.{split}.txt").read_text()
    # The file's layout up to the leading space of each line.
    expected = "".join(" ".join(line.split()) + "\n" for line in text.splitlines())
    assert corpus.vocab.decode(getattr(corpus, split)) == expected


def test_vocabulary_saves_and_loads(tmp_path):
    vocab = Vocabulary.from_symbols(["b", "a", EOL, "a"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    assert vocab.symbols == (EOL, "a", "b")


def test_unigram_bpc_of_a_known_distribution():
    train = torch.tensor([0, 0, 1, 2])  # p = 1/2, 1/4, 1/4
    assert unigram_bpc(train, torch.tensor([0, 1]), 3) == pytest.approx((1 + 2) / 2)
    assert unigram_bpc(train, train, 3) == pytest.approx(1.5)


# -- training windows --------------------------------------------------------------------------


def window_starts(batches: WindowBatches, epoch: int, seed: int) -> list[int]:
    """Recover each window's start position in the stream (the stream is arange, so ids are positions)."""
    starts = []
    for inputs, targets in batches.iterate(epoch, seed):
        assert torch.equal(inputs[1:], targets[:-1])  # targets are inputs shifted by one
        starts.extend(inputs[0].tolist())
    return starts


def test_windows_start_at_a_fresh_reproducible_offset_each_epoch():
    stream = torch.arange(10_007)
    batches = WindowBatches(stream, window=100, batch_size=8)
    assert batches.num_windows == 99 and len(batches) == 12
    offsets = [batches.epoch_plan(epoch, seed=3)[0] for epoch in range(6)]
    assert len(set(offsets)) > 1  # differs between epochs
    assert offsets == [batches.epoch_plan(epoch, seed=3)[0] for epoch in range(6)]  # reproducible
    assert offsets != [batches.epoch_plan(epoch, seed=4)[0] for epoch in range(6)]  # depends on the seed
    for epoch, offset in enumerate(offsets):
        starts = window_starts(batches, epoch, seed=3)
        assert len(starts) == len(set(starts)) == 12 * 8
        assert all((s - offset) % 100 == 0 for s in starts)
        assert max(starts) + 100 <= stream.numel()  # no window crosses the end


def test_window_batches_are_time_major_with_window_minus_one_predictions():
    batches = WindowBatches(torch.arange(1000), window=10, batch_size=4)
    inputs, targets = next(batches.iterate(0, 0))
    assert inputs.shape == targets.shape == (9, 4)
    assert torch.equal(targets - inputs, torch.ones(9, 4, dtype=torch.long))


def test_iterate_from_a_start_index_continues_the_same_epoch():
    batches = WindowBatches(torch.arange(5000), window=50, batch_size=4)
    full = list(batches.iterate(2, 7))
    tail = list(batches.iterate(2, 7, start=5))
    assert len(tail) == len(full) - 5
    for (a, _), (b, _) in zip(full[5:], tail):
        assert torch.equal(a, b)


def test_the_last_possible_offset_still_fits():
    stream = torch.arange(399)  # (399 - 100 + 1) // 100 = 3 windows for every offset in [0, 100)
    batches = WindowBatches(stream, window=100, batch_size=1)
    assert batches.num_windows == 3
    assert 99 + 3 * 100 <= stream.numel()


# -- streaming evaluation ----------------------------------------------------------------------


@pytest.mark.parametrize("streams, chunk", [(1, 7), (3, 5), (4, 100), (64, 10)])
def test_stream_batches_predict_every_position_exactly_once(streams, chunk):
    stream = torch.arange(1, 202)  # 201 symbols, 200 predictions
    batches = StreamBatches(stream, streams, chunk)
    inputs, targets, t0s = [], [], []
    for x, y, t0 in batches.iterate():
        assert x.shape == y.shape and x.shape[1] == batches.streams
        inputs.append(x)
        targets.append(y)
        t0s.append(t0)
    assert t0s == list(range(0, batches.length, chunk)) and len(t0s) == len(batches)
    targets = torch.cat(targets).t().reshape(-1)  # piece by piece, in stream order
    inputs = torch.cat(inputs).t().reshape(-1)
    real = targets != IGNORE
    assert int(real.sum()) == 200
    assert torch.equal(targets[real], stream[1:])
    assert torch.equal(inputs[real], stream[:-1])
    assert not real[real.nonzero().max() + 1 :].any()  # padding only at the very end


def test_length_batches_cut_full_batches_of_non_overlapping_sequences():
    stream = torch.arange(1000)
    batches = LengthBatches(stream, length=30, batch_size=8)
    assert len(batches) == 4  # 999 // 30 = 33 sequences -> 4 full batches
    seen = []
    for inputs, targets in batches.iterate():
        assert inputs.shape == targets.shape == (30, 8)
        assert torch.equal(targets - inputs, torch.ones(30, 8, dtype=torch.long))
        seen.extend(inputs[0].tolist())
    assert seen == list(range(0, 32 * 30, 30))


def test_length_batches_longer_than_the_split_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        LengthBatches(torch.arange(100), length=50, batch_size=4)


# -- bad input ---------------------------------------------------------------------------------


def test_a_missing_split_is_named(fake_ptb, tmp_path):
    root = copy_corpus(fake_ptb, tmp_path)
    (root / "ptb" / "ptb.char.test.txt").unlink()
    with pytest.raises(DataError, match=r"lacks ptb\.char\.test\.txt; .*data\.download=true"):
        load_ptb(root, allow_download=False)


def test_an_unknown_symbol_is_named_with_its_position(fake_ptb, tmp_path):
    root = copy_corpus(fake_ptb, tmp_path)
    valid = root / "ptb" / "ptb.char.valid.txt"
    lines = valid.read_text().splitlines()
    lines[2] = " a b _ c %"
    valid.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ptb\.char\.valid\.txt, line 3, symbol 5: '%' is not in the training vocabulary"):
        load_ptb(root, allow_download=False)


def test_an_empty_file_is_a_clear_error(fake_ptb, tmp_path):
    root = copy_corpus(fake_ptb, tmp_path)
    (root / "ptb" / "ptb.char.valid.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"ptb\.char\.valid\.txt is empty"):
        load_ptb(root, allow_download=False)


def test_a_window_longer_than_the_split_is_a_clear_error():
    with pytest.raises(DataError, match=r"task.seq_len=500 is longer than the training split \(300 symbols\)"):
        WindowBatches(torch.arange(300), window=500, batch_size=2)
    with pytest.raises(DataError, match="fewer than one batch of task.batch_size=64"):
        WindowBatches(torch.arange(3000), window=100, batch_size=64)


def test_read_symbols_adds_a_line_end_to_an_unterminated_last_line(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(" a b\n c")
    assert read_symbols(path) == ["a", "b", EOL, "c", EOL]


# -- the real corpus ---------------------------------------------------------------------------


def test_real_ptb_matches_the_published_statistics(real_ptb):
    corpus = load_ptb(real_ptb, allow_download=False)
    assert len(corpus.vocab) == 50
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (5_017_483, 393_043, 442_424)
    unigram = unigram_bpc(corpus.train, corpus.train, len(corpus.vocab))
    assert 4.3 < unigram < 4.4 < math.log2(50)
