"""The ``triton`` backend of :mod:`bnrnn.nn.backends`: batch norm (or none) on a CUDA GPU in
float32, with the triton package."""

from __future__ import annotations

import torch

from bnrnn.kernels.triton import sequence, steps
from bnrnn.kernels.triton.recurrence import TritonLSTMRecurrence
from bnrnn.nn.aten_recurrence import population_recurrence, project_input
from bnrnn.nn.backends import Backend, fold_into_population, folded_input_term, register


@register
class TritonBackend(Backend):
    name = "triton"
    norms = ("batch",)
    priority = 30

    def cannot_run(self, x: torch.Tensor) -> str | None:
        if steps.available(x):
            return None
        if steps.triton is None or not x.is_cuda:
            return "it needs a CUDA GPU and the triton package"
        if x.dtype != torch.float32:
            return "it computes in float32"
        if not 0 < x.shape[1] <= steps.MAX_BATCH:
            return f"it takes batches of 1 to {steps.MAX_BATCH}"
        return "it runs outside torch.autocast"

    def train(self, layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype=None):
        """The input term for all steps in autograd ops (BN_x's statistics are over (T, B, 4H)
        at once, with no recurrence), the recurrence on the step kernels."""
        wx = torch.matmul(x, layer.weight_ih.t())
        xin = (wx if layer.norm_x is None else layer.norm_x.forward_sequence(wx, t0, stats)) + layer.bias
        (_, gamma_h, gamma_c), beta_c, (_, eps_h, eps_c) = layer.norm_tensors()
        h0, c0 = h0.contiguous(), c0.contiguous()
        if needs_grad:
            found: dict[str, torch.Tensor] = {}
            hs, c_last = TritonLSTMRecurrence.apply(xin, layer.weight_hh, gamma_h, gamma_c, beta_c, h0, c0,
                                                    (eps_h, eps_c), found, layer.cuda_graphs)
        else:
            with torch.no_grad():
                params = steps.Parameters(layer.weight_hh, gamma_h, gamma_c, beta_c, eps_h, eps_c)
                out = steps.run_sequence(xin.contiguous(), params, h0, c0)
            hs, c_last, found = out.hs, out.cs[-1], out.statistics()
        fold_into_population(layer, found, t0, stats, "hc")
        return hs, (hs[-1], c_last)

    def infer(self, layer, x, h0, c0, t0, gemm_dtype=None):
        """One whole-sequence kernel launch where the sizes fit it, else the aten loop."""
        with torch.no_grad():
            xin, (h_scale, c_scale, c_shift) = folded_input_term(layer, x, t0, project_input)
            whole = sequence.sequence_config(x.shape[0], xin.shape[1], layer.hidden_size, xin.device)
            if whole is None:
                hs, c_last = population_recurrence(xin, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0)
            else:
                hs, c_last = sequence.run_inference(
                    xin.contiguous(), layer.weight_hh,
                    *(None if t is None else t.contiguous() for t in (h_scale, c_scale, c_shift)),
                    h0.contiguous(), c0.contiguous(), whole)
        return hs, (hs[-1], c_last)
