"""The norms behind one interface (bnrnn.nn.norms): the statistics are an argument, and a new
norm is one class that the reference runs with no other edit (RMS norm shows it)."""

from __future__ import annotations

import pytest
import torch

from bnrnn.config import load_config
from bnrnn.nn import LSTMLayer, Statistics
from bnrnn.nn.norms import NORMS, LayerNorm, Norm, RMSNorm, TimeBatchNorm, make_norm
from bnrnn.train import train
from conftest import compose


def rms_lstm_by_hand(layer: LSTMLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RMS-normalised LSTM written out from its definition, x (T, B, I) -> (outputs (T, B, H), c_T):
    RMS(a) = g * a / sqrt(mean(a^2) + eps) over each row, on W_x x, W_h h and c (+ beta_c)."""
    def rms(a, gain, eps=1e-5):
        return gain * a / torch.sqrt((a * a).mean(dim=1, keepdim=True) + eps)

    H = layer.hidden_size
    h = layer.h0.expand(x.shape[1], H)
    c = layer.c0.expand(x.shape[1], H)
    outputs = []
    for x_t in x:
        pre = (rms(x_t @ layer.weight_ih.t(), layer.norm_x.weight) + rms(h @ layer.weight_hh.t(), layer.norm_h.weight)
               + layer.bias)
        i, f, g, o = pre[:, :H], pre[:, H:2 * H], pre[:, 2 * H:3 * H], pre[:, 3 * H:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(rms(c, layer.norm_c.weight) + layer.norm_c.bias)
        outputs.append(h)
    return torch.stack(outputs), c


def randomised(layer: LSTMLayer) -> LSTMLayer:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("mode", [Statistics.TRAIN, Statistics.POPULATION])
def test_an_rms_normalised_lstm_equals_the_cell_written_by_hand(mode):
    """model.norm=rms: the reference runs the new norm through the same interface; outputs and
    every gradient equal the hand-written cell's (float64), in training and in evaluation
    (RMS norm keeps no statistics: both are the same function)."""
    torch.manual_seed(0)
    layer = randomised(LSTMLayer(3, 5, max_steps=4, norm="rms", gamma_init=0.7).double())
    assert all(isinstance(bn, RMSNorm) for bn in layer.norms()) and layer.norm_x.bias is None
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    out, (_, c) = layer.train(mode is Statistics.TRAIN)(x, stats=mode)
    out_h, c_h = rms_lstm_by_hand(layer, x)
    torch.testing.assert_close(out, out_h, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(c, c_h, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad((out.square().sum() + c.sum()), list(layer.parameters()))
    grads_h = torch.autograd.grad((out_h.square().sum() + c_h.sum()), list(layer.parameters()))
    for name, g, g_h in zip([n for n, _ in layer.named_parameters()], grads, grads_h):
        torch.testing.assert_close(g, g_h, atol=1e-12, rtol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_a_norm_no_fast_backend_computes_runs_on_the_reference_and_a_named_one_refuses():
    torch.manual_seed(0)
    auto = LSTMLayer(3, 5, max_steps=4, norm="rms")
    ref = LSTMLayer(3, 5, max_steps=4, norm="rms", backend="reference")
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(6, 4, 3)
    torch.testing.assert_close(auto(x)[0], ref(x)[0], atol=0, rtol=0)
    auto.backend = "cpu"
    with pytest.raises(ValueError, match=r"^model.backend=cpu cannot run model.norm=rms: it computes batch norm; use "
                                         r"model.backend=reference \(or auto\)$"):
        auto(x)


def test_every_norm_is_registered_by_the_name_the_config_takes_and_declares_its_population():
    assert NORMS == {"batch": TimeBatchNorm, "layer": LayerNorm, "rms": RMSNorm}
    assert [cls.keeps_population for cls in NORMS.values()] == [True, False, False]
    for name in NORMS:
        norm = make_norm(name, 8, 4, 0.5, False, 0.1, 1e-5)
        assert isinstance(norm, Norm) and norm.name == name and torch.equal(norm.weight, torch.full((8,), 0.5))
        assert norm.forward_sequence(torch.randn(4, 3, 8)).shape == (4, 3, 8)
    with pytest.raises(ValueError, match="unknown norm 'group'; choose one of batch, layer, rms"):
        make_norm("group", 8, 4, 0.5, False, 0.1, 1e-5)


def test_the_statistics_argument_decides_what_batch_norm_uses_and_what_it_keeps():
    """TRAIN folds the EMA, REESTIMATE the plain average, BATCH nothing; POPULATION reads the
    slots; None follows train() / eval()."""
    torch.manual_seed(0)
    batches = [torch.randn(2, 16, 3) * (k + 1) + k for k in range(3)]
    means = torch.stack([b.mean(1) for b in batches])
    bn = TimeBatchNorm(3, max_steps=2, gamma_init=1.0, momentum=0.5)
    for b in batches:
        bn.forward_sequence(b, stats=Statistics.BATCH)
    assert torch.equal(bn.running_mean, torch.zeros(2, 3)) and bn.num_batches_tracked.tolist() == [0, 0]
    for b in batches:
        bn.forward_sequence(b)  # a new module is in training mode: TRAIN
    ema = torch.zeros(2, 3)
    for m in means:
        ema = 0.5 * ema + 0.5 * m
    torch.testing.assert_close(bn.running_mean, ema)
    bn.reset_running_stats()
    for b in batches:
        bn.forward_sequence(b, stats=Statistics.REESTIMATE)
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert bn.momentum == 0.5  # the mode is an argument: nothing was set on the norm
    x = torch.randn(2, 4, 3)
    expected = (x - bn.running_mean.unsqueeze(1)) / torch.sqrt(bn.running_var.unsqueeze(1) + bn.eps)
    torch.testing.assert_close(bn.forward_sequence(x, stats=Statistics.POPULATION), expected)
    torch.testing.assert_close(bn.eval().forward_sequence(x), expected)


def test_an_rms_lstm_trains_from_the_config(small_mnist_cfg, tmp_path):
    cfg = small_mnist_cfg("model=lnlstm", "model.norm=rms", "trainer.max_steps=4", "trainer.test_at_end=false")
    assert load_config(cfg).model.norm == "rms"
    results = train(cfg, tmp_path)
    assert results["steps"] == 4 and 0 <= results["valid_accuracy"] <= 1
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt")
    assert {"rnn.cells.0.norm_x.weight", "rnn.cells.0.norm_c.bias"} <= checkpoint["model"].keys()
    assert "rnn.cells.0.norm_x.running_mean" not in checkpoint["model"]


def test_an_unknown_norm_is_refused_by_the_config(fake_mnist):
    from bnrnn.errors import ConfigError

    with pytest.raises(ConfigError, match="model.norm=group is invalid: it must be one of batch, layer, rms"):
        load_config(compose([f"data.root={fake_mnist}", "model.norm=group"]))
