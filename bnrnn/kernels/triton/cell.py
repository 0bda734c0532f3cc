"""The BN-LSTM cell as Triton device functions, shared by the step kernels
(:mod:`bnrnn.kernels.triton.steps`) and the whole-sequence kernels (:mod:`bnrnn.kernels.triton.sequence`).

A program owns BLOCK_H hidden units: their four gate columns (k H + j, k = i, f, g, o) and
their cell column, for *every* batch row, so BN's per-feature batch statistics are
reductions inside the program. The functions here take the step's pointers and register
tiles and do the cell's arithmetic; the kernels around them decide where the recurrent
product comes from and how steps follow each other.
"""

from __future__ import annotations

try:  # Triton ships with PyTorch's CUDA builds for Linux; without it the ATen path is used.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

if triton is not None:

    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        """tanh: the CUDA math library's on a GPU; 2 sigmoid(2x) - 1 in Triton's CPU interpreter,
        which has no libdevice (about 1e-7 absolute error, which compounds over hundreds of
        steps: twice the float32 drift of ATen's tanh at T=200)."""
        if LIBDEVICE:
            return libdevice.tanh(x)
        else:
            return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _layout(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
        """Index tiles of this program's block: hidden units [pid*BLOCK_H, (pid+1)*BLOCK_H), all rows.

        Returns rows (BLOCK_B,), units (BLOCK_H,), gate (4,); feature (4, BLOCK_H) the gate
        features k*H + j and its mask; tile (BLOCK_B, 4, BLOCK_H) offsets into a (B, 4H)
        buffer and its mask; cell (BLOCK_B, BLOCK_H) offsets into a (B, H) buffer and its mask.
        """
        rows = tl.arange(0, BLOCK_B)
        units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        gate = tl.arange(0, 4)
        feature = gate[:, None] * H + units[None, :]
        feature_ok = (gate[:, None] < 4) & (units[None, :] < H)
        tile = rows[:, None, None] * (4 * H) + feature[None, :, :]
        tile_ok = (rows[:, None, None] < B) & feature_ok[None, :, :]
        cell = rows[:, None] * H + units[None, :]
        cell_ok = (rows[:, None] < B) & (units[None, :] < H)
        return rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok

    @triton.jit
    def _gate(act, gate, K: tl.constexpr):
        """Gate K's (BLOCK_B, BLOCK_H) slice of a (BLOCK_B, 4, BLOCK_H) tile."""
        return tl.sum(tl.where((gate == K)[None, :, None], act, 0.0), axis=1)

    @triton.jit
    def _product_columns(weight, H, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, k0):
        """Rows k0 .. k0+BLOCK_K of this program's 4 BLOCK_H columns of W_h^T: (BLOCK_K,
        4 BLOCK_H), column n = gate * BLOCK_H + unit offset (the order of a (4, BLOCK_H) tile)."""
        n = tl.arange(0, 4 * BLOCK_H)
        n_unit = tl.program_id(0) * BLOCK_H + n % BLOCK_H
        n_feature = (n // BLOCK_H) * H + n_unit
        k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(weight + n_feature[None, :] * H + k[:, None], mask=(n_unit[None, :] < H) & (k[:, None] < H),
                       other=0.0)

    @triton.jit
    def _activate(a, c_prev, gate, LIBDEVICE: tl.constexpr):
        """The gate nonlinearities and the cell update: a (BLOCK_B, 4, BLOCK_H) pre-activations,
        c_prev (BLOCK_B, BLOCK_H) -> the activations sigmoid(i~), sigmoid(f~), tanh(g~),
        sigmoid(o~) as one tile, c_t = f c_{t-1} + i g, and o."""
        act = tl.where((gate == 2)[None, :, None], _tanh(a, LIBDEVICE), tl.sigmoid(a))
        i, f, g, o = _gate(act, gate, 0), _gate(act, gate, 1), _gate(act, gate, 2), _gate(act, gate, 3)
        return act, f * c_prev + i * g, o

    @triton.jit
    def _cell_inference(
        a, c_prev, ax, scale_h, scale_c, shift_c, h_out, B, H,
        BN_H: tl.constexpr, BN_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        """One step of the cell with population statistics, every norm an affine map: BN_h
        (its shift folded into ax by the caller) scales W_h h by scale_h (4H,), BN_c maps c to
        c scale_c + shift_c (H,). a: (BLOCK_B, 4, BLOCK_H) W_h h_{t-1}; c_prev (BLOCK_B,
        BLOCK_H); ax (B, 4H) and h_out (B, H) this step's. Returns c_t (BLOCK_B, BLOCK_H)."""
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        if BN_H:
            a = a * tl.load(scale_h + feature, mask=feature_ok, other=0.0)[None, :, :]
        act, c, o = _activate(a + tl.load(ax + tile, mask=tile_ok, other=0.0), c_prev, gate, LIBDEVICE)
        cn = c
        if BN_C:
            unit_ok = units < H
            cn = (c * tl.load(scale_c + units, mask=unit_ok, other=0.0)[None, :]
                  + tl.load(shift_c + units, mask=unit_ok, other=0.0)[None, :])
        tl.store(h_out + cell, o * _tanh(cn, LIBDEVICE), mask=cell_ok)
        return c

    @triton.jit
    def _cell_forward(
        a, c_prev, ax, gamma_h, gamma_c, beta_c,  # a: W_h h_{t-1} tile; c_prev: (BLOCK_B, BLOCK_H)
        acts, c_out, tanh_c, h_out, mean_h, invstd_h, mean_c, invstd_c,  # outputs of this step
        B, H, eps_h, eps_c,
        BN_H: tl.constexpr, BN_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        """One step of the cell after the recurrent product, for this program's block.

        a: (BLOCK_B, 4, BLOCK_H) W_h h_{t-1} (BN_h's input); c_prev: (BLOCK_B, BLOCK_H). The
        pointers are this step's: ax, acts (B, 4H); c_out, tanh_c, h_out (B, H); mean_h,
        invstd_h, gamma_h (4H,); mean_c, invstd_c, gamma_c, beta_c (H,). ``acts`` receives
        sigmoid(i~), sigmoid(f~), tanh(g~), sigmoid(o~). Returns c_t (BLOCK_B, BLOCK_H).
        """
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        if BN_H:
            mean = tl.sum(tl.where(tile_ok, a, 0.0), axis=0) / B
            centred = tl.where(tile_ok, a - mean[None, :, :], 0.0)
            # 1/sqrt, not tl.rsqrt: the latter is an approximate instruction on GPUs.
            invstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / B + eps_h)
            tl.store(mean_h + feature, mean, mask=feature_ok)
            tl.store(invstd_h + feature, invstd, mask=feature_ok)
            scale = invstd * tl.load(gamma_h + feature, mask=feature_ok, other=0.0)
            a = centred * scale[None, :, :]
        a = a + tl.load(ax + tile, mask=tile_ok, other=0.0)
        act, c, o = _activate(a, c_prev, gate, LIBDEVICE)
        tl.store(acts + tile, act, mask=tile_ok)
        tl.store(c_out + cell, c, mask=cell_ok)
        cn = c
        if BN_C:
            unit_ok = units < H
            mean = tl.sum(tl.where(cell_ok, c, 0.0), axis=0) / B
            centred = tl.where(cell_ok, c - mean[None, :], 0.0)
            invstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / B + eps_c)
            tl.store(mean_c + units, mean, mask=unit_ok)
            tl.store(invstd_c + units, invstd, mask=unit_ok)
            scale = invstd * tl.load(gamma_c + units, mask=unit_ok, other=0.0)
            cn = centred * scale[None, :] + tl.load(beta_c + units, mask=unit_ok, other=0.0)[None, :]
        tc = _tanh(cn, LIBDEVICE)
        tl.store(tanh_c + cell, tc, mask=cell_ok)
        tl.store(h_out + cell, o * tc, mask=cell_ok)
        return c

    @triton.jit
    def _cell_backward(
        grad_h, d_c, c_prev, acts, tanh_c, c, wh, mean_h, invstd_h, gamma_h, mean_c, invstd_c, gamma_c,  # inputs
        d_pre, d_wh, dgamma_h, dgamma_c, dbeta_c,  # outputs of this step
        B, H,
        BN_H: tl.constexpr, BN_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """One step of the cell backward for this program's block, given dL/dh_t.

        grad_h, d_c, c_prev: (BLOCK_B, BLOCK_H) the total dL/dh_t, dL/dc_t from step t+1, and
        c_{t-1}. The pointers are this step's, laid out as in :func:`_cell_forward`. Writes
        d_pre (B, 4H) = dL/d(pre-activation) (= dL/d(xin_t)), d_wh (B, 4H) = dL/d(W_h h_{t-1})
        (only with BN_H; without it, that is d_pre), and this step's dgamma_h (4H,), dgamma_c,
        dbeta_c (H,). Returns dL/dc_{t-1} (BLOCK_B, BLOCK_H).
        """
        rows, units, gate, feature, feature_ok, tile, tile_ok, cell, cell_ok = _layout(B, H, BLOCK_B, BLOCK_H)
        unit_ok = units < H
        act = tl.load(acts + tile, mask=tile_ok, other=0.0)
        i, f, g, o = _gate(act, gate, 0), _gate(act, gate, 1), _gate(act, gate, 2), _gate(act, gate, 3)
        tc = tl.load(tanh_c + cell, mask=cell_ok, other=0.0)

        # h = o * tanh(cn), cn = BN_c(c)
        d_o = grad_h * tc * o * (1.0 - o)
        d_cn = tl.where(cell_ok, grad_h * o * (1.0 - tc * tc), 0.0)
        if BN_C:
            invstd = tl.load(invstd_c + units, mask=unit_ok, other=0.0)
            xhat = tl.where(cell_ok, (tl.load(c + cell, mask=cell_ok, other=0.0)
                                      - tl.load(mean_c + units, mask=unit_ok, other=0.0)[None, :]) * invstd[None, :], 0.0)
            d_beta = tl.sum(d_cn, axis=0)
            d_gamma = tl.sum(d_cn * xhat, axis=0)
            tl.store(dbeta_c + units, d_beta, mask=unit_ok)
            tl.store(dgamma_c + units, d_gamma, mask=unit_ok)
            scale = invstd * tl.load(gamma_c + units, mask=unit_ok, other=0.0)
            d_c += scale[None, :] * (d_cn - (d_beta[None, :] + xhat * d_gamma[None, :]) / B)
        else:
            d_c += d_cn
        # c = f * c_prev + i * g
        d_i = d_c * g * i * (1.0 - i)
        d_f = d_c * c_prev * f * (1.0 - f)
        d_g = d_c * i * (1.0 - g * g)
        d = tl.where((gate == 0)[None, :, None], d_i[:, None, :],
                     tl.where((gate == 1)[None, :, None], d_f[:, None, :],
                              tl.where((gate == 2)[None, :, None], d_g[:, None, :], d_o[:, None, :])))
        d = tl.where(tile_ok, d, 0.0)
        tl.store(d_pre + tile, d, mask=tile_ok)
        if BN_H:
            invstd = tl.load(invstd_h + feature, mask=feature_ok, other=0.0)
            xhat = tl.where(tile_ok, (tl.load(wh + tile, mask=tile_ok, other=0.0)
                                      - tl.load(mean_h + feature, mask=feature_ok, other=0.0)[None, :, :])
                            * invstd[None, :, :], 0.0)
            d_sum = tl.sum(d, axis=0)
            d_gamma = tl.sum(d * xhat, axis=0)
            tl.store(dgamma_h + feature, d_gamma, mask=feature_ok)
            scale = invstd * tl.load(gamma_h + feature, mask=feature_ok, other=0.0)
            tl.store(d_wh + tile, scale[None, :, :] * (d - (d_sum[None, :, :] + xhat * d_gamma[None, :, :]) / B),
                     mask=tile_ok)
        return d_c * f
