"""Tables and sentences written from stored runs: the compact comparison and the executive summary."""

from __future__ import annotations

import math

import pandas as pd

from engine.runs.record import ACC_PREFIX

SIZE_TARGETS = (0.9, 0.75, 0.6, 0.5)


def compact_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run, stakeholder columns only: method, series, size, perplexity and change, accuracy, latency."""
    if runs.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "run": runs["id"], "method": runs["method"], "series": runs["series"],
        "preview": runs.get("preview", False),
        "size vs dense (16-bit bytes)": runs.get("metrics.size_fraction"),
        "perplexity": runs.get("metrics.ppl"),
        "95% interval": [_interval(r) for _, r in runs.iterrows()],
        "change vs dense": runs.get("metrics.ppl_change"),
    })
    for column in runs.columns:
        if column.startswith(f"metrics.{ACC_PREFIX}"):
            out[f"accuracy {column.removeprefix(f'metrics.{ACC_PREFIX}')}"] = runs[column]
    if "metrics.latency_speedup" in runs:
        out["speed vs dense"] = runs["metrics.latency_speedup"]
    dense = out["method"] == "dense"  # dense against itself: no change, the same speed (not an empty cell)
    out.loc[dense, "change vs dense"] = out.loc[dense, "change vs dense"].fillna(0.0)
    if "speed vs dense" in out:
        out.loc[dense, "speed vs dense"] = out.loc[dense, "speed vs dense"].fillna(1.0)
    return out.sort_values(["method", "size vs dense (16-bit bytes)"], ascending=[True, False])


def _interval(row: pd.Series) -> str:
    low, high = row.get("metrics.ci_low"), row.get("metrics.ci_high")
    return f"{low:.3g}–{high:.3g}" if _number(low) and _number(high) else ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def executive_summary(runs: pd.DataFrame, data_label: str, targets=SIZE_TARGETS) -> list[str]:
    """Headline sentences: dense reference, best run per method within each size target, recommendation, caveats.

    ``runs``: one model's runs on one evaluation set (``data_label``); previews are ignored.
    """
    lines: list[str] = []
    final = runs[~runs["preview"].astype(bool)] if "preview" in runs else runs
    dense = final[final["method"] == "dense"]
    compressed = final[(final["method"] != "dense") & final.get("metrics.size_fraction", pd.Series(dtype=float)).notna()
                       & final.get("metrics.ppl", pd.Series(dtype=float)).notna()] if not final.empty else final
    if dense.empty or "metrics.ppl" not in dense:
        lines.append(f"No dense baseline on {data_label} yet: changes against dense cannot be stated.")
        dense_ppl = None
    else:
        d = dense.iloc[0]
        dense_ppl = float(d["metrics.ppl"])
        lines.append(f"Dense model: perplexity {dense_ppl:.2f} (95% interval {_interval(d)}) on {data_label}.")
    if compressed.empty:
        lines.append("No compressed runs on these windows yet.")
        return lines
    best_overall = None
    per_target: dict[str, list[float]] = {}
    for target in targets:
        fitting = compressed[compressed["metrics.size_fraction"] <= target + 1e-9]
        if fitting.empty:
            per_target.setdefault("no run yet", []).append(target)
            continue
        parts = []
        for method, group in fitting.groupby("method"):
            best = group.sort_values("metrics.ppl").iloc[0]
            parts.append(f"{method} best is {best['series']} (run {best['id']}, {best['metrics.size_fraction']:.0%} "
                         f"size): perplexity {best['metrics.ppl']:.2f}" + _change(best, dense_ppl))
        winner = fitting.sort_values("metrics.ppl").iloc[0]
        if best_overall is None:
            best_overall = (target, winner)
        per_target.setdefault("; ".join(parts), []).append(target)
    for text, sizes in per_target.items():  # targets with the same best runs share one line
        lines.append(f"At ≤ {', '.join(f'{t:.0%}' for t in sizes)} of dense bytes: {text}.")
    if best_overall is not None:
        target, winner = best_overall
        lines.append(f"Recommended at ≤ {target:.0%} of dense size: {winner['method']} · {winner['series']} "
                     f"(run {winner['id']}), perplexity {winner['metrics.ppl']:.2f}{_change(winner, dense_ppl)}.")
    overlapping = compressed[compressed.get("metrics.ci_overlaps_dense", pd.Series(False, index=compressed.index))
                             .fillna(False).astype(bool)]
    windows = runs["data.n_windows"].dropna().iloc[0] if "data.n_windows" in runs and runs["data.n_windows"].notna().any() else "?"
    caveat = (f"Caveats: perplexity on {windows} evaluation windows ({data_label}); intervals are bootstrap 95% "
              "over windows")
    if not overlapping.empty:
        caveat += f"; {len(overlapping)} run(s) overlap the dense interval, so their difference from dense is within noise"
    lines.append(caveat + ". Sizes count unquantized parts at 16 bits; dense is the same model at 16 bits.")
    return lines


def _change(row: pd.Series, dense_ppl: float | None) -> str:
    if dense_ppl is None or not _number(row.get("metrics.ppl")):
        return ""
    return f" ({row['metrics.ppl'] / dense_ppl - 1:+.1%} vs dense)"


def run_warnings(record) -> list[str]:
    """Where a stored run loses or cannot be trusted: bigger or slower than dense, within noise, a preview."""
    m, warnings = record.metrics, list(record.config.get("warnings") or [])
    if _number(m.get("size_fraction")) and m["size_fraction"] > 1.0:
        warnings.append(f"This model is larger than dense ({m['size_fraction']:.2f}× the 16-bit bytes): "
                        "the shortcut matrices and untied head outweigh what was removed. Slice more, or use another method.")
    if _number(m.get("latency_speedup")) and m["latency_speedup"] < 1.0:
        warnings.append(f"This model ran slower than dense ({m['latency_speedup']:.2f}× speed, median of 3 forwards"
                        " on one window; CPU timings on a shared machine are noisy).")
    if m.get("ci_overlaps_dense"):
        warnings.append(f"Its 95% interval ({m.get('ci_low', 0):.2f}–{m.get('ci_high', 0):.2f}) overlaps dense's: "
                        "the difference is within the noise of these windows. Evaluate on more windows to tell them apart.")
    if record.config.get("preview"):
        windows = record.data.get("n_windows")
        warnings.append(f"Preview on {windows} windows: a quick look, noisy. Compare it only with dense on the same "
                        "windows (shown), and run the full evaluation before deciding.")
    if record.data.get("task_error"):
        warnings.append(f"Zero-shot accuracy was not measured: {record.data['task_error']}")
    return warnings


def quantization_vs_dropping(runs: pd.DataFrame, tolerance: float = 0.02) -> str:
    """The layer-wise quantization paper's claim, tested on these runs (one model, one evaluation set):
    "at equal size, quantizing to lower bits beats dropping, unless the quantization is 2-bit".

    For every dropping run, the best quantization run at most ``tolerance`` larger is compared with it.
    """
    final = runs[~runs["preview"].astype(bool)] if "preview" in runs else runs
    if "metrics.size_fraction" not in final or "metrics.ppl" not in final:
        return "Not enough runs to test the claim: run dropping and quantization at similar sizes."
    final = final.dropna(subset=["metrics.size_fraction", "metrics.ppl"])
    dropping = final[final["method"] == "dropping"]
    quant = final[final["method"] == "quantization"]
    if dropping.empty or quant.empty:
        return "Not enough runs to test the claim: run dropping and quantization at similar sizes."
    two_bit = quant.get("config.low_bits", pd.Series(index=quant.index, dtype=float)) == 2
    wins, losses, ties = [], [], []
    for _, drop in dropping.iterrows():
        near = quant[quant["metrics.size_fraction"] <= drop["metrics.size_fraction"] + tolerance]
        if near.empty:
            continue
        best = near.sort_values("metrics.ppl").iloc[0]
        entry = (drop["metrics.size_fraction"], best, drop)
        (wins if best["metrics.ppl"] < drop["metrics.ppl"] else losses).append(entry)
        if bool(two_bit.get(best.name, False)):
            ties.append(entry)
    if not wins and not losses:
        return "Not enough runs at matched sizes: no quantization run is as small as a dropping run."
    if not losses:
        return (f"Holds here: at all {len(wins)} matched sizes quantization beats dropping "
                f"(e.g. {_pair(wins[0])}).")
    non_two_bit_losses = [e for e in losses if e not in ties]
    verdict = "Does not hold here" if non_two_bit_losses else "Holds except with 2-bit quantization"
    return (f"{verdict}: dropping wins at {len(losses)} of {len(wins) + len(losses)} matched sizes "
            f"(e.g. {_pair(losses[0])}).")


def _pair(entry) -> str:
    size, quant, drop = entry
    return (f"at {size:.0%} of dense bytes, {quant['series']} {quant['metrics.ppl']:.1f} vs "
            f"{drop['series']} {drop['metrics.ppl']:.1f}")
