"""The GPU fast path of LSTMLayer training: one Triton kernel per time step and direction.

On a GPU the aten backend (:mod:`bnrnn.nn.aten_recurrence`) is bound by kernel launches: a BN-LSTM
step is ~14 small kernels forward and ~25 backward, each far shorter than its launch. Here
a step is two launches each way:

- forward: the cuBLAS GEMM ``W_h h_{t-1}``, then one Triton kernel for everything else
  (BN_h's batch statistics and normalisation, the input term, the gate nonlinearities, the
  cell update, BN_c's statistics and normalisation, the output);
- backward: the cuBLAS GEMM ``dL/dh_t = grad_t + dWh_{t+1} W_h``, then one Triton kernel
  for the whole cell backward including both BN backwards and the per-step gamma/beta
  gradients.

For batches of at most :data:`FUSE_GEMM_MAX_BATCH` rows the kernels compute their own slice
of the recurrent product with ``tl.dot`` instead (one launch per step and direction), since
cuBLAS is slow at so few rows.

A program owns BLOCK_H hidden units: their four gate columns (k H + j, k = i, f, g, o) and
their cell column, for *every* batch row. The statistics of BN_h (per gate column) and BN_c
(per cell column) are over the batch, so they are reductions inside one program and the
kernels need no synchronisation between programs. This limits the batch per program
(:data:`MAX_BATCH`); larger batches take the ATen path.

The input term ``xin = BN_x(W_x x) + b`` (T, B, 4H) has no recurrence: the caller computes
it for all steps at once with ordinary autograd ops, and the backward returns its gradient.
The weight gradient of W_h is one GEMM over all steps after the loop, as cuDNN does.

On CUDA the two loops can be captured as CUDA graphs
(:class:`bnrnn.kernels.triton.recurrence.GraphedRecurrence`), which
removes the remaining per-launch CPU cost; on CPU the kernels run in Triton's interpreter,
which is how the tests check them on machines without a GPU.

:func:`run_forward` and :func:`run_backward` run a sequence that is not being captured as a
graph on the whole-sequence kernels of :mod:`bnrnn.kernels.triton.sequence` instead, where those
apply (one launch in place of T; they write the same buffers). The cell arithmetic both use
is in :mod:`bnrnn.kernels.triton.cell`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from bnrnn.kernels.triton import sequence as triton_sequence
from bnrnn.kernels.triton.cell import tl, triton

if triton is not None:
    from bnrnn.kernels.triton.cell import _cell_backward, _cell_forward, _layout, _product_columns

# Largest batch one program holds in registers (its rows are reduced over for BN).
MAX_BATCH = 256


def available(x: torch.Tensor) -> bool:
    """Whether this path can run a sequence ``x`` of this device, dtype and batch (float32
    only: under autocast the products would come back in half precision)."""
    return (triton is not None and x.is_cuda and x.dtype == torch.float32 and 0 < x.shape[1] <= MAX_BATCH
            and not torch.is_autocast_enabled("cuda"))


if triton is not None:

    def _step_forward(
        h_prev, weight, wh, ax, gamma_h, c_prev, gamma_c, beta_c,  # inputs (wh: output with FUSE_GEMM)
        acts, c_out, tanh_c, h_out, mean_h, invstd_h, mean_c, invstd_c,  # outputs
        B, H, eps_h, eps_c,
        FUSE_GEMM: tl.constexpr, BN_H: tl.constexpr, BN_C: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
    ):
        """One time step forward for hidden units [pid*BLOCK_H, (pid+1)*BLOCK_H), all rows.

        h_prev, c_prev, c_out, tanh_c, h_out: (B, H); weight: W_h (4H, H); wh, ax, acts:
        (B, 4H); mean_h, invstd_h, gamma_h: (4H,); mean_c, invstd_c, gamma_c, beta_c: (H,).
        ``wh`` = W_h h_{t-1} is read, or with FUSE_GEMM computed here (and stored for BN_h's
        backward).
        """
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        if FUSE_GEMM:
            # This program's 4 BLOCK_H columns of h_{t-1} W_h^T: (B, H) @ (H, 4 BLOCK_H).
            a = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=h_prev.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                h_k = tl.load(h_prev + rows[:, None] * H + k[None, :], mask=(rows[:, None] < B) & (k[None, :] < H),
                              other=0.0)
                a += tl.dot(h_k, _product_columns(weight, H, BLOCK_H, BLOCK_K, k0), input_precision="ieee")
            a = tl.reshape(a, (BLOCK_B, 4, BLOCK_H))
            if BN_H:
                tl.store(wh + tile, a, mask=tile_ok)
        else:
            a = tl.load(wh + tile, mask=tile_ok, other=0.0)
        c_prev = tl.load(c_prev + cell, mask=cell_ok, other=0.0)
        _cell_forward(a, c_prev, ax, gamma_h, gamma_c, beta_c, acts, c_out, tanh_c, h_out, mean_h, invstd_h, mean_c,
                      invstd_c, B, H, eps_h, eps_c, BN_H, BN_C, BLOCK_B, BLOCK_H, LIBDEVICE)

    def _step_backward(
        dh, grad_h_t, d_wh_next, weight, has_next,  # dL/dh_t: read from dh, or with FUSE_GEMM computed
        dc, acts, tanh_c, c, c_prev, wh, mean_h, invstd_h, gamma_h, mean_c, invstd_c, gamma_c,  # inputs
        d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c,  # outputs (and dc, updated in place)
        B, H,
        FUSE_GEMM: tl.constexpr, BN_H: tl.constexpr, BN_C: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One time step backward for the same block of hidden units as the forward.

        dh (B, H): total dL/dh_t; with FUSE_GEMM it is computed here instead, as grad_h_t
        (B, H) (the loss's own gradient at h_t) plus, when ``has_next``, d_wh_next (B, 4H)
        (step t+1's dL/d(W_h h_t)) times W_h (4H, H). dc (B, H): on entry dL/dc_t from step
        t+1, on exit dL/dc_{t-1}. The other outputs as in :func:`_cell_backward`.
        """
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        unit_ok = units < H
        if FUSE_GEMM:
            grad_h = tl.load(grad_h_t + cell, mask=cell_ok, other=0.0)
            if has_next:
                # (B, 4H) @ (4H, BLOCK_H): this program's columns of dL/dh_t through step t+1.
                for n0 in range(0, 4 * H, BLOCK_K):
                    n = n0 + tl.arange(0, BLOCK_K)
                    d_n = tl.load(d_wh_next + rows[:, None] * (4 * H) + n[None, :],
                                  mask=(rows[:, None] < B) & (n[None, :] < 4 * H), other=0.0)
                    w_n = tl.load(weight + n[:, None] * H + units[None, :],
                                  mask=(n[:, None] < 4 * H) & unit_ok[None, :], other=0.0)
                    grad_h += tl.dot(d_n, w_n, input_precision="ieee")
        else:
            grad_h = tl.load(dh + cell, mask=cell_ok, other=0.0)
        d_c = tl.load(dc + cell, mask=cell_ok, other=0.0)
        c_prev = tl.load(c_prev + cell, mask=cell_ok, other=0.0)
        d_c_prev = _cell_backward(grad_h, d_c, c_prev, acts, tanh_c, c, wh, mean_h, invstd_h, gamma_h, mean_c,
                                  invstd_c, gamma_c, d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, B, H, BN_H, BN_C,
                                  BLOCK_B, BLOCK_H)
        tl.store(dc + cell, d_c_prev, mask=cell_ok)

    # On CPU these run only in Triton's interpreter (TRITON_INTERPRET=1 before triton is first
    # imported), as the tests without a GPU do.
    STEP_FORWARD = triton.jit(_step_forward)
    STEP_BACKWARD = triton.jit(_step_backward)


# Small batches: each step kernel also does its own slice of the recurrent product (one
# launch per step and direction), because cuBLAS picks slow kernels for GEMMs of 16 rows.
# Larger hidden sizes and batches: cuBLAS's GEMM, then the kernel (the thresholds:
# docs/performance.md, "Measurements behind the code's thresholds").
FUSE_GEMM_MAX_BATCH = 16
FUSE_GEMM_MAX_HIDDEN = 256


@dataclass(frozen=True)
class LaunchConfig:
    """How the step kernels tile (B, H): every row per program, BLOCK_H units each."""

    fuse_gemm: bool
    block_b: int
    block_h: int
    block_k: int
    grid: tuple[int]
    num_warps: int = 4

    def constexprs(self) -> dict:
        return dict(FUSE_GEMM=self.fuse_gemm, BLOCK_B=self.block_b, BLOCK_H=self.block_h, BLOCK_K=self.block_k,
                    num_warps=self.num_warps)


def launch_config(batch: int, hidden: int) -> LaunchConfig:
    """All rows per program, about 256 (row, unit) pairs per program (docs/performance.md);
    with the fused product, blocks of 16 (tl.dot's smallest)."""
    fuse = batch <= FUSE_GEMM_MAX_BATCH and hidden <= FUSE_GEMM_MAX_HIDDEN
    block_b = triton.next_power_of_2(batch)
    if fuse:
        block_b = max(16, block_b)
        block_h = 16
    else:
        block_h = max(1, min(triton.next_power_of_2(hidden), 256 // block_b))
    return LaunchConfig(fuse, block_b, block_h, 32, (triton.cdiv(hidden, block_h),))


@dataclass
class Recurrence:
    """Everything one sequence's forward keeps for its backward; (T, ...) each.

    hs, cs, tanh_c: (T, B, H); acts (T, B, 4H) the gate activations; wh (T, B, 4H) the
    input of BN_h (a single (1, B, 4H) scratch step without BN_h); mean_h, invstd_h
    (T, 4H) and mean_c, invstd_c (T, H) the batch statistics (empty without that norm).
    """

    hs: torch.Tensor
    cs: torch.Tensor
    tanh_c: torch.Tensor
    acts: torch.Tensor
    wh: torch.Tensor
    mean_h: torch.Tensor
    invstd_h: torch.Tensor
    mean_c: torch.Tensor
    invstd_c: torch.Tensor

    @classmethod
    def allocate(cls, like: torch.Tensor, p: Parameters) -> Recurrence:
        """Buffers for a sequence shaped like ``like`` (T, B, 4H) with the norms in ``p``."""
        T, B, G = like.shape
        H = G // 4
        bn_h, bn_c = p.bn_h, p.bn_c
        empty = like.new_empty
        return cls(hs=empty(T, B, H), cs=empty(T, B, H), tanh_c=empty(T, B, H), acts=empty(T, B, G),
                   wh=empty(T if bn_h else 1, B, G), mean_h=empty(T if bn_h else 0, G),
                   invstd_h=empty(T if bn_h else 0, G), mean_c=empty(T if bn_c else 0, H),
                   invstd_c=empty(T if bn_c else 0, H))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def clone(self) -> Recurrence:
        return Recurrence(*(t.clone() for t in self.tensors()))

    def copy_(self, other: Recurrence) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)

    def statistics(self) -> dict[str, torch.Tensor]:
        """The batch statistics of the norms in use: ``mean_h, invstd_h`` (T, 4H), ``mean_c,
        invstd_c`` (T, H)."""
        stats = {}
        if self.mean_h.shape[0]:
            stats.update(mean_h=self.mean_h, invstd_h=self.invstd_h)
        if self.mean_c.shape[0]:
            stats.update(mean_c=self.mean_c, invstd_c=self.invstd_c)
        return stats


@dataclass
class Gradients:
    """What the backward returns: dL/dxin (T, B, 4H), dL/dW_h (4H, H), dL/dh0, dL/dc0
    (B, H), and the gamma/beta gradients summed over time (None without that norm)."""

    xin: torch.Tensor
    weight_hh: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    gamma_h: torch.Tensor | None
    gamma_c: torch.Tensor | None
    beta_c: torch.Tensor | None

    def clone(self) -> Gradients:
        return Gradients(*(t.clone() if t is not None else None for t in
                           (getattr(self, f.name) for f in fields(self))))


class Parameters:
    """The layer's tensors one sequence runs with: weight_hh (4H, H); gamma_h (4H,) or None;
    gamma_c, beta_c (H,) or None; eps of BN_h and BN_c."""

    def __init__(self, weight_hh, gamma_h, gamma_c, beta_c, eps_h: float, eps_c: float) -> None:
        self.weight_hh, self.gamma_h, self.gamma_c, self.beta_c = weight_hh, gamma_h, gamma_c, beta_c
        self.eps_h, self.eps_c = eps_h, eps_c
        # Kernels take a pointer for every argument; an absent norm gets a placeholder.
        self.placeholder = weight_hh.new_empty(1)

    @property
    def bn_h(self) -> bool:
        return self.gamma_h is not None

    @property
    def bn_c(self) -> bool:
        return self.gamma_c is not None

    def tensors(self) -> list[torch.Tensor | None]:
        """weight_hh, gamma_h, gamma_c, beta_c (None for an absent norm)."""
        return [self.weight_hh, self.gamma_h, self.gamma_c, self.beta_c]

    def pointer(self, tensor: torch.Tensor | None) -> torch.Tensor:
        return self.placeholder if tensor is None else tensor


def run_sequence(xin: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor) -> Recurrence:
    """:func:`run_forward` into newly allocated buffers."""
    out = Recurrence.allocate(xin, p)
    run_forward(xin, p, h0, c0, out)
    return out


def run_forward(xin: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor, out: Recurrence,
                graphed: bool = False) -> None:
    """The recurrence with batch statistics, into ``out``. xin (T, B, 4H); h0, c0 (B, H)
    contiguous. ``graphed``: this call is being captured as a CUDA graph, where the step
    kernels are faster than the whole-sequence kernel (see :mod:`bnrnn.kernels.triton.sequence`)."""
    T, B, G = xin.shape
    H = G // 4
    whole = None if graphed else triton_sequence.sequence_config(T, B, H, xin.device)
    if whole is not None:
        triton_sequence.run_forward(xin, p, h0, c0, out, whole)
    else:
        forward_steps(xin, p, h0, c0, out)


def forward_steps(xin: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor, out: Recurrence) -> None:
    """The forward loop on the step kernels, into ``out``."""
    T, B, G = xin.shape
    H = G // 4
    config = launch_config(B, H)
    bn_h, bn_c = p.bn_h, p.bn_c
    ptr = p.pointer
    w_t = p.weight_hh.t()
    wh_steps = out.wh.unbind(0)
    h, c = h0, c0
    for t, (ax, acts, c_out, tanh_c, h_out) in enumerate(
            zip(xin.unbind(0), out.acts.unbind(0), out.cs.unbind(0), out.tanh_c.unbind(0), out.hs.unbind(0))):
        wh = wh_steps[t if bn_h else 0]
        if not config.fuse_gemm:
            torch.mm(h, w_t, out=wh)
        STEP_FORWARD[config.grid](
            h, p.weight_hh, wh, ax, ptr(p.gamma_h), c, ptr(p.gamma_c), ptr(p.beta_c),
            acts, c_out, tanh_c, h_out,
            out.mean_h[t] if bn_h else p.placeholder, out.invstd_h[t] if bn_h else p.placeholder,
            out.mean_c[t] if bn_c else p.placeholder, out.invstd_c[t] if bn_c else p.placeholder,
            B, H, p.eps_h, p.eps_c, BN_H=bn_h, BN_C=bn_c, LIBDEVICE=xin.is_cuda, **config.constexprs())
        h, c = h_out, c_out


def run_backward(grad_hs: torch.Tensor, grad_c_last: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor,
                 saved: Recurrence, graphed: bool = False) -> Gradients:
    """The backward of :func:`run_forward`. grad_hs (T, B, H) and grad_c_last (B, H)
    contiguous; ``saved`` is the forward's :class:`Recurrence`; ``graphed`` as there."""
    T, B, H = grad_hs.shape
    G = 4 * H
    bn_h, bn_c = p.bn_h, p.bn_c
    d_pre = grad_hs.new_empty(T, B, G)
    d_wh = grad_hs.new_empty(T, B, G) if bn_h else d_pre
    dgamma_h = grad_hs.new_empty(T if bn_h else 0, G)
    dgamma_c = grad_hs.new_empty(T if bn_c else 0, H)
    dbeta_c = grad_hs.new_empty(T if bn_c else 0, H)
    whole = None if graphed else triton_sequence.sequence_config(T, B, H, grad_hs.device, backward=True)
    if whole is not None:
        dc = torch.empty_like(grad_c_last)
        triton_sequence.run_backward(grad_hs, grad_c_last, p, c0, saved, d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, dc,
                                     whole)
    else:
        dc = grad_c_last.clone()
        backward_steps(grad_hs, p, c0, saved, d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, dc)
    grad_h0 = torch.mm(d_wh[0], p.weight_hh)
    # dL/dW_h = sum_t dWh_t^T h_{t-1}: one GEMM over steps 1.., plus step 0's with h0.
    grad_w = torch.mm(d_wh[0].t(), h0)
    if T > 1:
        grad_w.addmm_(d_wh[1:].reshape(-1, G).t(), saved.hs[:-1].reshape(-1, H))
    return Gradients(xin=d_pre, weight_hh=grad_w, h0=grad_h0, c0=dc,
                     gamma_h=dgamma_h.sum(0) if bn_h else None,
                     gamma_c=dgamma_c.sum(0) if bn_c else None, beta_c=dbeta_c.sum(0) if bn_c else None)


def backward_steps(grad_hs, p: Parameters, c0, saved: Recurrence, d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, dc) -> None:
    """The backward loop on the step kernels, t = T-1 .. 0, into the (T, ...) buffers; dc (B, H)
    holds dL/dc_T on entry and dL/dc_0 on exit."""
    T, B, H = grad_hs.shape
    config = launch_config(B, H)
    bn_h, bn_c = p.bn_h, p.bn_c
    ptr = p.pointer
    dh = grad_hs.new_empty(B, H)
    for t in range(T - 1, -1, -1):
        has_next = t < T - 1
        grad_h = dh
        if not config.fuse_gemm:
            grad_h = torch.addmm(grad_hs[t], d_wh[t + 1], p.weight_hh, out=dh) if has_next else grad_hs[t]
        STEP_BACKWARD[config.grid](
            grad_h, grad_hs[t], d_wh[t + 1] if has_next else p.placeholder, p.weight_hh, int(has_next),
            dc, saved.acts[t], saved.tanh_c[t], saved.cs[t], saved.cs[t - 1] if t > 0 else c0,
            saved.wh[t] if bn_h else p.placeholder,
            saved.mean_h[t] if bn_h else p.placeholder, saved.invstd_h[t] if bn_h else p.placeholder,
            ptr(p.gamma_h),
            saved.mean_c[t] if bn_c else p.placeholder, saved.invstd_c[t] if bn_c else p.placeholder,
            ptr(p.gamma_c),
            d_pre[t], d_wh[t] if bn_h else p.placeholder,
            dgamma_h[t] if bn_h else p.placeholder, dgamma_c[t] if bn_c else p.placeholder,
            dbeta_c[t] if bn_c else p.placeholder,
            B, H, BN_H=bn_h, BN_C=bn_c, **config.constexprs())
