"""``bnrnn bench``: training-step and inference timings of our LSTM paths against ``torch.nn.LSTM``.

Everything is measured side by side in one process: the models are timed round-robin (one
step of each in turn, repeated), so a slower or busier machine shifts all of them alike and
the printed *ratios* are what to compare across machines. Each ratio is the median over
rounds of the two models' times within one round; the times are the medians. A training step is the layer's
forward and backward over a whole (T, B, I) batch with a fixed random projection of every
output as the loss: the part of a step that differs between the models.

Before timing, a numerics check holds the fast paths to the plain reference at the same
shapes (outputs, every gradient, the population statistics; folded against unfolded
inference); the command exits with status 1 when it fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.bench_models import (LOW_PRECISION, MODELS, SHAPES, Shape, build, parse_shape, training_step,
                                 variants)
from bnrnn.nn import LSTMLayer
from bnrnn.nn.workspace import WORKSPACE
from bnrnn.allocator import proc_status_kib, release_freed_memory, steady_allocator
from bnrnn.bench_report import BASES, format_report

TOLERANCE = 1e-5  # max |fast - reference| / max |reference| per tensor, our paths against our reference
# Our vanilla LSTM against torch.nn.LSTM: another library's float32 summation order, over up to
# 784 steps (the differences seen on each device: docs/performance.md).
TORCH_TOLERANCE = 5e-5
# bf16 keeps 8 bits of mantissa: the relative error of a product is about 2^-9, and the
# recurrence carries it from step to step.
BF16_TOLERANCE = 5e-2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable in each of ``repeats`` rounds (after ``warmup`` untimed ones),
    every round running each callable once in turn: {name: [round 0, round 1, ...]}."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratios(samples: dict[str, list[float]], bases: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{name: {base: ratio}}: the median over rounds of name's time over base's time in the
    same round, for each base timed in the same rounds. Models in one round see the same
    machine state, so the per-round ratio cancels the slow swings of a shared VM that a
    ratio of two medians taken over different moments keeps."""
    return {name: {base: statistics.median(a / b for a, b in zip(times, samples[base]))
                   for base in bases if base in samples}
            for name, times in samples.items()}


# -- numerics -----------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def compare_training(fast: LSTMLayer, ref: LSTMLayer, x: torch.Tensor, weight: torch.Tensor) -> dict[str, float]:
    """Largest relative error of outputs, gradients and buffers of one training step.

    ``ref`` runs in its own dtype (the check passes a float64 copy of the reference: the
    gamma gradients are sums over up to 784 steps with much cancellation, and a float32
    reference's own rounding there is as large as the tolerance).

    Both start from the same random per-example state: the learned h0 is the same for every
    example, so W_h h0 has zero batch variance, BN_h removes it and its true gradient is
    exactly 0; what either path computes for it is rounding noise, with nothing to compare.
    """
    g = torch.Generator().manual_seed(2)
    state = tuple(torch.randn(x.shape[1], fast.hidden_size, generator=g).to(x.device, fast.weight_hh.dtype) for _ in range(2))
    dtype = ref.weight_hh.dtype
    out_f = training_step(fast, x.to(fast.weight_hh.dtype), weight.to(fast.weight_hh.dtype), state)
    out_r = training_step(ref, x.to(dtype), weight.to(dtype), tuple(s.to(dtype) for s in state))
    errors = {"output": relative_error(out_f, out_r)}
    for (name, p_f), (_, p_r) in zip(fast.named_parameters(), ref.named_parameters()):
        if p_r.grad is not None:
            errors["grad " + name] = relative_error(p_f.grad, p_r.grad)
    for (name, b_f), (_, b_r) in zip(fast.named_buffers(), ref.named_buffers()):
        if b_r.is_floating_point():
            errors[name] = relative_error(b_f, b_r)
    return errors


def numerics_check(shape: Shape, device: torch.device) -> list[tuple[str, float, float]]:
    """(what, worst relative error, tolerance) for each fast path against its reference at this shape."""
    x = shape.inputs(device)
    weight = torch.randn(shape.T, shape.B, shape.H, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    # Our vanilla path against torch.nn.LSTM with the same weights.
    ours = build("ours vanilla", shape, device)
    torch_lstm = build("nn.LSTM", shape, device)
    with torch.no_grad():
        torch_lstm.weight_ih_l0.copy_(ours.weight_ih)
        torch_lstm.weight_hh_l0.copy_(ours.weight_hh)
        torch_lstm.bias_ih_l0.copy_(ours.bias)
        torch_lstm.bias_hh_l0.zero_()
    out_ours = training_step(ours, x, weight)
    # cuDNN's LSTM runs its products in TF32 by default (1e-4 relative error): compare in full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out_torch = training_step(torch_lstm, x, weight)
    worst = max(relative_error(out_ours, out_torch), relative_error(ours.weight_hh.grad, torch_lstm.weight_hh_l0.grad),
                relative_error(ours.weight_ih.grad, torch_lstm.weight_ih_l0.grad))
    results.append(("ours vanilla vs nn.LSTM (output, weight grads)", worst, TORCH_TOLERANCE))
    # The fast paths (float32) against the step-by-step reference in float64.
    for model in ("ours vanilla", "BN-input", *(m for m in variants(device) if "no graphs" not in m), "LN-LSTM",
                  "BN-LSTM"):  # the BN-LSTM last: its population is used below
        fast = build(model, shape, device).train()
        # The LN-LSTM in float64 too: with gains of 1 (not BN's 0.1) the recurrence amplifies
        # rounding, and over seqMNIST's 784 steps the float32 reference itself ends 5e-2 away
        # from the float64 one (docs/performance.md), whatever the implementation.
        precision = "float64" if model == "LN-LSTM" else "fast"
        if model == "LN-LSTM":
            fast.double()
        ref = copy.deepcopy(fast).double()
        ref.backend, ref.autocast_dtype = "reference", None
        errors = compare_training(fast, ref, x, weight)
        worst = max(errors, key=errors.get)
        tolerance = BF16_TOLERANCE if model in LOW_PRECISION else TOLERANCE
        results.append((f"{model} {precision} vs float64 reference (output, grads, population; worst: {worst})",
                        errors[worst], tolerance))
    # Folded inference against the unfolded reference, with the population from the step above.
    fast.eval()
    ref.eval()
    with torch.no_grad():
        out_folded, _ = fast(x)
        out_plain, _ = ref(x.double())
    results.append(("BN-LSTM folded vs unfolded inference", relative_error(out_folded, out_plain), TOLERANCE))
    return results


# -- memory -------------------------------------------------------------------------------------


def peak_memory_mb(model: str, shape: Shape, device: torch.device) -> float | None:
    """Peak memory of one training step above what was in use before it, in MB (None if
    this system cannot say).

    CUDA: the caching allocator's peak. CPU: the peak resident set (VmHWM), reset through
    /proc/self/clear_refs just before the step (Linux).
    """
    layer = build(model, shape, device)
    x = shape.inputs(device)
    weight = torch.randn(shape.T, shape.B, shape.H).to(device)
    training_step(layer, x, weight)  # allocator and library warm-up
    for p in layer.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        training_step(layer, x, weight)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        # Measure a first step: drop the buffers the fast path keeps between steps, so that
        # their allocation is counted (in a training run they stay allocated throughout).
        WORKSPACE.clear()
        release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = proc_status_kib("VmRSS")
        training_step(layer, x, weight)
        return (proc_status_kib("VmHWM") - base) / 1024
    except OSError:
        return None


# -- the report ---------------------------------------------------------------------------------


def bench_shape(shape: Shape, models: list[str], device: torch.device, warmup: int, repeats: int) -> dict:
    x = shape.inputs(device)
    weight = torch.randn(shape.T, shape.B, shape.H, generator=torch.Generator().manual_seed(1)).to(device)
    layers = {name: build(name, shape, device).train() for name in models}
    steps = {name: (lambda l=layer: training_step(l, x, weight)) for name, layer in layers.items()}
    # The step-by-step reference is timed in a round of its own after the others: its
    # gigabyte of per-step allocations, freed between turns, slowed whichever model ran next
    # by up to 2x in a shared round.
    reference = {name: steps.pop(name) for name in list(steps) if "reference" in name}
    samples = time_round_robin(steps, device, warmup, repeats)
    train, ratios = medians(samples), paired_ratios(samples, BASES)
    train.update(medians(time_round_robin(reference, device, warmup, repeats)))
    # Inference with population statistics: folded fast path, unfolded reference, nn.LSTM.
    infer_layers = {"nn.LSTM": layers.get("nn.LSTM") or build("nn.LSTM", shape, device)}
    folded = build("BN-LSTM", shape, device).eval()
    unfolded = copy.deepcopy(folded)
    unfolded.backend = "reference"
    infer_layers["BN-LSTM folded"] = folded
    infer_layers["BN-LSTM unfolded"] = unfolded

    def infer(layer: nn.Module) -> None:
        with torch.no_grad():
            layer(x)

    samples = time_round_robin({name: (lambda l=layer: infer(l)) for name, layer in infer_layers.items()},
                               device, warmup, repeats)
    return {"shape": shape.__dict__, "train_s": train, "train_ratios": ratios, "inference_s": medians(samples),
            "inference_ratios": paired_ratios(samples, ("nn.LSTM", "BN-LSTM unfolded")), "peak_mb": {}}


def cpu_gemms() -> str:
    """Which GEMMs the compiled CPU loops use here: the ratios depend on it (on an AMD CPU
    torch's MKL runs its AVX2 code, the extension's own kernel AVX-512)."""
    if not cpu_extension.load():
        return "compiled loops unavailable (aten backend)"
    return "loops' float32 GEMMs: bnrnn's AVX-512 kernel" if cpu_extension.own_gemm() else "loops' GEMMs: torch's BLAS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnrnn bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", dest="shapes", action="append", type=parse_shape,
                        help="seqmnist (T=784, I=1, H=100, B=64), ptb (T=100, I=50 one-hot, H=1000, B=64) "
                             "or T,I,H,B; repeatable (default: both presets)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--reference", action="store_true",
                        help="also time the step-by-step references of the BN-LSTM and the LN-LSTM")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    shapes = args.shapes or list(SHAPES.values())
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but PyTorch sees no CUDA device")
    models = [m for m in MODELS if args.reference or not m.endswith(" reference")]
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        allocator = "glibc allocator held steady" if steady_allocator() else "default allocator"
        where = f"CPU, {torch.get_num_threads()} threads, {allocator}, {cpu_gemms()}"
    header = (f"bnrnn bench: torch {torch.__version__}, {where}; forward + backward per training step, "
              f"median of {args.repeats} after {args.warmup} warm-up, models timed round-robin "
              "(the reference in a round of its own); ratios: the median of the per-round ratios")
    print(header, flush=True)
    checks, results = [], []
    # Each shape is checked and timed before the next one's models run: at PTB's size the
    # CPU path packs W_h for oneDNN, and once oneDNN has run, libgomp lets torch's threads
    # sleep between parallel regions, which slowed the seqMNIST GEMMs that came after by ~25%.
    for shape in shapes:
        for what, err, tolerance in numerics_check(shape, device):
            checks.append((shape.name, what, err, tolerance))
        print(f"timing {shape} ...", flush=True)
        results.append(bench_shape(shape, models + list(variants(device)), device, args.warmup, args.repeats))
    if not args.no_memory:
        # After every timing: measuring CPU memory changes the allocator's settings.
        for shape, result in zip(shapes, results):
            result["peak_mb"] = {name: peak_memory_mb(name, shape, device)
                                 for name in models + list(variants(device))}
    print(format_report(results, checks, ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results, "numerics": checks}, f, indent=2)
    failed = [c for c in checks if not c[2] <= c[3]]
    if failed:
        print(f"bnrnn bench: numerics check failed for {len(failed)} comparison(s); the timings above are not valid",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
