"""model.num_layers and model.bidirectional: bnrnn.BNLSTM's stack of cells (bnrnn.nn.lstm.LSTMLayer).

Each layer and direction runs its own fast path; these tests hold a 2-layer bidirectional
BN-LSTM on every backend to the same stack on the reference, with the tolerances of the
one-layer tests (tests/test_backends.py, tests/test_triton_path.py), and the stack itself
to its definition (the reverse direction reads the sequence backwards, layer 2 reads both
directions of layer 1).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bnrnn.config import load_config
from bnrnn.errors import ConfigError
from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.kernels.triton import steps as triton_lstm
from bnrnn.nn import backends
from bnrnn.nn.heads import SequenceClassifier
from bnrnn.layer import BNLSTM, layer_labels
from bnrnn.monitoring import norms_by_term
from bnrnn.train import train

BACKENDS = ["cpu", "aten", "triton"]
# The Triton kernels run on a GPU where there is one, else in Triton's CPU interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWITCHES = {"bnlstm": dict(norm_terms=("x", "h", "c")), "vanilla": dict(norm_terms=()), "norm_x": dict(norm_terms=("x",)),
            "norm_h": dict(norm_terms=("h",)), "norm_c": dict(norm_terms=("c",)),
            "lnlstm": dict(norm="layer", gamma_init=1.0)}


def trainer_stack(input_size: int, hidden_size: int, max_steps: int, num_layers: int = 1, bidirectional: bool = False,
                **options) -> BNLSTM:
    """The trainer's kind of stack: time-major, a learned initial state."""
    return BNLSTM(input_size, hidden_size, num_layers, bidirectional=bidirectional, max_steps=max_steps,
                  learn_initial_state=True, **options)


def randomised_stack(seed: int, backend: str, dtype=torch.float64, num_layers=2, bidirectional=True, I=3, H=5,
                     max_steps=6, **options) -> BNLSTM:
    """Every parameter and population statistic away from 0 and 1."""
    torch.manual_seed(seed)
    stack = trainer_stack(I, H, max_steps, num_layers, bidirectional, backend=backend, cuda_graphs=False,
                        **options).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        for name, b in stack.named_buffers():
            if "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=g, dtype=dtype))
            elif "running_var" in name:
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=dtype))
    return stack


def twin_stacks(backend: str, **kwargs) -> tuple[BNLSTM, BNLSTM]:
    """(stack on ``backend``, its copy on the reference), both on the backend's device."""
    fast = randomised_stack(backend=backend, **kwargs)
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    return fast.to(device), ref.to(device)


def tolerance(backend: str) -> dict[str, float]:
    """The one-layer tests' float64 tolerances; a GPU's reductions run in another order
    (tests/test_triton_path.py)."""
    return dict(atol=1e-8, rtol=1e-6) if backend == "triton" and TRITON_DEVICE == "cuda" else dict(atol=1e-11, rtol=1e-9)


def run_with_grads(stack: BNLSTM, x: torch.Tensor):
    """Outputs, final states and every gradient (the input's and each parameter's) of a fixed
    random projection of the outputs and final states."""
    x = x.to(stack.cells[0].weight_hh.device).requires_grad_()
    out, states = stack(x)
    g = torch.Generator().manual_seed(123)

    def noise(like):
        return torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)

    h_n, c_n = states
    loss = (out * noise(out)).sum() + (h_n * noise(h_n)).sum() + (c_n * c_n).sum()
    loss.backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in stack.named_parameters()}}
    return out, states, grads


def assert_same(run_a, run_b, **tol):
    (out_a, states_a, grads_a), (out_b, states_b, grads_b) = run_a, run_b
    torch.testing.assert_close(out_a, out_b, **tol)
    for a, b in zip(states_a, states_b, strict=True):  # h_n, c_n (D * L, B, H)
        torch.testing.assert_close(a, b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], **tol, msg=lambda m: f"grad {name}: {m}")


def assert_same_buffers(a: BNLSTM, b: BNLSTM, atol: float):
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol, msg=lambda m: f"buffer {name}: {m}")


@pytest.fixture
def on_backend(request, monkeypatch):
    """Make the named backend runnable here: the compiled loops built, the Triton kernels in
    Triton's CPU interpreter (tests/conftest.py) when there is no GPU."""
    name = request.param
    if name == "cpu" and not cpu_extension.load():
        pytest.skip("the compiled CPU loops cannot be built here")
    if name == "triton":
        if triton_lstm.triton is None:
            pytest.skip("triton is not installed")
        monkeypatch.setattr(triton_lstm, "available", lambda x: True)
    return name


@pytest.mark.parametrize("on_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("model", ["bnlstm", "norm_x", "norm_h", "norm_c", "vanilla"])
def test_two_layer_bidirectional_training_equals_the_reference(on_backend, model, monkeypatch):
    """float64, T = 9 beyond T_max = 6, a batch of 7: outputs, every final state, every
    gradient and every layer's and direction's population statistics, to the one-layer
    tests' 1e-11 / 1e-9; each of the four layers and directions ran on the backend."""
    runs = []
    backend = backends.registered()[on_backend]
    real = backend.train
    monkeypatch.setattr(backend, "train", lambda *args: runs.append(args[0]) or real(*args))
    fast, ref = twin_stacks(on_backend, seed=0, **SWITCHES[model])
    x = torch.randn(9, 7, 3, dtype=torch.float64)
    assert_same(run_with_grads(fast.train(), x), run_with_grads(ref.train(), x), **tolerance(on_backend))
    assert_same_buffers(fast, ref, atol=1e-10)
    assert runs == list(fast.cells)


@pytest.mark.parametrize("on_backend", BACKENDS, indirect=True)
def test_two_layer_bidirectional_inference_with_population_statistics(on_backend):
    fast, ref = twin_stacks(on_backend, seed=1)
    x = torch.randn(10, 4, 3, dtype=torch.float64).to(fast.cells[0].weight_hh.device)
    with torch.no_grad():
        out_f, states_f = fast.eval()(x)
        out_r, states_r = ref.eval()(x)
    torch.testing.assert_close(out_f, out_r, **tolerance(on_backend))
    torch.testing.assert_close(fast.final_hidden(states_f), ref.final_hidden(states_r), **tolerance(on_backend))


def test_layer_norm_stack_on_the_aten_loop_equals_the_reference():
    fast, ref = twin_stacks("aten", seed=2, **SWITCHES["lnlstm"])
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    assert_same(run_with_grads(fast.train(), x), run_with_grads(ref.train(), x), atol=1e-11, rtol=1e-9)


def test_the_stack_is_its_layers_composed():
    """Layer 1's forward direction reads x, its reverse direction x backwards (outputs flipped
    back); layer 2 reads both concatenated; the classifier reads the last layer's final h
    of each direction (the reverse one's after reading x[0])."""
    stack = randomised_stack(3, "reference").train()  # batch statistics: the same however often it runs
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    out, states = stack(x)
    f1, r1, f2, r2 = stack.cells
    forward1, _ = f1(x)
    reverse1, _ = r1(x.flip(0))
    layer2_in = torch.cat([forward1, reverse1.flip(0)], dim=2)
    forward2, (h_f, _) = f2(layer2_in)
    reverse2, (h_r, _) = r2(layer2_in.flip(0))
    assert out.shape == (6, 4, 10) and stack.output_size == 10
    torch.testing.assert_close(out, torch.cat([forward2, reverse2.flip(0)], dim=2))
    torch.testing.assert_close(stack.final_hidden(states), torch.cat([h_f, h_r], dim=1))
    torch.testing.assert_close(stack.final_hidden(states)[:, 5:], out[0, :, 5:])  # reverse: its last is t = 0
    assert stack.labels == ["layer1", "layer1 reverse", "layer2", "layer2 reverse"]
    assert layer_labels(3, False) == ["layer1", "layer2", "layer3"]


def test_each_layer_and_direction_keeps_its_own_statistics():
    stack = trainer_stack(2, 4, max_steps=5, num_layers=2, bidirectional=True).train()
    x = torch.randn(5, 8, 2)
    x[:, :, 1] = torch.arange(5.0).view(5, 1) * 10  # the second feature rises with t: the directions differ
    stack(x)
    means = [layer.norm_x.running_mean for layer in stack.cells]
    assert all(not torch.equal(a, b) for i, a in enumerate(means) for b in means[i + 1:])
    # the reverse direction's slot t holds the step t from the end: its first slot saw x[-1]
    forward_first, reverse_first = stack.cells[0].norm_x.running_mean[0], stack.cells[1].norm_x.running_mean[0]
    wx_last = x[-1] @ stack.cells[1].weight_ih.detach().t()
    torch.testing.assert_close(reverse_first, 0.01 * wx_last.mean(0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(forward_first, reverse_first)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_in_chunks_gives_the_whole_pass_statistics(bidirectional):
    """Re-estimating population statistics in pieces of steps (MNIST, batches of 5000) folds
    the same statistics into every layer and direction as one pass, with the same final states."""
    whole = randomised_stack(4, "aten", dtype=torch.float32, bidirectional=bidirectional, max_steps=12).train()
    chunked = copy.deepcopy(whole)
    x = torch.randn(12, 6, 3)
    with torch.no_grad():
        _, states_whole = whole(x)
        states_chunked = chunked.forward_in_chunks(x, 5)
    for a, b in zip(states_whole, states_chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_same_buffers(whole, chunked, atol=1e-5)


def test_a_bidirectional_stack_refuses_a_time_offset():
    stack = trainer_stack(2, 4, max_steps=5, num_layers=1, bidirectional=True)
    with pytest.raises(ValueError, match="not with a reverse direction"):
        stack(torch.randn(3, 2, 2), t0=3)


def test_the_classifier_reads_both_directions_of_the_last_layer():
    stack = trainer_stack(1, 6, max_steps=4, num_layers=2, bidirectional=True)
    model = SequenceClassifier(stack, 10)
    assert model.classifier.in_features == 12
    assert model(torch.randn(4, 3, 1)).shape == (3, 10)


def test_norms_are_named_by_layer_and_direction():
    model = SequenceClassifier(trainer_stack(1, 4, max_steps=3, num_layers=2, bidirectional=True), 10)
    names = [name for name, _ in norms_by_term(model)]
    assert names[:4] == ["x_layer1", "h_layer1", "c_layer1", "x_layer1_reverse"]
    assert len(names) == 12 and names[-1] == "c_layer2_reverse"


def test_a_language_model_cannot_be_bidirectional():
    with pytest.raises(ConfigError, match="model.bidirectional=True is invalid: it must be false for a language model"):
        load_config({"task": {"name": "ptb", "kind": "ptb", "batch_size": 8, "seq_len": 20},
                     "model": {"bidirectional": True}})


def test_a_stacked_bidirectional_bnlstm_trains_and_resumes_only_with_its_shape(small_mnist_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = small_mnist_cfg("model=bnlstm", "model.num_layers=2", "model.bidirectional=true", "trainer.max_steps=4")
    results = train(cfg, run)
    assert results["steps"] == 4 and 0.0 <= results["test_accuracy"] <= 1.0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert {k for k in state if k.endswith("norm_h.running_var")} == {f"rnn.cells.{i}.norm_h.running_var" for i in range(4)}
    assert state["rnn.cells.2.weight_ih"].shape == (4 * 8, 2 * 8)  # layer 2 reads both directions (H 8)
    from bnrnn.errors import CheckpointError
    for change in ("model.num_layers=1", "model.bidirectional=false"):
        again = small_mnist_cfg("model=bnlstm", "model.num_layers=2", "model.bidirectional=true",
                                "trainer.max_steps=6", "trainer.resume=true", change)
        with pytest.raises(CheckpointError, match=change.split("=")[0] + " .*the checkpoint's weights have another shape"):
            train(again, run)


def test_a_stacked_language_model_streams_and_samples(small_ptb_cfg, tmp_path):
    """Two layers on PTB: each layer's state is carried from one piece of a stream to the next
    (pieces give the whole sequence's outputs), and a seeded sample from the run repeats."""
    from bnrnn.sample import sample_run

    run = tmp_path / "run"
    train(small_ptb_cfg("model=bnlstm", "model.num_layers=2", "trainer.max_steps=3", "trainer.test_at_end=false"), run)
    from bnrnn.sample import load_language_model

    model, _, _ = load_language_model(run, "last", "cpu")
    model.rnn.backend = "auto"
    tokens = torch.randint(0, 10, (30, 2))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:12])
        second, _ = model(tokens[12:], state, 12)
    assert [tuple(s.shape) for s in state] == [(2, 2, model.rnn.hidden_size)] * 2  # (h_n, c_n): two layers
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)
    assert sample_run(run, prime="ab", length=60, seed=3) == sample_run(run, prime="ab", length=60, seed=3)
