"""A short training run on the real PTB gets well below the unigram bpc (about 10 s per model)."""

import pytest

from bnrnn.train import train
from conftest import compose

UNIGRAM_TRAIN_BPC = 4.334  # entropy of the training split's symbol frequencies (test_ptb_data.py)


@pytest.mark.parametrize("model", ["lstm", "bnlstm"])
def test_a_short_run_on_real_ptb_beats_the_unigram_model(real_ptb, tmp_path, model):
    cfg = compose([f"data.root={real_ptb}", "data.download=false", "task=ptb", f"model={model}", "trainer=adam",
                   "model.hidden_size=64", "model.stats_momentum=0.05", "model.h0_noise=0", "trainer.max_steps=150",
                   "trainer.eval_every=150", "trainer.progress=off"])
    results = train(cfg, tmp_path / "run")
    assert results["valid_bpc"] < UNIGRAM_TRAIN_BPC - 0.8
    assert results["test_bpc"] < UNIGRAM_TRAIN_BPC - 0.8
