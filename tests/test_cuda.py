"""The CUDA path (run with `pytest -m gpu` on a machine with a GPU): same numbers as on CPU's reference."""

import copy

import pytest
import torch

from bnrnn.nn import LSTMLayer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("switches", [(True, True, True), (True, False, False), (False, False, False)])
def test_fused_path_on_cuda_matches_the_reference_on_cuda(switches):
    torch.manual_seed(0)
    fast = LSTMLayer(3, 32, max_steps=20, norm_x=switches[0], norm_h=switches[1], norm_c=switches[2]).cuda().train()
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    x = torch.randn(25, 16, 3, device="cuda")
    state = (torch.randn(16, 32, device="cuda"), torch.randn(16, 32, device="cuda"))
    outs = []
    for layer in (fast, ref):
        out, (h, c) = layer(x, state)
        (out.square().sum() + c.sum()).backward()
        outs.append((out, c, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in outs[1][2].items():
        torch.testing.assert_close(outs[0][2][name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


def test_cuda_bench_runs_and_passes_its_numerics_check(capsys):
    from bnrnn import bench

    assert bench.main(["--device", "cuda", "--shape", "50,3,64,32", "--repeats", "2", "--warmup", "1"]) == 0
    assert "| 50,3,64,32 | BN-LSTM |" in capsys.readouterr().out


def train_step(layer, x, state, weight):
    for p in layer.parameters():
        p.grad = None
    out, (h, c) = layer(x, state)
    ((out * weight).sum() + c.sum()).backward()
    return out, c, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def test_cuda_graph_replays_equal_step_by_step_launches(monkeypatch):
    """Graphs captured once, replayed with new weights and inputs: the same numbers as the
    kernels launched step by step (same kernels, so equal to rounding; an eager sequence
    would otherwise run on the whole-sequence kernels)."""
    from bnrnn.kernels.triton import recurrence as gpu_recurrence
    from bnrnn.kernels.triton import sequence as triton_sequence

    monkeypatch.setattr(triton_sequence, "PERSISTENT_MAX_HIDDEN", 0)

    torch.manual_seed(1)
    graphed = LSTMLayer(3, 48, max_steps=30).cuda().train()
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    gpu_recurrence._graphs.clear()
    for step in range(3):
        x = torch.randn(40, 64, 3, device="cuda")
        state = (torch.randn(64, 48, device="cuda"), torch.randn(64, 48, device="cuda"))
        weight = torch.randn(40, 64, 48, device="cuda")
        out_g, c_g, grads_g = train_step(graphed, x, state, weight)
        out_e, c_e, grads_e = train_step(eager, x, state, weight)
        torch.testing.assert_close(out_g, out_e, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(c_g, c_e, atol=1e-6, rtol=1e-6)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_g[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
        with torch.no_grad():  # different weights for the next replay
            for a, b in zip(graphed.parameters(), eager.parameters()):
                a.add_(0.01 * torch.randn_like(a))
                b.copy_(a)
    assert len(gpu_recurrence._graphs) == 1


def test_interleaved_sequences_of_one_shape_keep_their_own_saved_results(monkeypatch):
    """Two forwards of the same shape before either backward (e.g. two chunks, or a second
    model): the second replay overwrites the graph's buffers, the first backward restores its own."""
    from bnrnn.kernels.triton import sequence as triton_sequence

    monkeypatch.setattr(triton_sequence, "PERSISTENT_MAX_HIDDEN", 0)  # the eager twin on the same kernels
    torch.manual_seed(2)
    graphed = LSTMLayer(3, 32, max_steps=20).cuda().train()
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    xs = [torch.randn(20, 16, 3, device="cuda") for _ in range(2)]
    results = []
    for layer in (graphed, eager):
        outs = [layer(x)[0] for x in xs]
        (outs[0].square().sum() + 2 * outs[1].sum()).backward()
        results.append({n: p.grad for n, p in layer.named_parameters()})
    for name, grad in results[1].items():
        torch.testing.assert_close(results[0][name], grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def run_recurrence(monkeypatch, persistent: bool, inputs, switches):
    """TritonLSTMRecurrence (no graphs) on the whole-sequence kernels or the step kernels:
    outputs and every gradient."""
    from bnrnn.kernels.triton import sequence as triton_sequence
    from bnrnn.kernels.triton.recurrence import TritonLSTMRecurrence

    monkeypatch.setattr(triton_sequence, "PERSISTENT_MAX_HIDDEN", 10**9 if persistent else 0)
    xin, w, gamma_h, gamma_c, beta_c, h0, c0, weight = (t.detach().clone().requires_grad_() for t in inputs)
    _, norm_h, norm_c = switches
    args = (xin, w, gamma_h if norm_h else None, gamma_c if norm_c else None, beta_c if norm_c else None, h0, c0)
    hs, c_last = TritonLSTMRecurrence.apply(*args, (1e-5, 1e-4), {}, False)
    ((hs * weight.detach()).sum() + c_last.square().sum()).backward()
    return [hs, c_last] + [t.grad for t in args if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("switches", [(True, True, True), (True, False, True), (False, False, False)])
def test_whole_sequence_kernels_on_many_programs_equal_the_step_kernels(monkeypatch, dtype, switches):
    """The persistent kernels with the grid barrier (7-25 programs at H = 100), against the
    step kernels (which need no barrier), forward and backward."""
    from bnrnn.kernels.triton import sequence as triton_sequence

    # float64 tiles of H = 100 need more shared memory than an H100 has (the production path
    # is float32 only): a smaller layer, still over several programs.
    T, B, H = (60, 64, 100) if dtype == torch.float32 else (40, 32, 40)
    config = triton_sequence.sequence_config(T, B, H, torch.device("cuda"))
    assert config.forward_programs > 1 and config.backward_programs > 1
    g = torch.Generator(device="cuda").manual_seed(3)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, device="cuda", dtype=dtype)

    # gammas near the paper's 0.1: with gain 1 the recurrence is chaotic, and two float32
    # summation orders drift apart by 1e-4 within 60 steps.
    inputs = (rand(T, B, 4 * H), rand(4 * H, H, scale=0.1), 0.1 + rand(4 * H, scale=0.01),
              0.1 + rand(H, scale=0.01), rand(H, scale=0.1), rand(B, H), rand(B, H), rand(T, B, H))
    whole = run_recurrence(monkeypatch, True, inputs, switches)
    steps = run_recurrence(monkeypatch, False, inputs, switches)
    # The gamma and beta gradients are float32 sums over T * B = 3840 terms, added in another
    # order by each path (the grid differs with the GPU's SM count): one of gamma_c's 100
    # entries differed by 2.05e-5 on an H200 (0.068, relative 3e-4).
    tol = dict(atol=5e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-8, rtol=1e-6)
    for i, (a, b) in enumerate(zip(whole, steps)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"result {i}: {m}")


def test_whole_sequence_barrier_holds_over_32_programs(monkeypatch):
    """The smallest blocks the kernels allow (4 units: 32 programs at H = 128, each waiting on
    all others every step), repeated: every run equal to the first (a missed barrier would
    read a stale h)."""
    from bnrnn.kernels.triton import sequence as triton_sequence
    from bnrnn.kernels.triton import steps as triton_lstm

    monkeypatch.setattr(triton_sequence, "FORWARD_BLOCK_H", 4)
    T, B, H = 200, 32, 128
    config = triton_sequence.sequence_config(T, B, H, torch.device("cuda"))
    assert config.forward_programs == 32
    torch.manual_seed(4)
    xin = torch.randn(T, B, 4 * H, device="cuda")
    p = triton_lstm.Parameters(0.1 * torch.randn(4 * H, H, device="cuda"), torch.ones(4 * H, device="cuda"),
                               torch.ones(H, device="cuda"), torch.zeros(H, device="cuda"), 1e-5, 1e-5)
    h0, c0 = torch.zeros(B, H, device="cuda"), torch.zeros(B, H, device="cuda")
    first = triton_lstm.run_sequence(xin, p, h0, c0).hs
    for _ in range(20):
        torch.testing.assert_close(triton_lstm.run_sequence(xin, p, h0, c0).hs, first, atol=0, rtol=0)


def test_stacked_bidirectional_bnlstm_with_cuda_graphs_matches_the_reference():
    """Two layers, two directions, float32, each layer's training sequence captured as CUDA
    graphs and replayed on the second step (new inputs, the reverse direction's flipped):
    outputs, gradients and every layer's population statistics as the reference's."""
    from bnrnn import BNLSTM

    torch.manual_seed(0)
    fast = BNLSTM(3, 32, num_layers=2, bidirectional=True, max_steps=20, learn_initial_state=True).cuda().train()
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    for step in range(2):
        x = torch.randn(25, 16, 3, device="cuda")
        results = []
        for stack in (fast, ref):
            stack.zero_grad()
            out, states = stack(x)
            (out.square().sum() + states[1].sum()).backward()
            results.append((out, {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
        for name, grad in results[1][1].items():
            torch.testing.assert_close(results[0][1][name], grad, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_lnlstm_on_cuda_matches_the_reference_on_cuda():
    """The layer-normalised LSTM's aten loop with CUDA tensors, float64: outputs and gradients."""
    torch.manual_seed(0)
    fast = LSTMLayer(3, 32, max_steps=20, norm="layer", gamma_init=1.0).cuda().double().train()
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    x = torch.randn(25, 16, 3, device="cuda", dtype=torch.float64)
    results = []
    for layer in (fast, ref):
        out, (_, c) = layer(x)
        (out.square().sum() + c.sum()).backward()
        results.append((out, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-10, rtol=1e-8)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name}: {m}")
