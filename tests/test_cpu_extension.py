"""The compiled CPU loops (bnrnn/kernels/cpu/csrc/recurrence_cpu.cpp) and the buffer pool they use.

Their equivalence with the reference layer is in test_backends.py (every test there runs on
both CPU backends); here: the float activations' accuracy, results independent of the thread count,
the pool's reuse rules, and the fallback when the extension cannot be built.
"""

import copy
import warnings

import pytest
import torch

from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.nn import LSTMLayer, backends, workspace
from conftest import require_compiled_cpu_loop


@pytest.fixture(scope="module")
def compiled():
    require_compiled_cpu_loop()
    return torch.ops.bnrnn_cpu


def test_float_activations_match_libm(compiled):
    """The polynomial sigmoid and tanh of the float32 loops, over the whole useful range and
    beyond, against float64 libm: within 3e-7 absolute, and 4e-7 relative for sigmoid."""
    x = torch.cat([torch.linspace(-100, 100, 400_001), torch.linspace(-1e-3, 1e-3, 2001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.625, -0.625, 88.0, -88.0, 1e4, -1e4])])
    sig, tanh = compiled.activations(x)
    exact = x.double()
    torch.testing.assert_close(sig.double(), torch.sigmoid(exact), atol=3e-7, rtol=4e-7)
    torch.testing.assert_close(tanh.double(), torch.tanh(exact), atol=3e-7, rtol=0)
    # tanh is odd and in [-1, 1]; sigmoid in [0, 1]
    assert torch.equal(tanh[:200_000], -tanh[200_001:400_001].flip(0))
    assert tanh.abs().max() <= 1 and sig.min() >= 0 and sig.max() <= 1
    # small arguments keep their relative precision (the polynomial branch)
    small = x.abs() < 0.5
    small &= x != 0
    assert ((tanh[small].double() - torch.tanh(exact[small])).abs() / exact[small].abs()).max() < 3e-7


def test_float_activations_propagate_nan_and_saturate_at_infinity(compiled):
    """A NaN stays NaN (divergence detection sees it); +-inf saturate like libm."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf")])
    sig, tanh = compiled.activations(x)
    assert sig[0].isnan() and tanh[0].isnan()
    assert sig[1:].tolist() == [1.0, pytest.approx(0.0, abs=1e-37)]
    assert tanh[1:].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False)], ids=["bnlstm", "vanilla"])
def test_results_do_not_depend_on_the_thread_count(compiled, switches):
    """One intra-op thread or two (the forward's two parts of the batch on one thread or
    two, the backward's weight-gradient GEMMs after its loops or beside them): the same
    outputs, gradients and population statistics. Bit-identical where the extension's own
    GEMM kernel runs (float32 with AVX-512): every sum is then the loops' own, in an order
    that does not follow the thread count. Elsewhere the BLAS's GEMMs may sum in another
    order on another thread count (seen on an Intel Xeon with AVX-512), so the two agree to
    rounding; each thread count on its own reproduces bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(12, 37, 3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            torch.manual_seed(1)
            layer = LSTMLayer(3, 21, max_steps=8, norm_x=switches[0], norm_h=switches[1], norm_c=switches[2], h0_noise=0.1)
            out, (h, c) = layer(x)
            (out.square().sum() + c.sum()).backward()
            results.append([out, c, *(p.grad for p in layer.parameters()), *layer.buffers()])
    finally:
        torch.set_num_threads(threads)
    for two, again in zip(results[1], results[2]):
        assert torch.equal(two, again)
    exact = cpu_extension.own_gemm()
    for one, two in zip(results[0], results[1]):
        if exact or not one.is_floating_point():
            assert torch.equal(one, two)
        else:
            torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-5)


def test_outputs_held_across_steps_are_not_overwritten(compiled):
    """The pool reuses a buffer only once nothing refers to it: outputs kept from one step
    (and tensors autograd saved) stay intact through the next steps."""
    torch.manual_seed(0)
    layer = LSTMLayer(2, 50, max_steps=300)
    x = torch.randn(300, 8, 2)  # (T, B, 4H) = 1.9 MB: pooled
    first, _ = layer(x)
    kept = first.detach().clone()
    for _ in range(3):
        out, _ = layer(torch.randn_like(x))
        out.sum().backward()
        assert out.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)


def test_pool_reuses_free_buffers_and_allocates_for_busy_ones():
    pool = workspace.Workspace()
    like = torch.empty(0)
    shape = (4, 256, 512)  # 2 MB
    a = pool.empty(shape, like)
    a_ptr = a.data_ptr()
    b = pool.empty(shape, like)
    assert b.data_ptr() != a_ptr  # a is still referenced
    view = a[1:]  # a view keeps the storage busy too
    del a
    c = pool.empty(shape, like)
    assert c.data_ptr() not in (a_ptr, b.data_ptr())
    del view, c
    d = pool.empty(shape, like)
    assert d.data_ptr() == a_ptr  # free again: reused
    assert d.shape == shape and d.is_contiguous()
    assert pool.kept_bytes() == 3 * 4 * 256 * 512 * 4
    small = pool.empty((10,), like)  # under MIN_POOLED_BYTES: a plain allocation
    assert pool.kept_bytes() == 3 * 4 * 256 * 512 * 4 and small.numel() == 10


def test_pool_serves_any_shape_from_a_free_buffer_large_enough():
    """Variable-length batches ask for a new shape at almost every call: the pool answers from
    the smallest free buffer that holds the request and keeps no more than it used at once."""
    pool = workspace.Workspace()
    like = torch.empty(0)
    for steps in range(200, 100, -3):  # shapes that never repeat, each freed before the next
        t = pool.empty((steps, 32, 256), like)
        assert t.shape == (steps, 32, 256) and t.is_contiguous()
        del t
    assert pool.kept_bytes() == 200 * 32 * 256 * 4  # the first (largest) buffer, reused for every other
    busy = pool.empty((150, 32, 256), like)
    other = pool.empty((150, 32, 256), like)
    assert other.data_ptr() != busy.data_ptr() and pool.kept_bytes() == (200 + 150) * 32 * 256 * 4


def test_pool_stays_within_its_bound(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_KEPT_BYTES", 3 * (1 << 20))
    pool = workspace.Workspace()
    held = [pool.empty((1 << 18,), torch.empty(0)) for _ in range(5)]  # 1 MB each, all busy
    assert pool.kept_bytes() == 3 * (1 << 20)
    assert len({t.data_ptr() for t in held}) == len(held)
    del held
    big = pool.empty((3 << 18,), torch.empty(0))  # 3 MB: the idle 1 MB buffers make room
    assert pool.kept_bytes() == 3 * (1 << 20) and big.numel() == 3 << 18


def test_pooled_buffers_are_aligned_for_huge_pages():
    t = workspace.mapped_empty((3, 1000, 1000), torch.float32)
    assert t.data_ptr() % workspace.HUGE_PAGE == 0
    t.fill_(2.0)
    assert t.sum().item() == 6e6


@pytest.fixture
def untried_extension(monkeypatch):
    """cpu_extension as before its first load (restored afterwards)."""
    monkeypatch.setattr(cpu_extension, "_loaded", None)
    monkeypatch.setattr(cpu_extension, "_failure", None)


def test_a_failed_build_falls_back_to_the_aten_backend_and_says_so_once(monkeypatch, tmp_path, untried_extension):
    monkeypatch.setattr(cpu_extension, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    x = torch.randn(6, 4, 3)
    assert backends.select("auto", x).name == "cpu"  # asking builds nothing ...
    assert cpu_extension.failure() is None
    torch.manual_seed(0)
    layer = LSTMLayer(3, 5, max_steps=6)
    with pytest.warns(RuntimeWarning, match="the aten backend runs instead"):
        out, _ = layer(x)  # ... running does, and the build fails
    assert cpu_extension.failure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        assert not cpu_extension.usable(x) and backends.select("auto", x).name == "aten"
        layer(x)
    reference = LSTMLayer(3, 5, max_steps=6, backend="reference")
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out, reference(x)[0], atol=1e-6, rtol=1e-5)


def test_the_aten_backend_never_builds_the_extension(monkeypatch, untried_extension):
    monkeypatch.setattr(cpu_extension, "load", lambda: pytest.fail("the extension was built"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        LSTMLayer(3, 5, max_steps=6, backend="aten")(torch.randn(6, 4, 3))
    assert cpu_extension.failure() is None


def test_build_targets_this_cpu_under_a_name_of_its_own():
    name, flags = cpu_extension.build_options()
    tag = cpu_extension.checkout_tag()
    if cpu_extension.cpu_fingerprint() is None:
        assert "_generic_" in name and name.endswith(f"_{tag}") and "-march=native" not in flags
    else:
        assert name == f"bnrnn_cpu_{cpu_extension.cpu_fingerprint()}_{tag}" and "-march=native" in flags
    assert "-O3" in flags


def test_each_copy_of_the_source_builds_under_its_own_name(tmp_path):
    """Two clones (or worktrees) must not share a build directory: torch rebuilds whenever
    the source path in it changes, so alternating between them rebuilt every time."""
    here = cpu_extension.SOURCE
    elsewhere = tmp_path / "clone" / "bnrnn" / "nn" / "csrc" / here.name
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(here.read_bytes())
    assert cpu_extension.checkout_tag(here) == cpu_extension.checkout_tag(here.parent / ".." / "csrc" / here.name)
    assert cpu_extension.checkout_tag(elsewhere) != cpu_extension.checkout_tag(here)
    assert len(cpu_extension.checkout_tag(elsewhere)) == 6


def test_openmp_where_torch_runs_its_threads_on_it(monkeypatch):
    """-fopenmp (the backward's loops beside its GEMMs, on torch's OpenMP threads) on Linux
    when torch's parallel backend is OpenMP, and nowhere else."""
    monkeypatch.setattr(cpu_extension.platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: OpenMP")
    assert cpu_extension.openmp_flags() == ["-fopenmp"]
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "OpenMP 201511\nATen parallel backend: native thread pool")
    assert cpu_extension.openmp_flags() == []
    monkeypatch.setattr(cpu_extension.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: OpenMP")
    assert cpu_extension.openmp_flags() == []


def test_which_inputs_the_cpu_backend_takes():
    require_compiled_cpu_loop()
    x = torch.randn(3, 2, 4)
    assert cpu_extension.usable(x) and cpu_extension.usable(x.double())
    assert not cpu_extension.usable(x.half())
    assert backends.select("auto", x).name == "cpu" and backends.select("auto", x.half()).name == "aten"
    with pytest.raises(ValueError, match="model.backend=cpu cannot run this input"):
        backends.select("cpu", x.half())


def test_batch_statistics_keep_their_precision_far_from_zero(compiled):
    """Inputs with |mean| 3000 times their spread: the one-pass statistics (moments about the
    first row) still give the float64 variance to float32 precision, where sum(x^2)/B -
    mean^2 would lose every digit."""
    torch.manual_seed(0)
    layer = LSTMLayer(1, 8, max_steps=5, norm_h=False, norm_c=False, momentum=None)  # population = batch stats
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    x = 3000.0 + torch.randn(5, 64, 1)
    layer(x)
    reference(x.double())
    torch.testing.assert_close(layer.norm_x.running_var.double(), reference.norm_x.running_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.norm_x.running_mean.double(), reference.norm_x.running_mean, rtol=1e-6, atol=0)


def test_narrow_input_statistics_from_nearly_collinear_inputs(compiled):
    """The narrow input term's BN_x statistics come from x's covariance (var_f = w_f^T C w_f),
    never from W_x x itself. Two input columns equal up to 1e-3 noise, and rows of W_x that
    take their difference: the variance of the term is 1e-6 of the columns' own, so the
    covariance must keep it. Statistics, outputs and gradients against the float64 reference."""
    torch.manual_seed(1)
    layer = LSTMLayer(2, 8, max_steps=4, norm_h=False, norm_c=False, momentum=None)
    with torch.no_grad():
        layer.weight_ih[::2] = torch.tensor([1.0, -1.0])  # half the features see x_0 - x_1
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    base = 5.0 + torch.randn(4, 64, 1)
    x = torch.cat([base, base + 1e-3 * torch.randn(4, 64, 1)], dim=2)
    x64 = x.double().requires_grad_()
    x = x.requires_grad_()
    out = layer(x)[0]
    out_ref = reference(x64)[0]
    weight = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()
    (out_ref * weight).sum().backward()
    torch.testing.assert_close(layer.norm_x.running_var.double(), reference.norm_x.running_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.norm_x.running_mean.double(), reference.norm_x.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=2e-4)
    for p, q in [(x, x64), *zip(layer.parameters(), reference.parameters())]:
        scale = q.grad.abs().max()
        assert (p.grad.double() - q.grad).abs().max() <= 2e-4 * scale


@pytest.fixture(scope="module")
def small_gemm(compiled):
    if not cpu_extension.own_gemm():
        pytest.skip("the extension's own GEMM kernel needs a CPU with AVX-512 (this build uses the BLAS)")
    return compiled.small_gemm


@pytest.mark.parametrize("M", [1, 7, 8, 9, 33])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 47, 48, 49, 100])
@pytest.mark.parametrize("K", [0, 1, 5, 513, 1100])
@pytest.mark.parametrize("transposed", [False, True], ids=["a", "a_transposed"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_small_gemm_against_float64(small_gemm, M, N, K, transposed, beta):
    """csrc/small_gemm.h's kernel: C = A B + beta C for every ragged edge of its blocks (8
    rows, 48 columns in 16-lane registers, K in passes of 512), A row-major or read as the
    transpose of a row-major matrix; against the float64 product within float32 rounding.
    C is a view into a wider matrix: the columns beyond it stay untouched (masked stores),
    and with beta 0 whatever C held (NaN here) is never read."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(K, M, generator=g).t() if transposed else torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    wide = torch.randn(M, N + 5, generator=g)
    if beta == 0.0:
        wide[:, :N] = float("nan")
    before = wide.clone()
    c = wide[:, :N]
    small_gemm(a, b, c, beta)
    expected = a.double() @ b.double() + (beta * before[:, :N].double() if beta else 0)
    scale = (a.double().abs() @ b.double().abs()).max().item() + 1.0
    assert (c.double() - expected).abs().max().item() <= 4e-7 * scale * max(1.0, K**0.5)
    assert torch.equal(wide[:, N:], before[:, N:])


def test_small_gemm_gives_a_row_the_same_bits_in_any_block(small_gemm):
    """Each value is a sum over k in order from zero, whatever block or call computes it: the
    rows of a product of 37 rows equal the same rows computed 5 at a time, or from row 3 on.
    (The compiled loops rely on it: the same results on one thread or two.)"""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 700, generator=g), torch.randn(700, 100, generator=g)
    whole = torch.empty(37, 100)
    small_gemm(a, b, whole, 0.0)
    for r0 in range(0, 37, 5):
        part = torch.empty(min(5, 37 - r0), 100)
        small_gemm(a[r0:r0 + 5], b, part, 0.0)
        assert torch.equal(part, whole[r0:r0 + 5])
    tail = torch.empty(34, 100)
    small_gemm(a[3:], b, tail, 0.0)
    assert torch.equal(tail, whole[3:])


def test_the_own_gemm_can_be_limited_to_the_blas(small_gemm):
    """gemm_limit("blas"): the loops' float GEMMs go back to torch's BLAS (and oneDNN's packed
    halves from H = 256), e.g. to compare the two; the results agree within float32 rounding."""
    torch.manual_seed(0)
    layer = LSTMLayer(3, 40, max_steps=6)
    x = torch.randn(6, 20, 3)
    outputs = []
    for limit in ("own", "blas"):
        with cpu_extension.gemm_limit(limit):
            assert cpu_extension.own_gemm() == (limit == "own")
            layer.zero_grad()
            out = layer(x)[0]
            out.square().sum().backward()
            outputs.append((out.detach(), layer.weight_hh.grad.clone()))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_input_projection_on_the_own_kernel(small_gemm, bias):
    """cpu_recurrence.project_input (W_x x + b before the loops, for inputs wider than
    NARROW_INPUT_MAX) on the own kernel, rows split over the threads: torch's product within
    float32 rounding, for a row count that is no multiple of a block's 8 rows."""
    from bnrnn.kernels.cpu import recurrence as cpu_recurrence

    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(13, 7, 50, generator=g), torch.randn(4 * 37, 50, generator=g)
    b = torch.randn(4 * 37, generator=g) if bias else None
    out = cpu_recurrence.project_input(x, weight, b)
    expected = x.double() @ weight.double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-6)
