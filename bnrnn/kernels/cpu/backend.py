"""The ``cpu`` backend of :mod:`bnrnn.nn.backends`: batch norm (or none) on a float CPU tensor."""

from __future__ import annotations

import torch

from bnrnn.kernels.cpu import extension, recurrence
from bnrnn.kernels.cpu.recurrence import CompiledLSTMRecurrence
from bnrnn.nn.backends import Backend, fold_into_population, folded_input_term, population_affine, register


@register
class CpuBackend(Backend):
    name = "cpu"
    norms = ("batch",)
    priority = 20

    def cannot_run(self, x: torch.Tensor) -> str | None:
        if x.device.type != "cpu":
            return "it runs on the CPU"
        if x.dtype not in (torch.float32, torch.float64):
            return "it computes in float32 or float64"
        if not extension.usable(x):
            why = (extension.failure() or "").strip().splitlines()
            return "its compiled loops did not build" + (f" ({why[0]})" if why else "")
        return None

    def ready(self) -> bool:
        return extension.load()  # the first run builds it; on failure, aten (with a warning)

    def train(self, layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype=None):
        (gamma_x, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
        if needs_grad:
            found: dict[str, torch.Tensor] = {}
            hs, c_last = CompiledLSTMRecurrence.apply(x, layer.weight_ih, layer.bias, layer.weight_hh, gamma_x,
                                                      gamma_h, gamma_c, beta_c, h0, c0, eps, found)
        else:
            with torch.no_grad():
                hs, cs, found = recurrence.run_forward(x, layer.weight_ih, layer.bias, layer.weight_hh, gamma_x,
                                                       gamma_h, gamma_c, beta_c, eps, h0, c0)
            c_last = cs[-1]
        fold_into_population(layer, found, t0, stats, "xhc")
        return hs, (hs[-1], c_last)

    def infer(self, layer, x, h0, c0, t0, gemm_dtype=None):
        """A narrow input (seqMNIST's one pixel) never forms W_x x: the loop takes x_t times
        W_x^T scaled per step; a wider one gets the folded input term."""
        with torch.no_grad():
            if x.shape[2] <= recurrence.NARROW_INPUT_MAX:
                shift, x_scale, h_scale, c_scale, c_shift = population_affine(layer, t0, x.shape[0])
                coef = layer.weight_ih.t().unsqueeze(0).expand(x.shape[0], -1, -1)  # (T, I, 4H)
                if x_scale is not None:
                    coef = coef * x_scale.unsqueeze(1)
                hs, c_last = recurrence.population_forward(x, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0,
                                                           x_coef=coef, x_shift=shift)
            else:
                xin, (h_scale, c_scale, c_shift) = folded_input_term(layer, x, t0, recurrence.project_input)
                hs, c_last = recurrence.population_forward(xin, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0)
        return hs, (hs[-1], c_last)
