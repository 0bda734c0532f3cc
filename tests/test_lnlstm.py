"""model=lnlstm: the layer-normalised LSTM (Ba et al., 2016) against a hand-written one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnrnn.nn import LSTMLayer
from bnrnn.train import train


def hand_written_ln_lstm(layer: LSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """Ba et al.'s LN-LSTM written out, from the layer's parameters: (T, B, I) -> (T, B, H)."""
    B, H = x.shape[1], layer.hidden_size

    def ln(a, term):
        mean = a.mean(dim=-1, keepdim=True)
        var = a.var(dim=-1, unbiased=False, keepdim=True)
        return term.weight * (a - mean) / torch.sqrt(var + term.eps) + term.bias

    h, c = layer.h0.expand(B, H), layer.c0.expand(B, H)
    outputs = []
    for x_t in x:
        gates = ln(x_t @ layer.weight_ih.t(), layer.norm_x) + ln(h @ layer.weight_hh.t(), layer.norm_h) + layer.bias
        i, f, g, o = gates.split(H, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln(c, layer.norm_c))
        outputs.append(h)
    return torch.stack(outputs)


BACKENDS = ("reference", "aten", "auto")  # auto: the aten loop on the CPU and on a GPU


def randomised_ln_layer(seed: int = 0, backend: str = "reference", **switches) -> LSTMLayer:
    torch.manual_seed(seed)
    layer = LSTMLayer(3, 5, max_steps=4, norm="layer", gamma_init=1.0, backend=backend, **switches).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lnlstm_equals_a_hand_written_layer_norm_lstm(mode, backend):
    """Outputs and every gradient, float64, to 1e-10; the same in training and evaluation
    (layer norm keeps no statistics), and past T_max (9 steps, max_steps 4)."""
    layer = randomised_ln_layer(backend=backend)
    getattr(layer, mode)()
    x = torch.randn(9, 6, 3, dtype=torch.float64)
    out = layer(x)[0]
    expected = hand_written_ln_lstm(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    weight = torch.randn_like(out)
    ours = torch.autograd.grad((out * weight).sum(), list(layer.parameters()))
    theirs = torch.autograd.grad((expected * weight).sum(), list(layer.parameters()))
    for (name, _), a, b in zip(layer.named_parameters(), ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_lnlstm_passes_gradcheck(backend):
    layer = randomised_ln_layer(1, backend)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, *p):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], p)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6)


def test_lnlstm_keeps_no_statistics_and_runs_with_a_batch_of_one():
    layer = LSTMLayer(2, 4, max_steps=3, norm="layer")
    assert not any("running" in name for name, _ in layer.named_buffers())
    out, _ = layer.train()(torch.randn(7, 1, 2))  # no batch statistics: one example is fine
    assert torch.isfinite(out).all() and F.layer_norm is not None


def test_model_lnlstm_trains_and_tests_on_a_task(small_mnist_cfg, tmp_path):
    results = train(small_mnist_cfg("model=lnlstm", "trainer.max_steps=4", "task.batch_size=1"), tmp_path / "run")
    assert results["steps"] == 4 and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["test_stats"] == "none"  # one validation mode: nothing to choose between


@pytest.mark.parametrize("switches", [dict(norm_x=False), dict(norm_h=False), dict(norm_c=False),
                                      dict(norm_x=False, norm_c=False)])
def test_the_aten_loop_equals_the_reference_with_any_terms_normalised(switches):
    """Each subset of layer-normalised terms, from a given state and past T_max: outputs, the
    final state and every gradient (the state's included), float64."""
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    results = []
    for backend in ("reference", "aten"):
        layer = randomised_ln_layer(2, backend, **switches)
        out, (h, c) = layer(x, state)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + (c * c).sum()
        grads = torch.autograd.grad(loss, [x, *state, *layer.parameters()], materialize_grads=True)  # h0: 0
        results.append((out, c, *grads))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
