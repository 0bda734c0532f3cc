"""The GPU fast path (Triton step kernels, bnrnn.kernels.triton.steps) against the reference path.

On a machine without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), so CI checks the kernels' arithmetic, masking and the hand-derived
backward; with a GPU the same tests run the compiled kernels (CUDA graphs are covered in
tests/test_cuda.py).
"""

import warnings

import pytest
import torch

from bnrnn.kernels.triton import sequence as triton_sequence
from bnrnn.kernels.triton import steps as triton_lstm
from bnrnn.kernels.triton.recurrence import TritonLSTMRecurrence
from test_backends import (SWITCH_IDS, SWITCHES, assert_float32_results, assert_same_buffers, assert_same_results,
                        run_with_grads, twin_layers)

pytestmark = pytest.mark.skipif(triton_lstm.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


PATHS = ["persistent", "fused_gemm", "cublas_gemm"]


def route(monkeypatch, path: str) -> None:
    """Run the recurrence on one of the Triton paths: the whole-sequence (persistent)
    kernels, or the step kernels with the recurrent product inside them or as a GEMM per step."""
    monkeypatch.setattr(triton_sequence, "PERSISTENT_MAX_HIDDEN", 10**9 if path == "persistent" else 0)
    monkeypatch.setattr(triton_lstm, "FUSE_GEMM_MAX_BATCH", 10**9 if path == "fused_gemm" else 0)


@pytest.fixture(params=PATHS)
def triton_path(request, monkeypatch):
    """Route every fast-path batch-statistics forward (any device, dtype) through the Triton
    kernels (see :func:`route`); counts how many sequences took the path."""
    calls = []
    runners = {"whole": triton_sequence.run_forward, "steps": triton_lstm.forward_steps}

    def spy(kind: str):
        def counted(*args, **kwargs):
            calls.append(kind)
            return runners[kind](*args, **kwargs)
        return counted

    monkeypatch.setattr(triton_lstm, "available", lambda x: True)
    monkeypatch.setattr(triton_sequence, "run_forward", spy("whole"))
    monkeypatch.setattr(triton_lstm, "forward_steps", spy("steps"))
    route(monkeypatch, request.param)
    expected = "whole" if request.param == "persistent" else "steps"
    yield calls
    assert set(calls) <= {expected}, f"the {request.param} path ran {set(calls)}"


def on_device(fast, ref):
    fast.backend = "triton"
    fast.to(DEVICE).cuda_graphs = False  # graphs: tests/test_cuda.py
    return fast, ref.to(DEVICE)


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
def test_training_float64_randomised_parameters(triton_path, switches):
    """Every parameter and statistic away from 0 and 1, T > T_max, a carried-in state, a batch
    and hidden size that fill no block (7 rows of 8, 5 units of 8)."""
    fast, ref = on_device(*twin_layers(switches, torch.float64, randomised=True))
    x = torch.randn(9, 7, 3, dtype=torch.float64, device=DEVICE)
    state = tuple(torch.randn(7, 5, dtype=torch.float64, device=DEVICE) for _ in range(2))
    run_f = run_with_grads(fast.train(), x, state)
    run_r = run_with_grads(ref.train(), x, state)
    assert len(triton_path) == 1
    # A GPU's float64 reductions run in another order than the reference's, and BN_h's backward
    # (gain gamma/sigma over a batch of 7) amplifies that to ~1e-9 over 9 steps (H100).
    tight = dict(atol=1e-11, rtol=1e-9) if DEVICE == "cpu" else dict(atol=1e-8, rtol=1e-6)
    assert_same_results(run_f, run_r, **tight)
    assert_same_buffers(fast, ref, atol=1e-10)


@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
def test_training_float32_paper_initialisation_several_programs(triton_path, switches):
    """float32, the paper's initialisation, 100 rows (a block of 128) and 40 units over several
    programs (the last one part-filled)."""
    fast, ref = on_device(*twin_layers(switches, torch.float32, randomised=False, max_steps=20, I=4, H=40))
    config = triton_lstm.launch_config(100, 40)
    assert config.block_b == 128 and config.grid[0] * config.block_h >= 40 and config.grid[0] >= 3
    x = torch.randn(24, 100, 4, device=DEVICE)
    state = tuple(0.5 * torch.randn(100, 40, device=DEVICE) for _ in range(2))
    run_f = run_with_grads(fast.train(), x, state)
    run_r = run_with_grads(ref.train(), x, state)
    assert len(triton_path) == 1
    assert_float32_results(run_f, run_r)
    assert_same_buffers(fast, ref, atol=1e-6)


def test_no_grad_training_forward_and_batch_statistics_eval(triton_path):
    """Population re-estimation (no-grad training forward) and Fig. 3b's batch-statistics
    evaluation take the kernels too; same outputs and population as the reference."""
    from bnrnn.nn.norms import Statistics

    fast, ref = on_device(*twin_layers((True, True, True), torch.float64, randomised=True, seed=4))
    x = torch.randn(8, 6, 3, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast.train()(x)[0], ref.train()(x)[0], atol=1e-10, rtol=1e-8)
        assert_same_buffers(fast, ref, atol=1e-10)
        torch.testing.assert_close(fast.eval()(x, stats=Statistics.BATCH)[0], ref.eval()(x, stats=Statistics.BATCH)[0],
                                   atol=1e-10, rtol=1e-8)
    assert len(triton_path) == 2
    assert_same_buffers(fast, ref, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(monkeypatch, path):
    """The kernels' hand-derived backward against finite differences, every input."""
    route(monkeypatch, path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    T, B, H = 4, 5, 3
    inputs = (rand(T, B, 4 * H), rand(4 * H, H) * 0.5, rand(4 * H), rand(H), rand(H), rand(B, H), rand(B, H))
    inputs = tuple(t.detach().requires_grad_() for t in inputs)

    def fn(xin, w, gamma_h, gamma_c, beta_c, h0, c0):
        hs, c_last = TritonLSTMRecurrence.apply(xin, w, gamma_h, gamma_c, beta_c, h0, c0, (1e-5, 1e-5), {}, False)
        return hs, c_last

    # fast mode: checks random projections of the Jacobian (a full check takes a minute interpreted)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("switches", SWITCHES[:-1], ids=SWITCH_IDS[:-1])  # vanilla has no statistics
def test_population_inference_runs_in_one_launch(monkeypatch, switches):
    """Evaluation with population statistics on the whole-sequence inference kernel: the
    reference's outputs and final state, with T > T_max (the last step's statistics reused)
    and a chunk starting at t0 > 0."""
    calls = []
    run_inference = triton_sequence.run_inference

    def counted(*args, **kwargs):
        calls.append(1)
        return run_inference(*args, **kwargs)

    monkeypatch.setattr(triton_lstm, "available", lambda x: True)
    monkeypatch.setattr(triton_sequence, "run_inference", counted)
    route(monkeypatch, "persistent")
    fast, ref = on_device(*twin_layers(switches, torch.float64, randomised=True, seed=7))
    x = torch.randn(9, 7, 3, dtype=torch.float64, device=DEVICE)
    state = tuple(torch.randn(7, 5, dtype=torch.float64, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        for t0 in (0, 4):
            out_f, (h_f, c_f) = fast.eval()(x, state, t0)
            out_r, (h_r, c_r) = ref.eval()(x, state, t0)
            torch.testing.assert_close(out_f, out_r, atol=1e-11, rtol=1e-9)
            torch.testing.assert_close(c_f, c_r, atol=1e-11, rtol=1e-9)
    assert len(calls) == 2


def test_the_path_is_only_taken_where_it_can_run():
    cpu = torch.zeros(3, 4, 2)
    assert not triton_lstm.available(cpu)
    if torch.cuda.is_available():
        assert triton_lstm.available(cpu.cuda())
        assert not triton_lstm.available(cpu.cuda().double())
        assert not triton_lstm.available(torch.zeros(3, triton_lstm.MAX_BATCH + 1, 2, device="cuda"))
        with torch.autocast("cuda"):
            assert not triton_lstm.available(cpu.cuda())


@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
def test_whole_sequence_backward_never_reads_unwritten_gradients(monkeypatch, switches):
    """The whole-sequence backward's first step (t = T-1) has no step t+1; the gradient
    buffers it would read there are not written yet. Poisoned with inf, they must not reach
    any arithmetic: the gradients match the reference, and no product meets an inf (in the
    interpreter numpy warns "invalid value encountered in matmul" for inf * 0)."""
    route(monkeypatch, "persistent")
    monkeypatch.setattr(triton_lstm, "available", lambda x: True)
    real = triton_sequence.run_backward
    calls = []

    def poisoned(grad_hs, grad_c_last, p, c0, saved, d_pre, d_wh, *rest):
        calls.append(1)
        d_pre.fill_(float("inf"))
        d_wh.fill_(float("inf"))
        return real(grad_hs, grad_c_last, p, c0, saved, d_pre, d_wh, *rest)

    monkeypatch.setattr(triton_sequence, "run_backward", poisoned)
    fast, ref = on_device(*twin_layers(switches, torch.float64, randomised=True, seed=2))
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_f = run_with_grads(fast.train(), x.to(DEVICE))
    assert calls == [1]
    tight = dict(atol=1e-11, rtol=1e-9) if DEVICE == "cpu" else dict(atol=1e-8, rtol=1e-6)  # see above
    assert_same_results(run_f, run_with_grads(ref.train(), x.to(DEVICE)), **tight)


def test_a_training_sequence_frees_its_buffers_without_the_cycle_collector(monkeypatch):
    """Once a step's graph is gone its saved buffers are freed at once (reference counting),
    not when Python's cycle collector next runs: the Function once held its output hs in a
    ctx attribute (hs -> grad_fn -> ctx -> hs), and a 2-layer bidirectional stack's steps
    piled up until an H200 ran out of memory."""
    import gc
    import weakref

    from bnrnn.nn import LSTMLayer

    kept = []
    real = triton_lstm.run_sequence

    def spy(*args, **kwargs):
        saved = real(*args, **kwargs)
        kept.extend(weakref.ref(t) for t in saved.tensors())
        return saved

    monkeypatch.setattr(triton_lstm, "available", lambda x: True)
    monkeypatch.setattr(triton_lstm, "run_sequence", spy)
    layer = LSTMLayer(3, 5, max_steps=6, backend="triton", cuda_graphs=False).to(DEVICE).train()
    gc.collect()
    gc.disable()
    try:
        out, (h, c) = layer(torch.randn(6, 4, 3, device=DEVICE))
        (out.sum() + c.sum()).backward()
        del out, h, c
        assert kept and all(ref() is None for ref in kept), "a sequence's buffers outlived its graph"
    finally:
        gc.enable()


def test_the_backward_of_a_batch_of_100_takes_the_step_kernels():
    """seqMNIST's preset batch (100, block 128) with H = 100: the whole-sequence forward, but the
    backward's tiles would need more shared memory than an H200 has (294,912 bytes)."""
    assert triton_sequence.sequence_config(784, 100, 100, torch.device(DEVICE)) is not None
    assert triton_sequence.sequence_config(784, 100, 100, torch.device(DEVICE), backward=True) is None
    assert triton_sequence.sequence_config(784, 64, 100, torch.device(DEVICE), backward=True) is not None
