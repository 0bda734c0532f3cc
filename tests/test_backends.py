"""The CPU backends against the paper's reference (bnrnn.nn.reference) on the same layer.

Two layers with identical parameters and buffers, one on a fast backend and one on
``backend="reference"``,
must give the same outputs, final state, gradients (inputs, weights, gammas, betas, initial
state) and population statistics, in every statistics mode and beyond T_max. Every test runs
on both CPU backends: ``cpu``, the compiled loops (bnrnn.kernels.cpu.recurrence), and ``aten``
(bnrnn.nn.aten_recurrence).
"""

import copy

import pytest
import torch

from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.kernels.cpu import recurrence as cpu_recurrence
from bnrnn.nn import LSTMLayer, recurrent_product
from bnrnn.nn.norms import Statistics
from conftest import require_compiled_cpu_loop

# Whether twin_layers' fast layer uses the compiled loop (set by the cpu_loop fixture).
USE_COMPILED = {"value": True}


@pytest.fixture(params=["compiled", "aten"], autouse=True)
def cpu_loop(request, monkeypatch):
    """Runs the test on one CPU loop; yields the list of compiled-loop calls (a spy), and
    checks afterwards that the ATen variant never ran the compiled loop."""
    compiled = request.param == "compiled"
    if compiled:
        require_compiled_cpu_loop()
    calls = []
    for name in ("run_forward", "population_forward"):  # batch statistics; population statistics
        real = getattr(cpu_recurrence, name)

        def spy(*args, real=real, name=name, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_recurrence, name, spy)
    monkeypatch.setitem(USE_COMPILED, "value", compiled)
    yield calls if compiled else None
    if not compiled:
        assert not calls, "the ATen variant ran the compiled loop"


def expect_compiled(cpu_loop, loop="run_forward"):
    """In the compiled variant, the forward ran on the compiled loop: ``run_forward`` (batch
    statistics) or ``population_forward``."""
    if cpu_loop is not None:
        assert loop in cpu_loop, f"the compiled {loop} did not run"

SWITCHES = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, False, False)]
SWITCH_IDS = ["bnlstm", "norm_x", "norm_h", "norm_c", "vanilla"]


def twin_layers(switches, dtype, randomised: bool, seed: int = 0, max_steps: int = 6, I: int = 3, H: int = 5):
    """(fast layer, reference layer) with equal parameters and buffers."""
    torch.manual_seed(seed)
    fast = LSTMLayer(I, H, max_steps=max_steps, norm_x=switches[0], norm_h=switches[1], norm_c=switches[2],
                  backend="cpu" if USE_COMPILED["value"] else "aten")
    fast = fast.to(dtype)
    if randomised:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in fast.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
            for bn in fast.norms():
                bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g, dtype=dtype))
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=dtype))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g, dtype=dtype))
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    return fast, ref


def run_with_grads(layer, x, state=None, t0=0):
    """Forward, then backward of a fixed random projection of (outputs, h_T, c_T).

    Returns outputs, (h_T, c_T) and a dict of every gradient by name.
    """
    x = x.clone().requires_grad_()
    if state is not None:
        state = tuple(s.clone().requires_grad_() for s in state)
    out, (h, c) = layer(x, state, t0)
    g = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    w_c = torch.randn(c.shape, generator=g, dtype=c.dtype).to(c.device)
    w_h = torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)
    ((out * w_out).sum() + (c * w_c).sum() + (h * w_h).sum()).backward()
    grads = {"x": x.grad}
    if state is not None:
        grads["h0"], grads["c0"] = state[0].grad, state[1].grad
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out, (h, c), grads


def assert_same_results(run_f, run_r, **tol):
    """Two run_with_grads results agree: outputs, h_T, c_T and every gradient (None alike)."""
    (out_f, (h_f, c_f), grads_f), (out_r, (h_r, c_r), grads_r) = run_f, run_r
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(h_f, h_r, **tol)
    torch.testing.assert_close(c_f, c_r, **tol)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert (grads_f[name] is None) == (grads_r[name] is None), name
        if grads_r[name] is not None:
            torch.testing.assert_close(grads_f[name], grads_r[name], **tol, msg=lambda m: f"grad {name}: {m}")


def assert_float32_results(run_f, run_r):
    """Two float32 run_with_grads results agree within 1e-5: outputs, c_T, and every gradient
    relative to its largest entry (at least 1), since the gradients' scales differ widely."""
    (out_f, (_, c_f), grads_f), (out_r, (_, c_r), grads_r) = run_f, run_r
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_f, c_r, atol=1e-5, rtol=1e-5)
    for name in grads_r:
        if grads_r[name] is not None:
            scale = grads_r[name].abs().max().clamp(min=1.0)
            torch.testing.assert_close(grads_f[name] / scale, grads_r[name] / scale, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"grad {name}: {m}")


def assert_same_buffers(fast, ref, atol):
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("I", [3, 12], ids=["narrow_input", "wide_input"])
def test_training_float64_randomised_parameters(switches, I, cpu_loop):
    """Every parameter and statistic away from 0 and 1, T > T_max, a carried-in state; an
    input narrow enough for the compiled loop to never form W_x x (its statistics from x's
    covariance), and a wider one that it projects once (cpu_recurrence.NARROW_INPUT_MAX)."""
    fast, ref = twin_layers(switches, torch.float64, randomised=True, I=I)
    x = torch.randn(9, 7, I, dtype=torch.float64)  # 9 steps, T_max 6
    state = (torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64))
    run_f = run_with_grads(fast.train(), x, state)
    run_r = run_with_grads(ref.train(), x, state)
    assert_same_results(run_f, run_r, atol=1e-11, rtol=1e-9)
    assert_same_buffers(fast, ref, atol=1e-12)
    expect_compiled(cpu_loop)


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
def test_training_float32_paper_initialisation(switches, cpu_loop):
    """The production setting: float32, the paper's initialisation, learned h0 with noise."""
    fast, ref = twin_layers(switches, torch.float32, randomised=False, max_steps=20, I=4, H=16)
    fast.h0_noise = ref.h0_noise = 0.1
    x = torch.randn(30, 32, 4)  # T = 30 > T_max = 20
    torch.manual_seed(5)
    run_f = run_with_grads(fast.train(), x)
    torch.manual_seed(5)  # the same h0 noise
    run_r = run_with_grads(ref.train(), x)
    assert_float32_results(run_f, run_r)
    assert_same_buffers(fast, ref, atol=1e-6)
    expect_compiled(cpu_loop)
    if switches != (False, False, False):
        # Steps beyond T_max are normalised but fold into no population slot.
        for bn in fast.norms():
            assert bn.num_batches_tracked.tolist() == [1] * 20


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_with_population_statistics_folded(switches, dtype, cpu_loop):
    """No-grad evaluation folds x and h normalisation into the weights; same outputs, buffers untouched."""
    fast, ref = twin_layers(switches, dtype, randomised=True, seed=3)
    x = torch.randn(10, 4, 3, dtype=dtype)  # 10 steps, T_max 6: the last slot is reused
    before = copy.deepcopy(fast.state_dict())
    with torch.no_grad():
        out_f, (h_f, c_f) = fast.eval()(x, None, 2)
        out_r, (h_r, c_r) = ref.eval()(x, None, 2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(c_f, c_r, **tol)
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    # vanilla too: without a gradient its inference keeps nothing per step for a backward
    # (at seqMNIST's eval batch of 1000, 3x faster than the training loop)
    expect_compiled(cpu_loop, "population_forward")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eval_with_batch_statistics_mode(grad):
    """Fig. 3b's batch-statistics arm: batch statistics in eval mode, population untouched."""
    fast, ref = twin_layers((True, True, True), torch.float64, randomised=True, seed=4)
    x = torch.randn(8, 6, 3, dtype=torch.float64)
    before = copy.deepcopy(fast.state_dict())
    with torch.set_grad_enabled(grad):
        out_f, _ = fast.eval()(x, stats=Statistics.BATCH)
        out_r, _ = ref.eval()(x, stats=Statistics.BATCH)
        expected_train, _ = copy.deepcopy(ref).train()(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_f, expected_train, atol=1e-12, rtol=1e-10)
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_gradients_through_population_statistics_in_eval_mode():
    """Analysis in eval mode with autograd on (e.g. gradient flow): same gradients as the reference."""
    fast, ref = twin_layers((True, True, True), torch.float64, randomised=True, seed=6)
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    out_f, _, grads_f = run_with_grads(fast.eval(), x)
    out_r, _, grads_r = run_with_grads(ref.eval(), x)
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-10)
    for name in grads_r:
        if grads_r[name] is not None:
            torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-12, rtol=1e-10)


def test_mixed_statistics_modes_fall_back_to_the_reference():
    """One norm in training mode, the others in eval: still the reference's function."""
    fast, ref = twin_layers((True, True, True), torch.float64, randomised=True, seed=7)
    for layer in (fast, ref):
        layer.eval()
        layer.norm_h.train()
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        out_f, _ = fast(x)
        out_r, _ = ref(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-10)
    assert_same_buffers(fast, ref, atol=1e-12)


def test_training_forward_without_grad_updates_population_like_the_reference(cpu_loop):
    """A no-grad forward in training mode (population re-estimation) skips the autograd Function."""
    fast, ref = twin_layers((True, True, True), torch.float32, randomised=False, seed=8, max_steps=5)
    x = torch.randn(7, 16, 3)
    with torch.no_grad():
        out_f, _ = fast.train()(x)
        out_r, _ = ref.train()(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    assert_same_buffers(fast, ref, atol=1e-6)
    expect_compiled(cpu_loop)


def test_fused_gradcheck_float64(cpu_loop):
    """The hand-derived backward against finite differences, with a carried-in state."""
    fast, _ = twin_layers((True, True, True), torch.float64, randomised=True, seed=9, max_steps=3, I=2, H=3)
    fast.train()
    x = torch.randn(5, 4, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = list(fast.parameters())

    def fn(x, h0, c0, *ps):
        out, (h, c) = fast(x, (h0, c0))
        return out, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-6)
    expect_compiled(cpu_loop)


def test_pooled_buffers_give_the_same_gradients_step_after_step(cpu_loop):
    """At a size where the (T, B, 4H) buffers come from the workspace pool (over 1 MB: the
    forward's saved buffers, and the backward's per-step gradients stacked over time), three
    training steps in a row on different inputs each match the reference, with every earlier
    step's outputs and gradients still held (the pool must not hand out a buffer in use)."""
    fast, ref = twin_layers((True, True, True), torch.float32, randomised=False, max_steps=16, I=12, H=64)
    held = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(20, 64, 12, generator=g)  # (T, B, 4H) = 1.3 MB
        # A state that differs across the batch: from the learned h0, the same for every
        # sequence, BN_h's first step has zero variance and h0's gradient is rounding noise.
        state = (torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g))
        run_f = run_with_grads(fast.train(), x, state)
        run_r = run_with_grads(ref.train(), x, state)
        assert_float32_results(run_f, run_r)
        held.append((run_f, run_r))
        fast.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    for run_f, run_r in held:  # earlier steps' results, untouched by the later ones
        assert_float32_results(run_f, run_r)
    expect_compiled(cpu_loop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
def test_large_hidden_size(switches, dtype, cpu_loop):
    """H = 256: in float32 the recurrent products go through W_h packed (for oneDNN,
    recurrent_product.PACKED_MIN_HIDDEN, or in the compiled loop for its own AVX-512 kernel where the CPU
    has one; float64 stays on mm), and in the compiled loop dW_h is one GEMM per chunk of steps
    (cpu_recurrence.CHUNKED_WEIGHT_GRAD_MIN_HIDDEN): training and folded inference
    against the reference."""
    fast, ref = twin_layers(switches, dtype, randomised=False, max_steps=4, I=12, H=256)
    packed = recurrent_product.packed_weight(fast.weight_hh, 8) is not None
    assert packed == (dtype == torch.float32)  # the paths under test
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 12, generator=g, dtype=dtype)
    state = (torch.randn(8, 256, generator=g, dtype=dtype), torch.randn(8, 256, generator=g, dtype=dtype))
    run_f, run_r = run_with_grads(fast.train(), x, state), run_with_grads(ref.train(), x, state)
    if dtype == torch.float32:
        assert_float32_results(run_f, run_r)
    else:
        assert_same_results(run_f, run_r, atol=1e-11, rtol=1e-9)
    assert_same_buffers(fast, ref, atol=1e-5 if dtype == torch.float32 else 1e-12)
    with torch.no_grad():
        out_f, _ = fast.eval()(x)
        out_r, _ = ref.eval()(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(out_f, out_r, atol=tol, rtol=tol)
    expect_compiled(cpu_loop, "population_forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [7, 20], ids=["one_part", "two_parts"])
def test_weight_gradient_in_chunks_of_steps(dtype, B, cpu_loop, restore_threads):
    """From H = 256 the compiled backward forms dW_h one chunk of WEIGHT_GRAD_CHUNK steps at
    a time from a ring of two chunks. 21 steps: a short chunk first (steps 16-20), then
    whole ones, the last one reaching h0. dW_h and the other gradients against the
    reference, on one thread and two. Float64 here calls the BLAS, whose summation order may
    change with the thread count on some CPUs: the two agree to rounding, and each is
    reproducible, bit for bit, on its own thread count (see assert_thread_counts_agree)."""
    assert 21 > 2 * cpu_recurrence.WEIGHT_GRAD_CHUNK and 21 % cpu_recurrence.WEIGHT_GRAD_CHUNK != 0
    fast, ref = twin_layers((False, True, True), dtype, randomised=dtype == torch.float64, max_steps=21, I=12,
                            H=256)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(21, B, 12, generator=g, dtype=dtype)
    state = (torch.randn(B, 256, generator=g, dtype=dtype), torch.randn(B, 256, generator=g, dtype=dtype))
    run_r = run_with_grads(ref.train(), x, state)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(run_with_grads(copy.deepcopy(fast).train(), x, state))
        if dtype == torch.float32:
            assert_float32_results(runs[-1], run_r)
        else:
            assert_same_results(runs[-1], run_r, atol=1e-11, rtol=1e-9)
        assert_same_results(run_with_grads(copy.deepcopy(fast).train(), x, state), runs[-1], atol=0, rtol=0)
    assert_thread_counts_agree(runs[1], runs[0], own_kernel=dtype == torch.float32 and cpu_extension.own_gemm())
    expect_compiled(cpu_loop)


@pytest.mark.parametrize("cpu_loop", ["compiled"], indirect=True)  # the ATen loop keeps every step's
@pytest.mark.parametrize("I, H", [(1, 5), (12, 5), (12, 256)], ids=["narrow", "wide", "halves"])
@pytest.mark.parametrize("switches", [(True, True, True), (False, True, True), (True, True, False)],
                         ids=["bnlstm", "bn_h_c", "bn_x_h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [7, 20], ids=["one_part", "two_parts"])
def test_gates_formed_again_in_the_backward(switches, I, H, dtype, B, cpu_loop, restore_threads, monkeypatch):
    """With BN_h the compiled forward keeps one step's activated gates, not T's, and the
    backward forms each step's again from W_h h_{t-1} and the input term with the maps of the
    stored statistics: the same values, so every output and gradient equals, bit for bit,
    those of the run that keeps every step's gates (on the same thread count: one and two),
    with the batch in one part (7 rows) or two. (A narrow input without BN_x keeps them all:
    its bias does not reach the backward.)"""
    narrow_without_bn_x = I <= cpu_recurrence.NARROW_INPUT_MAX and not switches[0]
    fast, _ = twin_layers(switches, dtype, randomised=True, max_steps=7, I=I, H=H)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, B, I, generator=g, dtype=dtype)  # T > max_steps: the last statistics reused
    kept = []
    real = cpu_recurrence.keeps_one_gate_step

    def spy(*args):
        kept.append(real(*args))
        return kept[-1]

    for threads in (1, 2):
        torch.set_num_threads(threads)
        monkeypatch.setattr(cpu_recurrence, "keeps_one_gate_step", spy)
        one_step = run_with_grads(copy.deepcopy(fast).train(), x)
        monkeypatch.setattr(cpu_recurrence, "keeps_one_gate_step", lambda *args: False)
        every_step = run_with_grads(copy.deepcopy(fast).train(), x)
        assert_same_results(one_step, every_step, atol=0, rtol=0)
    assert kept == [not narrow_without_bn_x] * 2
    expect_compiled(cpu_loop)


def assert_thread_counts_agree(run, first, own_kernel: bool) -> None:
    """Results on two thread counts: bit-identical where the compiled loops' own code does every
    sum (the partition of the batch and of the products does not depend on the thread count,
    and the parts combine in a fixed order; the GEMMs are the extension's own AVX-512 kernel);
    otherwise equal to rounding. A BLAS (MKL, oneDNN) may sum in another order when called with
    another thread count: on an Intel Xeon with AVX-512, float64 grad x once differed by 1.8e-13
    in 1,629 of 1,764 values between one thread and two. The ATen loop spreads its GEMMs over
    the library's threads, so there too only rounding is promised."""
    if own_kernel and USE_COMPILED["value"]:
        assert_same_results(run, first, atol=0, rtol=0)
    elif run[0].dtype == torch.float64:
        assert_same_results(run, first, atol=1e-12, rtol=1e-10)
    else:
        assert_float32_results(run, first)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
@pytest.mark.parametrize("B", [7, 20], ids=["one_part", "two_parts"])
@pytest.mark.parametrize("gemm", ["own", "onednn"])
@pytest.mark.parametrize("H", [256, 257], ids=["even", "odd"])
def test_packed_halves_on_one_two_and_three_threads(switches, B, gemm, H, cpu_loop, restore_threads, limit_gemm):
    """Float32 from H = 256: the recurrent products come in halves, one per thread,
    the threads meeting before and after each (with one part of the rows too: the thread
    without rows then takes the backward's weight GEMMs). Each half is the extension's own
    AVX-512 kernel on its packed half of W_h (where the CPU has AVX-512), or, with
    the GEMM limited to the BLAS or without AVX-512, oneDNN's GEMM on W_h (forward) and W_h^T
    (backward) packed as two row halves. Every thread count gives the reference's results
    within float32 tolerance (training, and inference with population statistics), and the
    others' values: bit for bit with the own kernel (each half is the same single-threaded
    code wherever it runs), to rounding with oneDNN's (a library's order of summation may
    follow the thread count; the ATen loop's whole-weight GEMMs spread over oneDNN's threads). An
    odd H: halves of unequal widths (oneDNN's second half of the backward's dL/dh once
    landed one column early, and dW went wrong by 0.5)."""
    if gemm == "onednn":
        limit_gemm("blas")
    elif not USE_COMPILED["value"]:
        pytest.skip("the aten backend has no own kernel")
    elif not cpu_extension.own_gemm():
        pytest.skip("the own GEMM kernel needs a CPU with AVX-512")
    fast, ref = twin_layers(switches, torch.float32, randomised=False, I=12, H=H)
    if gemm == "onednn":  # the path under test
        assert len(cpu_recurrence.recurrent_weight_halves(fast.weight_hh, B)) == 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, B, 12, generator=g)
    state = (torch.randn(B, H, generator=g), torch.randn(B, H, generator=g))
    run_r = run_with_grads(ref.train(), x, state)
    with torch.no_grad():
        eval_r, _ = copy.deepcopy(ref).double().eval()(x.double(), tuple(s.double() for s in state))
    runs, evals = [], []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        layer = copy.deepcopy(fast)
        runs.append(run_with_grads(layer.train(), x, state))
        assert_float32_results(runs[-1], run_r)
        with torch.no_grad():
            evals.append(layer.eval()(x, state)[0])
        torch.testing.assert_close(evals[-1].double(), eval_r, atol=1e-5, rtol=1e-5)
    for run, out in zip(runs[1:], evals[1:]):
        assert_thread_counts_agree(run, runs[0], own_kernel=gemm == "own")
        if gemm == "own" and USE_COMPILED["value"]:
            assert torch.equal(out, evals[0])
        else:
            torch.testing.assert_close(out, evals[0], atol=1e-5, rtol=1e-5)
    expect_compiled(cpu_loop)


@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
@pytest.mark.parametrize("I, H", [(3, 5), (12, 5), (12, 256)], ids=["narrow", "wide", "wide_large_hidden"])
@pytest.mark.parametrize("B", [7, 20], ids=["one_part", "two_parts"])
@pytest.mark.parametrize("blas", ["direct", "aten"])
def test_same_results_on_one_two_and_three_threads(switches, I, H, B, blas, cpu_loop, restore_threads, limit_gemm):
    """The compiled loops split a batch of 16 rows or more in two parts, one per thread (a
    team of three leaves one idle; BATCH_PARTS in the C++ source); with one part (below 16
    rows) the backward runs a step's loops beside the previous step's weight-gradient GEMMs,
    split over the other threads (``beside``). (Float64: W_h is never packed here; see
    test_packed_halves_on_one_two_and_three_threads.) On one thread all of it runs one after the other. Every thread count gives
    the reference's results (float64, training and inference with population statistics),
    and the same as the others; with the GEMMs called on the BLAS directly, and through
    ATen (limit_gemm("aten"))."""
    if blas == "aten":
        limit_gemm("aten")
    fast, ref = twin_layers(switches, torch.float64, randomised=True, I=I, H=H)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, B, I, generator=g, dtype=torch.float64)
    state = (torch.randn(B, H, generator=g, dtype=torch.float64), torch.randn(B, H, generator=g, dtype=torch.float64))
    run_r = run_with_grads(ref.train(), x, state)
    with torch.no_grad():
        eval_r, _ = ref.eval()(x, state)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        layer = copy.deepcopy(fast)
        runs.append(run_with_grads(layer.train(), x, state))
        assert_same_results(runs[-1], run_r, atol=1e-11, rtol=1e-9)
        with torch.no_grad():  # inference with population statistics, in parts too
            eval_f, _ = layer.eval()(x, state)
        torch.testing.assert_close(eval_f, eval_r, atol=1e-11, rtol=1e-9)
    for run in runs[1:]:
        assert_same_results(run, runs[0], atol=1e-11, rtol=1e-9)
    expect_compiled(cpu_loop)
