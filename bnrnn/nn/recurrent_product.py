"""The recurrent product W_h h of a sequence, through oneDNN's packed weights where that pays.

Used by the aten loop (:class:`RecurrentProduct`) and by the compiled CPU loops of
:mod:`bnrnn.kernels.cpu` (:func:`packed_column_halves`); where packing pays is a measured
threshold (docs/performance.md).
"""

from __future__ import annotations

import torch

# Packed (weight-stationary) GEMMs pay off from this hidden size on (docs/performance.md).
PACKED_MIN_HIDDEN = 256


def packing_pays(weight: torch.Tensor) -> bool:
    """Whether W_h (4H, H) goes to oneDNN packed: a float32 CPU weight with a hidden size from
    PACKED_MIN_HIDDEN on, and oneDNN present."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[1] >= PACKED_MIN_HIDDEN
            and torch.backends.mkldnn.is_available())


def linear_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (out, in) weight of ``h W^T`` (W itself) or of ``g W`` (W^T, made contiguous),
    detached: what oneDNN's linear op packs."""
    w = weight.detach()
    return w.t().contiguous() if transposed else w


def packed_weight(weight: torch.Tensor, batch: int, transposed: bool = False) -> torch.Tensor | None:
    """W = weight (4H, H), or W^T, packed for oneDNN's linear op at this batch size (the
    weight of ``h W^T``, or of ``g W``), or None where packing does not pay: not a float32
    CPU weight, a hidden size below PACKED_MIN_HIDDEN, or no oneDNN."""
    if not packing_pays(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(linear_weight(weight, transposed), batch)


def packed_column_halves(weight: torch.Tensor, batch: int, transposed: bool = False) -> list[torch.Tensor]:
    """W = weight (4H, H), or W^T, as its two row halves, each packed like
    :func:`packed_weight`, or [] where packing does not pay. The compiled CPU loops form
    h W^T (forward) and g W (backward) by column halves, one per thread, each a
    single-threaded oneDNN GEMM on its own half, faster than oneDNN's GEMM of the whole
    product on both threads at PTB's shape (docs/performance.md)."""
    if not packing_pays(weight):
        return []
    return [torch.ops.mkldnn._reorder_linear_weight(half.contiguous(), batch)
            for half in linear_weight(weight, transposed).chunk(2)]


def low_precision_mm(a: torch.Tensor, b: torch.Tensor, gemm_dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b with both operands in ``gemm_dtype`` (bf16 under autocast) and the product back
    in ``a``'s dtype; None: in ``a``'s dtype."""
    if gemm_dtype is None or gemm_dtype == a.dtype:
        return a @ b
    return (a.to(gemm_dtype) @ b.to(gemm_dtype)).to(a.dtype)


class RecurrentProduct:
    """The recurrent products of one sequence, W = weight_hh (4H, H): ``h W^T`` (forward,
    (B, H) -> (B, 4H)) and ``g W`` (backward, (B, 4H) -> (B, H)), each optionally plus a
    (B, .) addend.

    On CPU in float32 with oneDNN and a large hidden size, W and W^T are packed once per
    sequence into oneDNN's blocked layout (what ``torch.nn.LSTM`` does internally) instead
    of being repacked by every one of the T small-batch GEMMs; otherwise plain mm/addmm.
    With ``gemm_dtype`` (bf16 under autocast) the products take their operands in that
    dtype, W converted once per sequence, and return in h's dtype.
    """

    def __init__(self, weight: torch.Tensor, batch: int, gemm_dtype: torch.dtype | None = None) -> None:
        self.gemm_dtype = gemm_dtype if gemm_dtype != weight.dtype else None
        if self.gemm_dtype is not None:
            weight = weight.detach().to(self.gemm_dtype)  # its gradient is formed apart from these products
        self.weight = weight
        self.weight_t = weight.t()
        self.packed_w = packed_weight(weight, batch)
        self.packed_w_t = packed_weight(weight, batch, transposed=True)
        self.packed = self.packed_w is not None

    def forward(self, h: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """[add +] h W^T: (B, H) -> (B, 4H)."""
        if self.gemm_dtype is not None:
            return self.low_precision(h, add, self.weight_t)
        return self.product(h, add, self.packed_w if self.packed else None, self.weight_t)

    def backward(self, g: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """[add +] g W: (B, 4H) -> (B, H)."""
        if self.gemm_dtype is not None:
            return self.low_precision(g, add, self.weight)
        return self.product(g, add, self.packed_w_t if self.packed else None, self.weight)

    def low_precision(self, a: torch.Tensor, add: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
        out = torch.mm(a.to(self.gemm_dtype), dense).to(a.dtype)
        return out if add is None else out.add_(add)

    @staticmethod
    def product(a: torch.Tensor, add: torch.Tensor | None, packed: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
        """[add +] a @ dense, through the packed oneDNN weight when there is one."""
        if packed is not None:
            if add is None:
                return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(a, add, packed, None, "add")
        return torch.mm(a, dense) if add is None else torch.addmm(add, a, dense)
