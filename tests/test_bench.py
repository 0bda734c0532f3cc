"""`bnrnn bench`: it runs end to end on a tiny shape, and its numerics check can fail."""

import pytest
import torch

from bnrnn import bench, bench_report
from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.kernels.cpu import recurrence as cpu_recurrence
from bnrnn.nn import aten_recurrence


def test_bench_prints_every_model_and_passes_its_numerics_check(capsys, tmp_path):
    status = bench.main(["--shape", "12,3,8,6", "--repeats", "1", "--warmup", "0", "--reference", "--device", "cpu",
                         "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    for model in ("nn.LSTM", "ours vanilla", "BN-input", "BN-LSTM", "BN-LSTM reference", "BN-LSTM, aten backend",
                  "LN-LSTM", "LN-LSTM reference", "BN-LSTM, bf16 GEMMs"):
        assert f"| 12,3,8,6 | {model} |" in out
    for row in ("BN-LSTM folded", "BN-LSTM unfolded"):
        assert f"| 12,3,8,6 | {row} |" in out
    assert "FAIL" not in out and out.count("  ok   12,3,8,6") == 8
    assert "ok   12,3,8,6: BN-LSTM, bf16 GEMMs fast vs float64 reference" in out and "(tolerance 0.05)" in out
    assert "ok   12,3,8,6: BN-LSTM, aten backend fast vs float64 reference" in out
    assert "ok   12,3,8,6: LN-LSTM float64 vs float64 reference" in out
    # ratios are relative to nn.LSTM's own row
    assert "| 12,3,8,6 | nn.LSTM |" in out and "| 1.00 |" in out
    assert (tmp_path / "bench.json").stat().st_size > 0


@pytest.mark.parametrize("module, forward", [(cpu_recurrence, "run_forward"), (aten_recurrence, "recurrence_forward")],
                         ids=["compiled", "aten"])
def test_bench_exits_1_when_the_fast_path_disagrees_with_the_reference(monkeypatch, capsys, module, forward):
    real_forward = getattr(module, forward)

    def off_by_a_little(*args, **kwargs):
        hs, cs, stats = real_forward(*args, **kwargs)
        return hs * (1 + 1e-3), cs, stats

    monkeypatch.setattr(module, forward, off_by_a_little)
    if module is aten_recurrence:  # auto runs the aten backend where the compiled loops are unavailable
        monkeypatch.setattr(cpu_extension, "_loaded", False)
    # on the CPU: that is the path perturbed here (a GPU runs the Triton kernels)
    status = bench.main(["--shape", "12,3,8,6", "--repeats", "1", "--warmup", "0", "--no-memory", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 1
    assert "FAIL 12,3,8,6: BN-LSTM fast vs float64 reference" in captured.out
    assert "numerics check failed" in captured.err


def test_cpu_peak_memory_grows_with_the_sequence_length():
    short = bench.peak_memory_mb("BN-LSTM", bench.Shape("s", 50, 1, 64, 32), torch.device("cpu"))
    long = bench.peak_memory_mb("BN-LSTM", bench.Shape("l", 400, 1, 64, 32), torch.device("cpu"))
    if short is None:
        pytest.skip("this system has no /proc/self/clear_refs to reset the peak RSS")
    # saved activations are linear in T: ~8x, allow for allocator slack
    assert long > 4 * short > 0


def test_custom_shape_parsing():
    assert bench.parse_shape("ptb") == bench.SHAPES["ptb"]
    assert bench.parse_shape("5,2,3,4") == bench.Shape("5,2,3,4", 5, 2, 3, 4)


def test_ratios_pair_the_models_within_each_round():
    """The machine turns 3x slower in round 2, between nn.LSTM's turn and ours, and stays
    slow: every round but that one shows our true 1.2x, so the median per-round ratio is 1.2,
    where the ratio of the medians (3.6 / 1.0) would report 3.6x."""
    samples = {"nn.LSTM": [1.0, 1.0, 1.0, 3.0, 3.0], "ours vanilla": [1.2, 1.2, 3.6, 3.6, 3.6]}
    assert bench.medians(samples)["ours vanilla"] / bench.medians(samples)["nn.LSTM"] == pytest.approx(3.6)
    ratios = bench.paired_ratios(samples, bench.BASES)
    assert ratios["ours vanilla"] == pytest.approx({"nn.LSTM": 1.2, "ours vanilla": 1.0})
    assert ratios["nn.LSTM"]["ours vanilla"] == pytest.approx(1 / 1.2)
    result = {"train_s": {**bench.medians(samples), "reference": 5.0}, "train_ratios": ratios}
    assert bench_report.ratio_text(result, "train", "ours vanilla", "nn.LSTM") == "1.20"
    # A row timed in rounds of its own (the reference) falls back to the ratio of medians.
    assert bench_report.ratio_text(result, "train", "reference", "nn.LSTM") == "5.00"


def test_the_header_says_which_gemms_the_cpu_loops_use():
    """The CPU ratios depend on who computes the loops' GEMMs (on an AMD CPU torch's MKL runs
    its AVX2 code): the header names the extension's own kernel or torch's BLAS."""
    if not cpu_extension.load():
        assert bench.cpu_gemms() == "compiled loops unavailable (aten backend)"
        return
    with cpu_extension.gemm_limit("blas"):
        assert bench.cpu_gemms() == "loops' GEMMs: torch's BLAS"
    expected = "bnrnn's AVX-512 kernel" if cpu_extension.own_gemm() else "torch's BLAS"
    assert bench.cpu_gemms().endswith(expected)
