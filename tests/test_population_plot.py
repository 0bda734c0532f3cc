"""bnrnn eval --stats: the population statistics figure's data are the checkpoint's buffers."""

from __future__ import annotations

import json

import pytest
import torch

from bnrnn.checkpoint import load_checkpoint
from bnrnn.errors import BnrnnError
from bnrnn.population_plot import plot_population
from bnrnn.train import train


def test_the_plotted_data_equal_the_buffers(small_mnist_cfg, tmp_path):
    run = tmp_path / "run"
    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=3", "trainer.test_at_end=false", "model.t_max=20"), run)
    written = plot_population(run, "last")
    assert written["figure"].stat().st_size > 10_000
    data = json.loads(written["json"].read_text())
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert set(data) >= {"x", "h", "c"} and data["step"] == 3
    for term in ("x", "h", "c"):
        for name, buffer in (("mean", "running_mean"), ("var", "running_var")):
            values = state[f"rnn.cells.0.norm_{term}.{buffer}"].double()  # (T_max, F)
            assert data[term]["steps"] == values.shape[0] == 20
            shown = torch.tensor(data[term][name]["shown"], dtype=torch.float64)  # (features, T)
            assert torch.equal(shown, values[:, :4].t())
            p90 = torch.tensor(data[term][name]["p90"], dtype=torch.float64)
            torch.testing.assert_close(p90, torch.quantile(values, 0.9, dim=1), rtol=0, atol=0)
    # trained steps moved the population away from its start (mean 0, variance 1)
    assert torch.tensor(data["h"]["var"]["p50"]).ne(1.0).all()


def test_a_stacked_bidirectional_run_draws_every_layer_and_direction(small_mnist_cfg, tmp_path):
    run = tmp_path / "run"
    train(small_mnist_cfg("model=bnlstm", "model.num_layers=2", "model.bidirectional=true", "trainer.max_steps=2",
                          "trainer.test_at_end=false", "model.t_max=10"), run)
    written = plot_population(run, "last")
    data = json.loads(written["json"].read_text())
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    names = [f"{term}_{layer}" for layer in ("layer1", "layer1_reverse", "layer2", "layer2_reverse")
             for term in ("x", "h", "c")]
    assert set(data) >= set(names) and "h" not in data
    for index, name in enumerate(names):
        term = name[0]
        values = state[f"rnn.cells.{index // 3}.norm_{term}.running_var"].double()
        assert torch.equal(torch.tensor(data[name]["var"]["shown"], dtype=torch.float64), values[:, :4].t())
    assert written["figure"].stat().st_size > 10_000


def test_a_model_without_batch_norm_is_refused(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("model=lstm", "trainer.max_steps=1", "trainer.test_at_end=false"), tmp_path / "run")
    with pytest.raises(BnrnnError, match="no batch norm"):
        plot_population(tmp_path / "run", "last")


def test_validation_writes_gamma_histograms_to_tensorboard(small_mnist_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnrnn.monitoring import norm_histograms

    run = tmp_path / "run"
    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=2", "trainer.test_at_end=false"), run)
    events = EventAccumulator(str(run), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()["histograms"]
    assert {"norms/gamma_x", "norms/gamma_h", "norms/gamma_c", "norms/population_var_h_per_step",
            "norms/batch_var_h_per_step"} <= set(tags)
    assert events.Histograms("norms/batch_var_h_per_step")[0].histogram_value.num == 784  # one value per step
    assert [e.step for e in events.Histograms("norms/gamma_h")] == [2]  # eval_every=2
    gamma_h = load_checkpoint(run / "checkpoints" / "last.pt")["model"]["rnn.cells.0.norm_h.weight"]
    histogram = events.Histograms("norms/gamma_h")[0].histogram_value
    assert histogram.num == gamma_h.numel()
    assert histogram.min == pytest.approx(float(gamma_h.min())) and histogram.max == pytest.approx(float(gamma_h.max()))
    assert norm_histograms(torch.nn.Linear(1, 1)) == {}  # a model without norms: nothing to draw


@pytest.mark.parametrize("backend", ["cpu", "aten", "reference"])
def test_the_watched_batch_variance_of_w_h_h_is_that_of_the_first_sequence(backend):
    """In evaluation with batch statistics, BN_h's watch keeps the per-step batch variance of
    W_h h_{t-1} averaged over the features, for the steps up to T_max (5 of 7): equal to that
    of the hidden states run by hand."""
    from bnrnn import BNLSTM
    from bnrnn.nn import Statistics
    from bnrnn.monitoring import batch_variance_watch

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.rnn = BNLSTM(3, 6, max_steps=5, backend=backend, learn_initial_state=True).double().eval()
    layer = model.rnn.cells[0]
    x = torch.randn(7, 9, 3, dtype=torch.float64)
    with torch.no_grad(), batch_variance_watch(model) as watched:
        hs, _ = model.rnn(x, stats=Statistics.BATCH)
        model.rnn(torch.randn(7, 9, 3, dtype=torch.float64), stats=Statistics.BATCH)  # a second sequence: not kept
    h_prev = torch.cat([layer.h0.expand(1, 9, 6), hs[:-1]])  # h_{t-1} (T, B, H)
    expected = (h_prev @ layer.weight_hh.t()).var(dim=1, unbiased=False).mean(dim=1)[:5]
    assert set(watched) == {"norms/batch_var_h_per_step"}
    torch.testing.assert_close(watched["norms/batch_var_h_per_step"], expected.float(), atol=1e-6, rtol=1e-5)
    assert layer.norm_h.watched_variance() is None  # the watch ends with the block
