"""The recurrence on the Triton kernels as one autograd Function, optionally as CUDA graphs.

:class:`TritonLSTMRecurrence` is the GPU counterpart of
:class:`bnrnn.nn.aten_recurrence.FusedLSTMRecurrence`: (xin, W_h, gamma_h, gamma_c, beta_c, h0, c0)
-> (hs, c_T), where ``xin = BN_x(W_x x) + b`` was computed outside with ordinary autograd
ops.

A captured CUDA graph replays the T steps' ~4T launches without the CPU issuing them one by
one. Graphs have fixed shapes and addresses, so :class:`GraphedRecurrence` owns static
input and output tensors for one (T, B, H, norms) shape, copies the inputs in before a
replay and clones the results out (the Function's results must survive the next replay).
The backward replays against the same static buffers; if another sequence of that shape
ran in between, the forward's saved results are copied back first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch

from bnrnn.kernels.triton import steps as triton_lstm
from bnrnn.kernels.triton.steps import Gradients, Parameters, Recurrence, run_backward

GRAPH_CACHE_SIZE = 8  # (shape, layer) pairs kept captured, each with its own buffers: a 2-layer
                      # bidirectional stack uses 4


class GraphedRecurrence:
    """The forward and backward loops of one sequence shape, captured as CUDA graphs."""

    def __init__(self, xin: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor) -> None:
        self.xin, self.h0, self.c0 = xin.clone(), h0.clone(), c0.clone()
        self.params = Parameters(*(t.detach().clone() if t is not None else None for t in p.tensors()), p.eps_h, p.eps_c)
        self.grad_hs = xin.new_zeros(xin.shape[0], *h0.shape)
        self.grad_c = torch.zeros_like(c0)
        self.saved = Recurrence.allocate(xin, p)
        # Warm up on a side stream first (compiles the kernels, creates cuBLAS's handles).
        side = torch.cuda.Stream(device=xin.device)
        side.wait_stream(torch.cuda.current_stream(xin.device))
        with torch.cuda.stream(side):
            self.forward_loop()
            self.backward_loop()
        torch.cuda.current_stream(xin.device).wait_stream(side)
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph):
            self.forward_loop()
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool()):
            self.grads = self.backward_loop()
        self.generation = 0  # forward replays so far; tells a backward whether its buffers are intact

    def forward_loop(self) -> None:
        triton_lstm.run_forward(self.xin, self.params, self.h0, self.c0, self.saved, graphed=True)

    def backward_loop(self) -> Gradients:
        return run_backward(self.grad_hs, self.grad_c, self.params, self.h0, self.c0, self.saved, graphed=True)

    def load(self, xin, p: Parameters, h0, c0) -> None:
        self.xin.copy_(xin)
        self.h0.copy_(h0)
        self.c0.copy_(c0)
        for mine, theirs in zip(self.params.tensors(), p.tensors()):
            if mine is not None:
                mine.copy_(theirs)

    def forward(self, xin, p: Parameters, h0, c0) -> tuple[Recurrence, int]:
        """Replay with these inputs; returns a copy of the results and this replay's number."""
        self.load(xin, p, h0, c0)
        self.forward_graph.replay()
        self.generation += 1
        return self.saved.clone(), self.generation

    def backward(self, grad_hs, grad_c_last, saved: Recurrence, generation: int, xin, p: Parameters, h0, c0) -> Gradients:
        if generation != self.generation:  # another sequence replayed since: restore this one
            self.load(xin, p, h0, c0)
            self.saved.copy_(saved)
        self.grad_hs.copy_(grad_hs)
        self.grad_c.copy_(grad_c_last)
        self.backward_graph.replay()
        return self.grads.clone()


_graphs: OrderedDict[tuple, GraphedRecurrence] = OrderedDict()


def graphed(xin: torch.Tensor, p: Parameters, h0: torch.Tensor, c0: torch.Tensor) -> GraphedRecurrence:
    """The captured graphs for this shape and layer (captured on first use, least recently
    used dropped). Each layer of a stack (the address of its W_h tells them apart) has its
    own, so that a layer's backward replays against its own buffers: layers sharing one
    shape's graphs would copy their saved results back in before each backward."""
    key = (xin.shape, xin.device, xin.dtype, p.bn_h, p.bn_c, p.eps_h, p.eps_c, p.weight_hh.data_ptr())
    if key in _graphs:
        _graphs.move_to_end(key)
    else:
        if len(_graphs) >= GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
        _graphs[key] = GraphedRecurrence(xin, p, h0, c0)
    return _graphs[key]


class TritonLSTMRecurrence(torch.autograd.Function):
    """(xin, W_h, gamma_h, gamma_c, beta_c, h0, c0, eps, stats, use_graphs) -> (hs, c_T).

    xin (T, B, 4H); W_h (4H, H); gamma_h (4H,) or None; gamma_c, beta_c (H,) or None; h0, c0
    (B, H); eps = (eps_h, eps_c). Returns hs (T, B, H) and c_T (B, H). ``stats`` (a dict)
    receives ``mean_h, invstd_h`` (T, 4H) and ``mean_c, invstd_c`` (T, H) of the norms in use.
    """

    @staticmethod
    def forward(ctx, xin, weight_hh, gamma_h, gamma_c, beta_c, h0, c0, eps, stats, use_graphs):
        p = Parameters(weight_hh, gamma_h, gamma_c, beta_c, *eps)
        xin, h0, c0 = xin.contiguous(), h0.contiguous(), c0.contiguous()
        runner = graphed(xin, p, h0, c0) if use_graphs and xin.is_cuda else None
        if runner is not None:
            saved, generation = runner.forward(xin, p, h0, c0)
        else:
            saved, generation = triton_lstm.run_sequence(xin, p, h0, c0), 0
        stats.update(saved.statistics())
        # hs is the output: held by ctx as an attribute it would make a reference cycle (hs ->
        # its grad_fn -> ctx -> hs) that only Python's cycle collector frees, so that every
        # sequence's buffers outlive their step until it runs (a GPU then runs out of memory:
        # docs/performance.md). save_for_backward keeps it without the cycle (and checks that
        # it is unmodified).
        ctx.params, ctx.saved, ctx.runner, ctx.generation = p, replace(saved, hs=None), runner, generation
        ctx.save_for_backward(xin, h0, c0, saved.hs)
        return saved.hs, saved.cs[-1].clone()

    @staticmethod
    def backward(ctx, grad_hs, grad_c_last):
        xin, h0, c0, hs = ctx.saved_tensors
        saved = replace(ctx.saved, hs=hs)
        grad_hs, grad_c_last = grad_hs.contiguous(), grad_c_last.contiguous()
        if ctx.runner is not None:
            grads = ctx.runner.backward(grad_hs, grad_c_last, saved, ctx.generation, xin, ctx.params, h0, c0)
        else:
            grads = run_backward(grad_hs, grad_c_last, ctx.params, h0, c0, saved)
        return (grads.xin, grads.weight_hh, grads.gamma_h, grads.gamma_c, grads.beta_c, grads.h0, grads.c0,
                None, None, None)
