"""The BN-LSTM layer against plain, obviously correct implementations."""

import pytest
import torch
from torch import nn

from bnrnn.nn import LSTMLayer, TimeBatchNorm

torch.set_default_dtype(torch.float32)


def naive_bnlstm(layer: LSTMLayer, x, training: bool):
    """Step-by-step BN-LSTM written straight from the paper's equations, one time step at a time.

    Uses batch statistics of step t in training and population slot min(t, T_max-1) in eval.
    Returns the outputs (T, B, H) and the batch statistics it used per step.
    """

    def bn(norm: TimeBatchNorm, a, t):
        if training:
            mean = a.mean(0)
            var = ((a - mean) ** 2).mean(0)  # biased
        else:
            slot = min(t, norm.max_steps - 1)
            mean, var = norm.running_mean[slot], norm.running_var[slot]
        out = norm.weight * (a - mean) / torch.sqrt(var + norm.eps)
        return out + norm.bias if norm.bias is not None else out

    T, B, _ = x.shape
    H = layer.hidden_size
    h = layer.h0.expand(B, H)
    c = layer.c0.expand(B, H)
    outs = []
    for t in range(T):
        ax = x[t] @ layer.weight_ih.T
        ah = h @ layer.weight_hh.T
        if layer.norm_x is not None:
            ax = bn(layer.norm_x, ax, t)
        if layer.norm_h is not None:
            ah = bn(layer.norm_h, ah, t)
        pre = ax + ah + layer.bias
        i, f, g, o = pre[:, :H], pre[:, H : 2 * H], pre[:, 2 * H : 3 * H], pre[:, 3 * H :]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cn = bn(layer.norm_c, c, t) if layer.norm_c is not None else c
        h = torch.sigmoid(o) * torch.tanh(cn)
        outs.append(h)
    return torch.stack(outs)


def randomise(layer: LSTMLayer, seed=0):
    """Give every parameter and buffer a non-trivial value, so no term hides behind a 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in layer.norms():
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return layer


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("T,B,I,H", [(7, 5, 3, 4), (20, 16, 1, 10)])
def test_all_switches_off_equals_torch_lstm(T, B, I, H, backend):
    torch.manual_seed(0)
    ours = LSTMLayer(I, H, max_steps=T, norm_x=False, norm_h=False, norm_c=False, backend=backend)
    ref = nn.LSTM(I, H)
    with torch.no_grad():
        ours.weight_ih.copy_(ref.weight_ih_l0)
        ours.weight_hh.copy_(ref.weight_hh_l0)
        ours.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
        ours.h0.normal_()
        ours.c0.normal_()
    x = torch.randn(T, B, I)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, (h, c) = ours(x_ours)
    h0 = ours.h0.detach().expand(1, B, H).contiguous()
    c0 = ours.c0.detach().expand(1, B, H).contiguous()
    out_ref, (h_ref, c_ref) = ref(x_ref, (h0, c0))
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref[0], atol=1e-5, rtol=1e-5)

    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight_ih.grad, ref.weight_ih_l0.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight_hh.grad, ref.weight_hh_l0.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias_ih_l0.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("switches", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_training_mode_matches_per_step_batch_statistics(switches, backend):
    """Float64: randomise() gives every example the same h0, so W_h h_0 has zero batch
    variance, and BN's gain gamma / sqrt(eps) amplifies float32 rounding differences between
    two correct formulas (the fast paths compute x * s + m, the reference (x - mean) * s)."""
    torch.manual_seed(1)
    layer = LSTMLayer(3, 6, max_steps=9, norm_x=switches[0], norm_h=switches[1], norm_c=switches[2], backend=backend)
    layer = randomise(layer).double()
    x = torch.randn(9, 8, 3, dtype=torch.float64)
    out, _ = layer.train()(x)
    torch.testing.assert_close(out, naive_bnlstm(layer, x, training=True), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_output_at_step_t_ignores_later_steps(backend):
    """Statistics shared over time (a common port bug) would leak later steps into step t."""
    torch.manual_seed(2)
    layer = randomise(LSTMLayer(2, 5, max_steps=12, backend=backend)).train()
    x = torch.randn(12, 6, 2)
    y = x.clone()
    y[6:] = 10 * torch.randn(6, 6, 2)
    out_x, _ = layer(x)
    out_y, _ = layer(y)
    torch.testing.assert_close(out_x[:6], out_y[:6], atol=0, rtol=0)
    assert not torch.allclose(out_x[6:], out_y[6:])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_step_t_depends_on_the_batch_at_step_t(backend):
    """Same example, different batch-mates at step t only: its output at t changes."""
    torch.manual_seed(3)
    layer = randomise(LSTMLayer(2, 5, max_steps=4, norm_x=True, norm_h=False, norm_c=False, backend=backend)).train()
    x = torch.randn(4, 6, 2)
    y = x.clone()
    y[3, 1:] += 1.0  # examples 1.. differ at the last step only
    out_x, _ = layer(x)
    out_y, _ = layer(y)
    torch.testing.assert_close(out_x[:3, 0], out_y[:3, 0], atol=0, rtol=0)
    assert (out_x[3, 0] - out_y[3, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()  # inference as the evaluator runs it (the fast paths fold BN into the weights)
def test_eval_mode_uses_population_statistics_and_reuses_the_last_beyond_t_max(backend):
    torch.manual_seed(4)
    t_max = 5
    layer = randomise(LSTMLayer(3, 4, max_steps=t_max, backend=backend)).eval()
    x = torch.randn(t_max + 4, 7, 3)  # 4 steps beyond T_max
    out, _ = layer(x)
    torch.testing.assert_close(out, naive_bnlstm(layer, x, training=False), atol=1e-5, rtol=1e-5)
    # An example's output does not depend on its batch-mates in eval mode.
    single, _ = layer(x[:, :1])
    torch.testing.assert_close(single[:, 0], out[:, 0], atol=1e-6, rtol=1e-6)
    # Beyond T_max the last slot is used: changing it changes those steps only.
    with torch.no_grad():
        for bn in layer.norms():
            bn.running_mean[t_max - 1] += 0.3
    out2, _ = layer(x)
    torch.testing.assert_close(out2[: t_max - 1], out[: t_max - 1], atol=0, rtol=0)
    assert not torch.allclose(out2[t_max:], out[t_max:])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gradcheck_float64_tiny_bnlstm(backend):
    torch.manual_seed(5)
    layer = randomise(LSTMLayer(2, 3, max_steps=4, backend=backend)).double().train()
    x = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    params = [layer.weight_ih, layer.weight_hh, layer.bias, layer.h0, layer.c0]
    params += [p for bn in layer.norms() for p in bn.parameters()]

    def fn(x, *ps):
        out, (h, c) = layer(x)
        return out, c

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_running_statistics_after_one_step_follow_the_ema_formula(backend):
    torch.manual_seed(6)
    momentum = 0.05
    layer = LSTMLayer(3, 4, max_steps=6, momentum=momentum, backend=backend).train()
    x = torch.randn(6, 10, 3)
    before_mean = layer.norm_x.running_mean.clone()
    before_var = layer.norm_x.running_var.clone()
    layer(x)
    a = x @ layer.weight_ih.detach().T  # (T, B, 4H), the x term's input
    batch_mean = a.mean(1)
    batch_var = a.var(1, unbiased=False)
    torch.testing.assert_close(layer.norm_x.running_mean, (1 - momentum) * before_mean + momentum * batch_mean)
    torch.testing.assert_close(layer.norm_x.running_var, (1 - momentum) * before_var + momentum * batch_var)
    # The starting point is mean 0 / var 1, so after one step: alpha * batch and 1 - alpha + alpha * var.
    torch.testing.assert_close(layer.norm_x.running_mean, momentum * batch_mean)
    assert layer.norm_x.num_batches_tracked.tolist() == [1] * 6


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()
def test_eval_does_not_touch_running_statistics(backend):
    layer = LSTMLayer(2, 3, max_steps=4, backend=backend).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(6, 3, 2))
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_cumulative_average_mode_averages_batch_statistics():
    bn = TimeBatchNorm(3, max_steps=2, momentum=None).train()
    batches = [torch.randn(2, 8, 3) for _ in range(4)]
    for b in batches:
        bn.forward_sequence(b)
    expected_mean = torch.stack([b.mean(1) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(1, unbiased=False) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)


def test_initialisation_follows_the_paper():
    layer = LSTMLayer(1, 8, max_steps=3, gamma_init=0.1)
    H = 8
    assert torch.all(layer.bias[H : 2 * H] == 1.0)
    assert torch.all(layer.bias[:H] == 0) and torch.all(layer.bias[2 * H :] == 0)
    for bn in layer.norms():
        assert torch.all(bn.weight == 0.1)
    assert layer.norm_x.bias is None and layer.norm_h.bias is None  # b already plays beta's role
    assert torch.all(layer.norm_c.bias == 0)
    for block in layer.weight_hh.detach().split(H):
        torch.testing.assert_close(block @ block.T, torch.eye(H), atol=1e-5, rtol=1e-5)
    assert torch.all(layer.h0 == 0) and torch.all(layer.c0 == 0)


def test_h0_noise_only_in_training():
    layer = LSTMLayer(1, 4, max_steps=2, h0_noise=0.1)
    h_train, _ = layer.train().initial_state(1000)
    h_eval, _ = layer.eval().initial_state(3)
    assert 0.08 < h_train.std().item() < 0.12
    assert torch.all(h_eval == 0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()
def test_state_can_be_carried_between_chunks(backend):
    """A long sequence in two chunks (state and time offset passed on) equals one pass."""
    torch.manual_seed(7)
    layer = randomise(LSTMLayer(2, 3, max_steps=4, backend=backend)).eval()
    x = torch.randn(10, 3, 2)
    full, (h, c) = layer(x)
    first, state = layer(x[:6])
    second, (h2, c2) = layer(x[6:], state, t0=6)
    torch.testing.assert_close(torch.cat([first, second]), full)
    torch.testing.assert_close(c2, c)
