"""bnrnn.BNLSTM, the public layer: nn.LSTM's function with its norms off, statistics that
cover only the running sequences of a padded batch, and inference on a batch of one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnrnn import BNLSTM

BACKENDS = ["reference", "aten", "cpu"]  # CUDA's triton: tests/test_cuda.py's machine


@pytest.fixture(autouse=True)
def backend_here(request):
    """Skip a case whose backend cannot run on this machine (the cpu one needs its extension)."""
    from bnrnn.nn import backends

    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec else None
    if name and not backends.available(name, torch.zeros(1, 1, 1, dtype=torch.float64)):
        pytest.skip(f"the {name} backend cannot run here")
LENGTHS = [9, 4, 9, 1, 6]


def copy_from_lstm(layer: BNLSTM, lstm: nn.LSTM) -> None:
    """nn.LSTM's weights into the layer's cells (its two biases summed into one)."""
    with torch.no_grad():
        for index, cell in enumerate(layer.cells):
            suffix = f"l{index // layer.num_directions}" + ("_reverse" if index % layer.num_directions else "")
            cell.weight_ih.copy_(getattr(lstm, f"weight_ih_{suffix}"))
            cell.weight_hh.copy_(getattr(lstm, f"weight_hh_{suffix}"))
            cell.bias.copy_(getattr(lstm, f"bias_ih_{suffix}") + getattr(lstm, f"bias_hh_{suffix}"))


def grads(module: nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_with_its_norms_off_it_is_nn_lstm(backend, packed):
    """Outputs, final states and every gradient, float64, from copied weights: two layers,
    both directions, batch-first, a given initial state; packed with unequal lengths too."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    layer = BNLSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, norm_terms=(),
                   backend=backend).double()
    copy_from_lstm(layer, lstm)
    x = torch.randn(5, 9, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 5, 5, dtype=torch.float64)
    c0 = torch.randn(4, 5, 5, dtype=torch.float64)
    results = []
    for module in (lstm, layer):
        x.grad = None
        inp = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False) if packed else x
        out, (h_n, c_n) = module(inp, (h0, c0))
        if packed:
            out, _ = pad_packed_sequence(out, batch_first=True)
        (out.square().sum() + h_n.sum() + 2 * c_n.sum()).backward()
        weights = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results.append((out.detach(), h_n.detach(), c_n.detach(), x.grad.clone(), weights))
    expected, got = results
    for a, b in zip(expected[:4], got[:4]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # weight gradients: W_ih, W_hh alike; our one bias's gradient is each of nn.LSTM's two
    ours = iter(got[4])
    for index in range(4):
        w_ih, w_hh, b_ih, b_hh = expected[4][4 * index: 4 * index + 4]
        torch.testing.assert_close(next(ours), w_ih, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(next(ours), w_hh, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(next(ours), b_ih, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b_hh, b_ih)


def masked_reference(cell, x: torch.Tensor, lengths: torch.Tensor, min_sequences: int = 1):
    """The BN-LSTM of eq. (6)-(8) over a padded batch, written out: at step t every mean and
    (biased) variance is over the sequences with lengths > t, the population slot t moves
    toward them by the EMA, and the ended sequences keep their state; at a step where fewer
    than ``min_sequences`` run, the population of the last slot filled so far normalises
    instead, and nothing is folded. Returns outputs (T, B, H), zero at padding, h_n, c_n,
    and the running (mean, var) of each norm."""
    steps, batch = x.shape[:2]
    H = cell.hidden_size
    h = x.new_zeros(batch, H)
    c = x.new_zeros(batch, H)
    running = {name: [getattr(cell, name).running_mean.clone(), getattr(cell, name).running_var.clone()]
               for name in ("norm_x", "norm_h", "norm_c")}
    filled = set(cell.norm_x.num_batches_tracked.nonzero().flatten().tolist())  # slots that hold statistics

    def bn(name: str, v: torch.Tensor, mask: torch.Tensor, t: int) -> torch.Tensor:
        norm = getattr(cell, name)
        slot_mean, slot_var = running[name]
        if int(mask.sum()) < min_sequences:
            slot = min(t, max(filled) if filled else cell.max_steps - 1)
            mean, var = slot_mean[slot].detach(), slot_var[slot].detach()  # the population: constants
            y = (v - mean) / torch.sqrt(var + norm.eps) * norm.weight
            return y if norm.bias is None else y + norm.bias
        mean, var = v[mask].mean(0), v[mask].var(0, unbiased=False)
        running[name] = [slot_mean.index_put((torch.tensor(t),), slot_mean[t] + norm.momentum * (mean - slot_mean[t])),
                         slot_var.index_put((torch.tensor(t),), slot_var[t] + norm.momentum * (var - slot_var[t]))]
        y = (v - mean) / torch.sqrt(var + norm.eps) * norm.weight
        return y if norm.bias is None else y + norm.bias

    outputs = []
    for t in range(steps):
        mask = lengths > t
        if int(mask.sum()) >= min_sequences and t < cell.max_steps:
            filled.add(t)
        gates = bn("norm_x", x[t] @ cell.weight_ih.T, mask, t) + bn("norm_h", h @ cell.weight_hh.T, mask, t) + cell.bias
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn("norm_c", c_new, mask, t))
        m = mask.unsqueeze(1)
        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
        outputs.append(torch.where(m, h_new, torch.zeros_like(h_new)))
    return torch.stack(outputs), h, c, running


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_sequences", [1, 3])
def test_batch_statistics_cover_only_the_running_sequences(backend, min_sequences):
    """Against the BN-LSTM written out with masks: outputs, h_n and c_n at each sequence's own
    end, the population statistics after the update, and the gradients; padding of any
    value changes none of them. With ``stats_min_sequences=3`` the last three steps (two
    sequences running) use the population of slot 5, the last filled."""
    torch.manual_seed(1)
    layer = BNLSTM(3, 4, max_steps=9, gamma_init=0.5, momentum=0.3, backend=backend,
                   stats_min_sequences=min_sequences).double()
    cell = layer.cells[0]
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(9, 5, 3, dtype=torch.float64)
    padding = torch.arange(9).unsqueeze(1) >= lengths  # (T, B)

    def run(module_call, inputs):
        inputs = inputs.clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        out, h_n, c_n, stats = module_call(inputs)
        (out.square().sum() + h_n.sum() + c_n.square().sum()).backward()
        return out.detach(), h_n.detach(), c_n.detach(), stats, inputs.grad, [p.grad.clone() for p in layer.parameters()]

    def ours(inputs):
        before = {n: (getattr(cell, n).running_mean.clone(), getattr(cell, n).running_var.clone())
                  for n in ("norm_x", "norm_h", "norm_c")}
        out, (h_n, c_n) = layer(inputs, lengths=lengths)
        after = {n: [getattr(cell, n).running_mean.clone(), getattr(cell, n).running_var.clone()]
                 for n in ("norm_x", "norm_h", "norm_c")}
        for n, (mean, var) in before.items():  # put them back: each call starts from the same population
            getattr(cell, n).running_mean.copy_(mean)
            getattr(cell, n).running_var.copy_(var)
        return out, h_n[0], c_n[0], after

    expected = run(lambda inputs: masked_reference(cell, inputs, lengths, min_sequences), x)
    got = run(ours, x)
    noisy = x.masked_fill(padding.unsqueeze(2), 1e3)  # padding of another value entirely
    again = run(ours, noisy)
    for result in (got, again):
        for a, b in zip(expected[:3], result[:3]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        for name in ("norm_x", "norm_h", "norm_c"):
            for a, b in zip(expected[3][name], result[3][name]):
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result[4].masked_fill(padding.unsqueeze(2), 0), expected[4].masked_fill(
            padding.unsqueeze(2), 0), rtol=1e-9, atol=1e-12)
        assert bool((result[4][padding] == 0).all())  # no gradient reaches the padding
        for a, b in zip(expected[5], result[5]):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_the_reverse_direction_starts_at_each_sequences_own_end():
    """A bidirectional layer on a padded batch: each sequence's outputs are those it gets alone
    in the batch of its own length (layer norm: no batch statistics to differ by)."""
    torch.manual_seed(2)
    layer = BNLSTM(3, 4, num_layers=2, bidirectional=True, norm="layer").double()
    x = torch.randn(9, 5, 3, dtype=torch.float64)
    out, (h_n, c_n) = layer(x, lengths=LENGTHS)
    for b, length in enumerate(LENGTHS):
        alone, (h_alone, c_alone) = layer(x[:length, b:b + 1])
        torch.testing.assert_close(out[:length, b], alone[:, 0], rtol=1e-10, atol=1e-12)
        assert bool((out[length:, b] == 0).all())
        torch.testing.assert_close(h_n[:, b], h_alone[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c_n[:, b], c_alone[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_eval_a_batch_of_one_is_its_row_in_a_batch_of_64(backend):
    """Population statistics serve any batch size, and lengths past max_steps reuse the last slot."""
    torch.manual_seed(3)
    layer = BNLSTM(3, 6, num_layers=2, max_steps=10, momentum=0.5, backend=backend)
    for _ in range(5):  # population statistics of some training batches
        layer(torch.randn(10, 32, 3))
    layer.eval()
    x = torch.randn(15, 64, 3)  # 15 steps: 5 past the trained length
    with torch.no_grad():
        out, (h_n, c_n) = layer(x)
        one, (h_one, c_one) = layer(x[:, 7:8])
    torch.testing.assert_close(one[:, 0], out[:, 7], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_one[:, 0], h_n[:, 7], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_past_the_last_filled_slot_reuse_it(backend):
    """A layer of 10 slots trained on 4 steps infers as one of 4 slots: the slots no batch
    reached hold no statistics, and steps there read slot 3, as steps past T_max do."""
    outputs = []
    for slots in (10, 4):
        torch.manual_seed(5)
        layer = BNLSTM(3, 5, max_steps=slots, momentum=0.5, backend=backend)
        for _ in range(3):
            layer(torch.randn(4, 16, 3))
        assert layer.cells[0].norm_h.last_slot() == 3
        layer.eval()
        with torch.no_grad():
            outputs.append(layer(torch.randn(10, 8, 3))[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-7)


def test_gradcheck_with_lengths():
    torch.manual_seed(4)
    layer = BNLSTM(2, 3, bidirectional=True, max_steps=5, backend="reference").double()
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = [5, 2, 4]

    def f(inputs):
        out, (h_n, c_n) = layer(inputs, lengths=lengths)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm_terms=("x", "y")), r"norm_terms may hold 'x', 'h' and 'c', not \['y'\]"),
    (dict(), r"batch norm keeps statistics per time step: set max_steps"),
    (dict(max_steps=5, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_a_bad_option_is_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BNLSTM(2, 3, **kwargs)


def test_a_padded_batch_may_be_longer_than_its_longest_sequence():
    layer = BNLSTM(2, 3, max_steps=6)
    out, (h_n, _) = layer(torch.randn(6, 2, 2), lengths=[3, 2])
    assert bool((out[3:] == 0).all())
    torch.testing.assert_close(h_n[0, 0], out[2, 0])


def test_lengths_out_of_range_are_refused():
    layer = BNLSTM(2, 3, max_steps=4)
    with pytest.raises(ValueError, match=r"lengths must hold one length per sequence, each in 1..4"):
        layer(torch.randn(4, 2, 2), lengths=[4, 5])


def test_the_readme_example_runs_as_written(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use the layer in your model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == "torch.Size([1, 50, 32])\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_bf16_autocast_the_gemms_run_in_bf16_and_the_rest_in_float32(backend, caplog):
    """aten and the reference take bf16 GEMM operands (about 3 significant digits of the
    float32 result, and not equal to it), with the outputs, the final state, the gradients
    and the population statistics in float32; the cpu backend's loops compute in float32
    and it says so once."""
    from bnrnn.nn import backends

    backends._logged.clear()
    torch.manual_seed(5)
    layer = BNLSTM(8, 16, max_steps=20, backend=backend, momentum=0.5)
    x = torch.randn(20, 4, 8)
    expected, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = layer(x)
    out.sum().backward()
    assert out.dtype == h_n.dtype == c_n.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all())
               for p in layer.parameters())
    assert all(b.dtype == torch.float32 for name, b in layer.named_buffers() if "running" in name)
    if backend == "cpu":
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert "the cpu backend cannot run its GEMMs in bfloat16: under autocast it computes in float32" in caplog.text
    else:
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
        assert not torch.equal(out, expected)


def test_under_autocast_auto_picks_a_backend_whose_gemms_take_bf16(monkeypatch):
    from bnrnn.nn import backends

    picked = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda *args: picked.append(real(*args).name) or real(*args))
    layer = BNLSTM(3, 8, max_steps=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(5, 2, 3))
    layer(torch.randn(5, 2, 3))
    assert picked[0] == "aten" and picked[1] in ("cpu", "aten")


class Classifier(nn.Module):
    """Someone's model with the layer inside: the last layer's final h to three classes."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = BNLSTM(4, 8, max_steps=6, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.rnn(x)
        return self.head(h_n[-1])


def compiled_matches_eager(backend: str) -> None:
    torch.manual_seed(6)
    model, x = Classifier(), torch.randn(3, 6, 4)
    compiled = torch.compile(model, backend=backend)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_model_holding_the_layer_compiles_and_runs():
    """torch.compile traces the model; the layer's own kernels (the C++ extension, the fused
    ATen recurrence with its autograd Function) are graph breaks, not errors (docs/layer.md)."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_a_model_holding_the_layer_compiles_with_inductor():
    compiled_matches_eager("inductor")
