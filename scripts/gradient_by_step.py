#!/usr/bin/env python3
"""Where a sequence classifier's gradient comes from, step by step, at one of its checkpoints.

    scripts/gradient_by_step.py RUN [--checkpoint best|last] [--batches 3] [--epoch 11]

For a few training batches, on the reference backend in training mode: the total gradient
norm, ||dL/dh_t|| (the gradient reaching the hidden state of step t) at chosen steps, and the
largest backward gain gamma / std of BN_h and BN_c over the features at those steps. An
exploding run shows ||dL/dh_t|| growing towards t = 0 (docs/results/full-length.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bnrnn.checkpoint import load_checkpoint
from bnrnn.config import read_run_config, load_config
from bnrnn.nn.reference import reference_forward
from bnrnn.tasks import build_task

STEPS = (0, 1, 5, 10, 20, 40, 70, 100, 200, 300, 500, 783)


def largest_gain(records: list[float]):
    def hook(module, args, output):
        std = (args[0].detach().var(0, unbiased=False) + module.eps).sqrt()
        records.append((module.weight.detach().abs() / std).max().item())
    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", default="last", choices=("best", "last"))
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--epoch", type=int, default=0, help="the epoch whose first batches to use")
    args = parser.parse_args()

    cfg = load_config(read_run_config(args.run, "gradient_by_step"))
    task = build_task(cfg)
    model = task.build_model(cfg.model)
    payload = load_checkpoint(args.run / "checkpoints" / f"{args.checkpoint}.pt")
    model.load_state_dict(payload["model"])
    layer = model.rnn.cells[0]  # the first (for seqMNIST: the only) layer
    gains = {"h": [], "c": []}
    for term, bn in (("h", layer.norm_h), ("c", layer.norm_c)):
        if bn is not None and bn.keeps_population:
            bn.register_forward_hook(largest_gain(gains[term]))
    print(f"{args.run} {args.checkpoint}.pt, step {payload['progress']['step']}")
    torch.manual_seed(cfg.seed)
    model.train()
    for k, (x, y) in enumerate(task.train.iterate(args.epoch, cfg.seed)):
        if k == args.batches:
            break
        states: list[torch.Tensor] = []
        for records in gains.values():
            records.clear()

        def keep(t: int, h: torch.Tensor) -> None:
            h.retain_grad()
            states.append(h)

        _, (h_last, _) = reference_forward(layer, x, step_hook=keep)
        loss = F.cross_entropy(model.classifier(h_last), y)
        model.zero_grad()
        loss.backward()
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        print(f"batch {k}: loss {loss.item():.3f}, gradient norm {total.item():.3g}")
        print("      t  ||dL/dh_t||  max gain BN_h  max gain BN_c")
        for t in (t for t in STEPS if t < len(states)):
            row = [f"{states[t].grad.norm().item():11.3g}"]
            row += [f"{gains[term][t]:13.3g}" if len(gains[term]) > t else f"{'-':>13}" for term in ("h", "c")]
            print(f"  {t:5d}  " + "  ".join(row))


if __name__ == "__main__":
    main()
