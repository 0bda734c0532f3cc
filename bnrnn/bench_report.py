"""``bnrnn bench``'s results as a Markdown table, with the numerics check."""

from __future__ import annotations

BASES = ("nn.LSTM", "ours vanilla")  # what each model's time is divided by


def ratio_text(result: dict, kind: str, name: str, base: str) -> str:
    """name's time relative to base's, as printed: the paired per-round ratio where both ran
    in the same rounds, else (the reference, timed in rounds of its own) the ratio of medians."""
    paired = result.get(f"{kind}_ratios", {}).get(name, {})
    if base in paired:
        return f"{paired[base]:.2f}"
    times = result[f"{kind}_s"]
    return f"{times[name] / times[base]:.2f}" if times.get(base) else "-"


def format_report(results: list[dict], checks: list[tuple[str, str, float, float]], header: str) -> str:
    lines = [header, ""]
    lines += ["| shape | model | train step (ms) | / nn.LSTM | / ours vanilla | peak memory (MB) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for name, seconds in r["train_s"].items():
            ratios = " | ".join(ratio_text(r, "train", name, base) for base in BASES)
            peak = r["peak_mb"].get(name)
            peak_text = f"{peak:.0f}" if peak is not None else "n/a"
            lines.append(f"| {r['shape']['name']} | {name} | {seconds * 1e3:.1f} | {ratios} | {peak_text} |")
    lines += ["", "| shape | inference, no grad | time (ms) | / nn.LSTM | / unfolded |", "|---|---|---:|---:|---:|"]
    for r in results:
        inf = r["inference_s"]
        for name, seconds in inf.items():
            ratios = " | ".join(ratio_text(r, "inference", name, base) for base in ("nn.LSTM", "BN-LSTM unfolded"))
            lines.append(f"| {r['shape']['name']} | {name} | {seconds * 1e3:.1f} | {ratios} |")
    lines += ["", "numerics (max |fast - reference| / max |reference|):"]
    for shape, what, err, tolerance in checks:
        lines.append(f"  {'ok  ' if err <= tolerance else 'FAIL'} {shape}: {what}: {err:.2e} (tolerance {tolerance:g})")
    return "\n".join(lines)
