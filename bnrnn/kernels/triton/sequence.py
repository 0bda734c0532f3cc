"""The GPU fast path for small layers: the whole recurrence in one persistent kernel.

At the sequential-MNIST size (hidden 100, batch 64) a step of :mod:`bnrnn.kernels.triton.steps`
is a cuBLAS GEMM and a step kernel of a few microseconds each; here one launch runs every
step of a sequence:

- a program owns BLOCK_H hidden units (as the step kernels do) and keeps its slice of W_h
  in registers for the whole sequence: forward its 4 BLOCK_H columns of W_h^T (H, 4 BLOCK_H),
  backward its BLOCK_H columns of W_h (4H, BLOCK_H);
- the cell state (forward) and dL/dc (backward) of its units stay in registers too;
- between steps the programs meet at a grid-wide barrier (an atomic counter in global
  memory; an L2 round trip), since step t+1 needs every program's h_t (forward) or
  dL/d(W_h h_{t+1}) (backward).

The step kernels replayed from a CUDA graph are faster for training, the whole-sequence
kernel for everything launched eagerly (measurements: docs/performance.md, "On a GPU").

So a training sequence replayed from a CUDA graph runs on the step kernels, and one launched
eagerly (``cuda_graphs`` off, or the no-grad forward that re-estimates the population) runs
here; both write the same buffers. Inference with population statistics runs here.

The products are "ieee" (FMA) in training: "tf32x3" (tensor cores, three TF32 products per
float32 product: hi*hi + hi*lo + lo*hi) is twice as fast, but over 784 steps it put BN_c's
gamma gradient 2.0e-5 from float64, outside the bench's 1e-5. Inference, which accumulates
nothing over steps, uses "tf32x3": 1.6e-7 from float64 against 1.4e-7 with FMA.

A grid barrier needs every program resident at once, so the grid is kept within the
device's SM count (one program per SM at most), and a wait that never ends sets a flag
that the launcher asserts on the device instead of hanging. The per-step arithmetic is the
step kernels' own (:mod:`bnrnn.kernels.triton.cell`), and so are the buffers it writes.

In Triton's CPU interpreter programs run one after another, so there the grid is one
program (the tests check the arithmetic that way; tests/test_cuda.py checks the barrier).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bnrnn.kernels.triton.cell import tl, triton

if triton is not None:
    from bnrnn.kernels.triton.cell import _cell_backward, _cell_forward, _cell_inference, _layout, _product_columns

# Sizes whose W_h slices and tiles fit in a program's registers (docs/performance.md).
PERSISTENT_MAX_HIDDEN = 128
PERSISTENT_MAX_BATCH = 128
# The backward's tiles are twice the forward's: from a block of 128 rows they ask for more
# shared memory than a GPU has (docs/performance.md). Larger batches take the step kernels.
PERSISTENT_BACKWARD_MAX_BATCH = 64
# Smallest blocks per program: tl.dot needs 16 columns (4 gates x 4 units forward, 16 units
# backward); more units per program when the grid would exceed the SM count.
FORWARD_BLOCK_H = 4
BACKWARD_BLOCK_H = 16
FORWARD_WARPS = 8
BACKWARD_WARPS = 8  # 4 warps spill the (4H, BLOCK_H) slice of W_h to local memory
# Precision of float32 recurrent products (float64 ones are always "ieee"); see above.
TRAINING_DOT = "ieee"
INFERENCE_DOT = "tf32x3"
# Polls of a barrier before giving up (each an L2 round trip: seconds in all).
MAX_SPINS = 1 << 22


@dataclass(frozen=True)
class SequenceConfig:
    """How the persistent kernels tile (B, H): every row per program, block_h units each."""

    block_b: int
    block_k: int  # H rounded up to a power of two (the recurrent product's depth per gate)
    forward_block_h: int
    backward_block_h: int
    forward_programs: int
    backward_programs: int
    forward_warps: int
    backward_warps: int

    @staticmethod
    def dot(like: torch.Tensor, inference: bool = False) -> str:
        """tl.dot's input precision for products of this dtype."""
        if like.dtype != torch.float32:
            return "ieee"
        return INFERENCE_DOT if inference else TRAINING_DOT


@functools.lru_cache(maxsize=None)
def _resident_programs(device: torch.device) -> int:
    """Programs that can wait on each other at a barrier: one per SM on a GPU, one in the
    interpreter (which runs programs in turn)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def sequence_config(steps: int, batch: int, hidden: int, device: torch.device,
                    backward: bool = False) -> SequenceConfig | None:
    """The persistent kernels' tiling for this shape (of the backward's, with ``backward``),
    or None where they do not apply."""
    max_batch = PERSISTENT_BACKWARD_MAX_BATCH if backward else PERSISTENT_MAX_BATCH
    if (triton is None or batch > max_batch or hidden > PERSISTENT_MAX_HIDDEN
            or steps * batch * 4 * hidden >= 2**31):  # int32 offsets into (T, B, 4H) buffers
        return None
    resident = _resident_programs(torch.device(device))

    def blocks(smallest: int) -> tuple[int, int]:
        block_h = smallest
        while triton.cdiv(hidden, block_h) > resident:
            block_h *= 2
        return block_h, triton.cdiv(hidden, block_h)

    (fwd_h, fwd_n), (bwd_h, bwd_n) = blocks(FORWARD_BLOCK_H), blocks(BACKWARD_BLOCK_H)
    return SequenceConfig(block_b=max(16, triton.next_power_of_2(batch)), block_k=max(16, triton.next_power_of_2(hidden)),
                          forward_block_h=fwd_h, backward_block_h=bwd_h, forward_programs=fwd_n,
                          backward_programs=bwd_n, forward_warps=FORWARD_WARPS,
                          backward_warps=BACKWARD_WARPS)


if triton is not None:

    @triton.jit
    def _grid_barrier(sync, target, max_spins):
        """Count this program's arrival at ``sync`` (int32) and wait until ``target`` programs
        have arrived. Stores before it are visible to every program after it (release /
        acquire at GPU scope; the CTA barriers order the other warps' stores and loads). A
        wait of more than ``max_spins`` polls sets the flag at ``sync + 1`` and gives up."""
        tl.debug_barrier()
        tl.atomic_add(sync, 1, sem="release", scope="gpu")
        spins = 0
        while (tl.atomic_add(sync, 0, sem="acquire", scope="gpu") < target) & (spins < max_spins):
            spins += 1
        if spins >= max_spins:
            tl.atomic_xchg(sync + 1, 1)
        tl.debug_barrier()

    @triton.jit
    def _recurrent_product(h0, hs, t, w, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """W_h h_{t-1} for this program's columns: (BLOCK_B, 4, BLOCK_H), from h_{t-1} of every
        unit (h0 (B, H) at t = 0, else hs[t-1] of hs (T, B, H), written by all programs) and
        the program's slice w (BLOCK_K, 4 BLOCK_H) of W_h^T. ".cg" reads h from L2, past this
        SM's L1 (which is not coherent between SMs)."""
        rows = tl.arange(0, BLOCK_B)
        k = tl.arange(0, BLOCK_K)
        offsets = rows[:, None] * H + k[None, :]
        ok = (rows[:, None] < B) & (k[None, :] < H)
        prev = tl.maximum(t - 1, 0) * B * H
        h_prev = (tl.load(hs + prev + offsets, mask=ok & (t > 0), other=0.0, cache_modifier=".cg")
                  + tl.load(h0 + offsets, mask=ok & (t == 0), other=0.0))
        return tl.reshape(tl.dot(h_prev, w, input_precision=DOT), (BLOCK_B, 4, BLOCK_H))

    @triton.jit
    def _sequence_inference(
        xin, h0, c0, weight, scale_h, scale_c, shift_c,  # inputs
        hs, c_last,  # outputs
        sync, T, B, H, max_spins,
        BN_H: tl.constexpr, BN_C: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
        DOT: tl.constexpr,
    ):
        """Every step with population statistics (see :func:`_cell_inference`). xin (T, B, 4H)
        with BN_x, b and BN_h's shift folded in; scale_h (T, 4H); scale_c, shift_c (T, H);
        outputs hs (T, B, H) and c_last (B, H)."""
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        G = 4 * H
        w = _product_columns(weight, H, BLOCK_H, BLOCK_K, 0)
        c = tl.load(c0 + cell, mask=cell_ok, other=0.0)
        programs = tl.num_programs(0)
        for t in range(T):
            a = _recurrent_product(h0, hs, t, w, B, H, BLOCK_B, BLOCK_H, BLOCK_K, DOT)
            c = _cell_inference(a, c, xin + t * B * G, scale_h + t * G, scale_c + t * H, shift_c + t * H,
                                hs + t * B * H, B, H, BN_H, BN_C, BLOCK_B, BLOCK_H, LIBDEVICE)
            _grid_barrier(sync, programs * (t + 1), max_spins)
        tl.store(c_last + cell, c, mask=cell_ok)

    @triton.jit
    def _sequence_forward(
        xin, h0, c0, weight, gamma_h, gamma_c, beta_c,  # inputs
        hs, cs, tanh_c, acts, wh, mean_h, invstd_h, mean_c, invstd_c,  # outputs, (T, ...) each
        sync, T, B, H, eps_h, eps_c, max_spins,
        BN_H: tl.constexpr, BN_C: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
        DOT: tl.constexpr,
    ):
        """Every step forward for this program's units. xin, acts, wh (T, B, 4H); h0, c0 (B, H);
        hs, cs, tanh_c (T, B, H); mean_h, invstd_h (T, 4H); mean_c, invstd_c (T, H)."""
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        G = 4 * H
        w = _product_columns(weight, H, BLOCK_H, BLOCK_K, 0)  # (BLOCK_K, 4 BLOCK_H), all sequence long
        c = tl.load(c0 + cell, mask=cell_ok, other=0.0)
        programs = tl.num_programs(0)
        for t in range(T):
            a = _recurrent_product(h0, hs, t, w, B, H, BLOCK_B, BLOCK_H, BLOCK_K, DOT)
            if BN_H:
                tl.store(wh + t * B * G + tile, a, mask=tile_ok)
            c = _cell_forward(a, c, xin + t * B * G, gamma_h, gamma_c, beta_c,
                              acts + t * B * G, cs + t * B * H, tanh_c + t * B * H, hs + t * B * H,
                              mean_h + t * G, invstd_h + t * G, mean_c + t * H, invstd_c + t * H,
                              B, H, eps_h, eps_c, BN_H, BN_C, BLOCK_B, BLOCK_H, LIBDEVICE)
            _grid_barrier(sync, programs * (t + 1), max_spins)

    @triton.jit
    def _sequence_backward(
        grad_hs, grad_c_last, weight, c0,  # inputs
        acts, tanh_c, cs, wh, mean_h, invstd_h, gamma_h, mean_c, invstd_c, gamma_c,  # the forward's
        d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, dc0,  # outputs
        sync, T, B, H, max_spins,
        BN_H: tl.constexpr, BN_C: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT: tl.constexpr,
    ):
        """Every step backward, t = T-1 .. 0, for this program's units. grad_hs (T, B, H),
        grad_c_last (B, H); d_pre, d_wh (T, B, 4H) (d_wh is d_pre without BN_H); dgamma_h
        (T, 4H), dgamma_c, dbeta_c (T, H) per step; dc0 (B, H) = dL/dc_0."""
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        G = 4 * H
        # This program's columns of W_h, gate block by gate block: (4 BLOCK_K, BLOCK_H), row
        # q BLOCK_K + k is W_h's row q H + k.
        n = tl.arange(0, 4 * BLOCK_K)
        n_k = n % BLOCK_K
        n_feature = (n // BLOCK_K) * H + n_k
        w = tl.load(weight + n_feature[:, None] * H + units[None, :],
                    mask=(n_k[:, None] < H) & (units[None, :] < H), other=0.0)
        d_offsets = rows[:, None] * G + n_feature[None, :]
        d_ok = (rows[:, None] < B) & (n_k[None, :] < H)
        d_c = tl.load(grad_c_last + cell, mask=cell_ok, other=0.0)
        programs = tl.num_programs(0)
        for t in range(T - 1, -1, -1):
            # dL/dh_t: the loss's own gradient plus step t+1's dL/d(W_h h_t) (every program's) W_h.
            # At t = T-1 there is no step t+1: d_wh[T-1] is not written yet, and its
            # uninitialised values (inf or NaN, possibly) are zeroed before the product.
            following = d_wh + tl.minimum(t + 1, T - 1) * B * G
            d_next = tl.load(following + d_offsets, mask=d_ok, other=0.0, cache_modifier=".cg")
            d_next = tl.where(t < T - 1, d_next, 0.0)
            through_next = tl.dot(d_next, w, input_precision=DOT)
            grad_h = tl.load(grad_hs + t * B * H + cell, mask=cell_ok, other=0.0) + through_next
            prev = tl.maximum(t - 1, 0) * B * H
            c_prev = (tl.load(cs + prev + cell, mask=cell_ok & (t > 0), other=0.0)
                      + tl.load(c0 + cell, mask=cell_ok & (t == 0), other=0.0))
            d_c = _cell_backward(grad_h, d_c, c_prev, acts + t * B * G, tanh_c + t * B * H, cs + t * B * H,
                                 wh + t * B * G, mean_h + t * G, invstd_h + t * G, gamma_h,
                                 mean_c + t * H, invstd_c + t * H, gamma_c,
                                 d_pre + t * B * G, d_wh + t * B * G, dgamma_h + t * G, dgamma_c + t * H,
                                 dbeta_c + t * H, B, H, BN_H, BN_C, BLOCK_B, BLOCK_H)
            _grid_barrier(sync, programs * (T - t), max_spins)
        tl.store(dc0 + cell, d_c, mask=cell_ok)


def _barrier_counter(like: torch.Tensor) -> torch.Tensor:
    """[arrivals, timed-out flag], zero, for one launch."""
    return torch.zeros(2, dtype=torch.int32, device=like.device)


def _check(sync: torch.Tensor) -> None:
    # On the device, without synchronising the host: a barrier that timed out stops the run.
    torch._assert_async(sync[1] == 0, "bnrnn: a grid barrier of the persistent LSTM kernel timed out")


def run_forward(xin, p, h0, c0, out, config: SequenceConfig) -> None:
    """The recurrence with batch statistics in one launch, into ``out`` (a
    :class:`bnrnn.kernels.triton.steps.Recurrence`); arguments as :func:`bnrnn.kernels.triton.steps.run_forward`."""
    T, B, G = xin.shape
    H = G // 4
    bn_h, bn_c = p.bn_h, p.bn_c
    ptr, none = p.pointer, p.placeholder
    sync = _barrier_counter(xin)
    _sequence_forward[(config.forward_programs,)](
        xin, h0, c0, p.weight_hh, ptr(p.gamma_h), ptr(p.gamma_c), ptr(p.beta_c),
        out.hs, out.cs, out.tanh_c, out.acts, out.wh if bn_h else none,
        out.mean_h if bn_h else none, out.invstd_h if bn_h else none,
        out.mean_c if bn_c else none, out.invstd_c if bn_c else none,
        sync, T, B, H, p.eps_h, p.eps_c, MAX_SPINS,
        BN_H=bn_h, BN_C=bn_c, BLOCK_B=config.block_b, BLOCK_H=config.forward_block_h, BLOCK_K=config.block_k,
        LIBDEVICE=xin.is_cuda, DOT=config.dot(xin), num_warps=config.forward_warps)
    _check(sync)


def run_backward(grad_hs, grad_c_last, p, c0, saved, d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c, dc0,
                 config: SequenceConfig) -> None:
    """Every step's backward in one launch, into the given (T, ...) buffers (see
    :func:`_sequence_backward`); ``saved`` is the forward's Recurrence."""
    T, B, H = grad_hs.shape
    bn_h, bn_c = p.bn_h, p.bn_c
    ptr, none = p.pointer, p.placeholder
    sync = _barrier_counter(grad_hs)
    _sequence_backward[(config.backward_programs,)](
        grad_hs, grad_c_last, p.weight_hh, c0,
        saved.acts, saved.tanh_c, saved.cs, saved.wh if bn_h else none,
        saved.mean_h if bn_h else none, saved.invstd_h if bn_h else none, ptr(p.gamma_h),
        saved.mean_c if bn_c else none, saved.invstd_c if bn_c else none, ptr(p.gamma_c),
        d_pre, d_wh, dgamma_h if bn_h else none, dgamma_c if bn_c else none, dbeta_c if bn_c else none, dc0,
        sync, T, B, H, MAX_SPINS,
        BN_H=bn_h, BN_C=bn_c, BLOCK_B=config.block_b, BLOCK_H=config.backward_block_h, BLOCK_K=config.block_k,
        DOT=config.dot(grad_hs), num_warps=config.backward_warps)
    _check(sync)


def run_inference(xin, weight_hh, scale_h, scale_c, shift_c, h0, c0,
                  config: SequenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence with population statistics in one launch (see :func:`_sequence_inference`):
    hs (T, B, H) and c_T (B, H). scale_h (T, 4H), scale_c, shift_c (T, H) or None."""
    T, B, G = xin.shape
    H = G // 4
    hs = xin.new_empty(T, B, H)
    c_last = torch.empty_like(c0)
    none = xin.new_empty(1)
    sync = _barrier_counter(xin)
    _sequence_inference[(config.forward_programs,)](
        xin, h0, c0, weight_hh, none if scale_h is None else scale_h,
        none if scale_c is None else scale_c, none if shift_c is None else shift_c, hs, c_last,
        sync, T, B, H, MAX_SPINS,
        BN_H=scale_h is not None, BN_C=scale_c is not None, BLOCK_B=config.block_b, BLOCK_H=config.forward_block_h,
        BLOCK_K=config.block_k, LIBDEVICE=xin.is_cuda, DOT=config.dot(xin, inference=True),
        num_warps=config.forward_warps)
    _check(sync)
    return hs, c_last
