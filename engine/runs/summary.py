"""Tables and sentences written from stored runs: the compact comparison and the executive summary."""

from __future__ import annotations

import json
import math

import pandas as pd

from engine.evaluation.paired import PairedChange, paired_change
from engine.methods import Dropping, Quantization, method_named
from engine.runs.record import ACC_PREFIX, CHANGE, CHANGE_HIGH, CHANGE_LOW


def compact_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run, stakeholder columns only: method, series, size, perplexity and change, KL divergence to
    dense and top-token agreement, where the model runs as it is, accuracy, latency."""
    if runs.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "run": runs["id"], "method": runs["method"], "series": runs["series"],
        "preview": runs.get("preview", False),
        "size vs dense (16-bit bytes)": runs.get("metrics.size_fraction"),
        "perplexity": runs.get("metrics.ppl"),
        "95% interval": [_interval(r) for _, r in runs.iterrows()],
        "change vs dense": runs.get("metrics.ppl_change"),
        "change 95% interval (paired)": [_change_interval(r) for _, r in runs.iterrows()],
    })
    if "metrics.kld_mean" in runs and runs["metrics.kld_mean"].notna().any():
        out["KL divergence to dense"] = runs["metrics.kld_mean"]
        out["same top token"] = runs.get("metrics.same_top")
    out["runs in"] = [runs_in(row) for _, row in runs.iterrows()]
    for column in runs.columns:
        if column.startswith(f"metrics.{ACC_PREFIX}"):
            out[f"accuracy {column.removeprefix(f'metrics.{ACC_PREFIX}')}"] = runs[column]
    if "metrics.latency_speedup" in runs:
        out["speed vs dense"] = runs["metrics.latency_speedup"]
    dense = out["method"] == "dense"  # dense against itself: no change, the same speed (not an empty cell)
    out.loc[dense, "change vs dense"] = out.loc[dense, "change vs dense"].fillna(0.0)
    if "KL divergence to dense" in out:
        out.loc[dense, "KL divergence to dense"] = 0.0
        out.loc[dense, "same top token"] = 1.0
    if "speed vs dense" in out:
        out.loc[dense, "speed vs dense"] = out.loc[dense, "speed vs dense"].fillna(1.0)
    return out.sort_values(["method", "size vs dense (16-bit bytes)"], ascending=[True, False])


def runs_in(row: pd.Series) -> str:
    """Where a run's model runs as it is: as recorded, or (runs stored before runs recorded it) as its method
    says from its config; dense: anywhere its family runs."""
    recorded = row.get("config.runs_in")
    if isinstance(recorded, str) and recorded:
        return recorded
    method = method_named(row.get("method"))
    if method is None:
        return "anywhere its family runs" if row.get("method") == "dense" else ""
    config = {k.removeprefix("config."): _value(v) for k, v in row.items() if k.startswith("config.")}
    return method.runs_in({k: v for k, v in config.items() if v is not None})


def _value(cell):
    """A table cell back as its config value (lists and dicts are JSON text in rows; missing ones NaN)."""
    if isinstance(cell, float) and math.isnan(cell):
        return None
    if isinstance(cell, str) and cell[:1] in "[{":
        try:
            return json.loads(cell)
        except ValueError:
            return cell
    return cell


def _interval(row: pd.Series) -> str:
    low, high = row.get("metrics.ci_low"), row.get("metrics.ci_high")
    return f"{low:.3g}–{high:.3g}" if _number(low) and _number(high) else ""


def _change_interval(row: pd.Series) -> str:
    interval = paired_interval(row)
    return "" if interval is None else f"{interval[0]:+.1%} to {interval[1]:+.1%}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MATCH_TOLERANCE = 0.02
"""Runs of two methods are compared only when their sizes differ by at most this (fraction of dense bytes)."""
COST_THRESHOLD = 0.10
"""Default perplexity increase (a fraction: 0.10 = +10%) above which every option is called out as too costly."""


def paired_interval(row) -> tuple[float, float] | None:
    """A run's paired 95% interval of the change against dense (fractions), or ``None`` for runs stored before
    per-window losses were kept.  ``row``: a runs-frame row or a record's metrics dict."""
    get = (lambda k: row.get(f"metrics.{k}")) if isinstance(row, pd.Series) else row.get
    low, high = get(CHANGE_LOW), get(CHANGE_HIGH)
    return (float(low), float(high)) if _number(low) and _number(high) else None


def change_text(row) -> str:
    """``"+4.2% vs dense (95% interval +3.1% to +5.4%)"`` from the paired comparison (just the change where no
    paired interval was stored)."""
    get = (lambda k: row.get(f"metrics.{k}")) if isinstance(row, pd.Series) else row.get
    change = get(CHANGE)
    if not _number(change):
        return "no change against dense stored"
    interval = paired_interval(row)
    if interval is None:
        return f"{change:+.1%} vs dense (no paired interval: stored before per-window losses were kept)"
    return f"{change:+.1%} vs dense (95% interval {interval[0]:+.1%} to {interval[1]:+.1%})"


def within_noise(row) -> bool:
    """The run's paired interval against dense contains 0 (never true without a paired interval)."""
    interval = paired_interval(row)
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def _final_compressed(runs: pd.DataFrame) -> pd.DataFrame:
    final = runs[~runs["preview"].astype(bool)] if "preview" in runs else runs
    needed = [c for c in ("metrics.size_fraction", "metrics.ppl") if c in final]
    if final.empty or len(needed) < 2:
        return final.iloc[0:0]
    return final[final["method"] != "dense"].dropna(subset=needed)


def matched_groups(compressed: pd.DataFrame, tolerance: float = MATCH_TOLERANCE) -> list[pd.DataFrame]:
    """Groups of runs whose sizes lie within ``tolerance`` of each other (smallest first) holding at least two
    methods: the only places where methods are compared."""
    ordered = compressed.sort_values("metrics.size_fraction")
    groups, start = [], 0
    sizes = ordered["metrics.size_fraction"].tolist()
    while start < len(sizes):
        end = start
        while end + 1 < len(sizes) and sizes[end + 1] - sizes[start] <= tolerance + 1e-9:
            end += 1
        group = ordered.iloc[start: end + 1]
        if group["method"].nunique() >= 2:
            groups.append(group)
        start = end + 1
    return groups


def dominated(compressed: pd.DataFrame) -> set[int]:
    """Ids of runs another run beats: smaller and at least as good within this run's paired interval (its
    change is at most this run's upper bound; the plain change where no interval was stored)."""
    out = set()
    for _, run in compressed.iterrows():
        interval = paired_interval(run)
        ceiling = interval[1] if interval is not None else run.get("metrics.ppl_change", run["metrics.ppl"])
        for _, other in compressed.iterrows():
            if other["id"] == run["id"] or other["metrics.size_fraction"] >= run["metrics.size_fraction"]:
                continue
            other_change = other.get("metrics.ppl_change") if interval is not None else \
                other.get("metrics.ppl_change", other["metrics.ppl"])
            if _number(other_change) and _number(ceiling) and other_change <= ceiling:
                out.add(int(run["id"]))
                break
    return out


def _describe(run: pd.Series) -> str:
    series = str(run["series"])  # pages may have prefixed the method already ("quantization · lim 4/3-bit rtn")
    name = series if series.startswith(str(run["method"])) else f"{run['method']} · {series}"
    kld = run.get("metrics.kld_mean")
    return (f"{name} (run {run['id']}, {run['metrics.size_fraction']:.0%} of dense bytes): "
            f"perplexity {run['metrics.ppl']:.2f}, {change_text(run)}"
            + (f", KL divergence to dense {kld:.3f}" if _number(kld) else ""))


def paired_between(a: pd.Series, b: pd.Series) -> PairedChange | None:
    """Change of run ``b`` against run ``a`` from their per-window losses on the same windows, if both have them."""
    nll_a, nll_b = (json.loads(v) if isinstance(v, str) else v
                    for v in (a.get("metrics.window_nll"), b.get("metrics.window_nll")))
    if isinstance(nll_a, list) and isinstance(nll_b, list) and nll_a and len(nll_a) == len(nll_b):
        return paired_change(nll_a, nll_b, int(a["metrics.seqlen"]) - 1)
    return None


def _compare_two(best: pd.Series, second: pd.Series) -> str:
    """Which of two runs at a matched size is better (``best``: the lower perplexity), judged by their paired
    per-window losses when both have them."""
    paired = paired_between(best, second)
    if paired is None:
        return f"{best['method']} has the lower perplexity (no paired interval between them)"
    if paired.within_noise:
        return (f"{best['method']} and {second['method']} cannot be told apart on these windows ({second['method']} "
                f"{paired.text()} against {best['method']})")
    return f"{best['method']} is better ({second['method']} {paired.text()} against it)"


def executive_summary(runs: pd.DataFrame, data_label: str, tolerance: float = MATCH_TOLERANCE,
                      threshold: float = COST_THRESHOLD) -> list[str]:
    """Headline sentences written from the numbers: the dense reference, methods compared only at matched sizes
    (within ``tolerance`` of dense bytes of each other), a recommendation that no stored run dominates and that
    costs at most ``threshold`` (else a plain statement that every option costs more), and caveats.

    ``runs``: one model's runs on one evaluation set (``data_label``); previews are ignored.
    """
    lines: list[str] = []
    final = runs[~runs["preview"].astype(bool)] if "preview" in runs else runs
    dense = final[final["method"] == "dense"]
    compressed = _final_compressed(runs)
    if dense.empty or "metrics.ppl" not in dense:
        lines.append(f"No dense baseline on {data_label} yet: changes against dense cannot be stated.")
    else:
        d = dense.iloc[0]
        lines.append(f"Dense model: perplexity {d['metrics.ppl']:.2f} (95% interval {_interval(d)}) on {data_label}.")
    if compressed.empty:
        lines.append("No compressed runs on these windows yet.")
        return lines
    groups = matched_groups(compressed, tolerance)
    if not groups:
        lines.append(f"No matched sizes yet: no two methods have runs within ±{tolerance * 100:.0f} points of dense "
                     "bytes of each other, so methods are not compared here (runs at matched sizes would let them be).")
    for group in groups:
        best_per_method = group.sort_values("metrics.ppl").groupby("method", sort=False).head(1)
        low, high = group["metrics.size_fraction"].min(), group["metrics.size_fraction"].max()
        span = f"{low:.0%}" if round(low * 100) == round(high * 100) else f"{low:.0%}–{high:.0%}"
        parts = "; ".join(_describe(r) for _, r in best_per_method.iterrows())
        verdict = _compare_two(best_per_method.iloc[0], best_per_method.iloc[1])
        lines.append(f"At {span} of dense bytes (matched within ±{tolerance * 100:.0f} points): {parts}. "
                     f"{verdict[0].upper()}{verdict[1:]}.")
    beaten = dominated(compressed)
    candidates = compressed[~compressed["id"].astype(int).isin(beaten)]
    changes = candidates.get("metrics.ppl_change", pd.Series(float("nan"), index=candidates.index))
    affordable = candidates[changes.notna() & (changes <= threshold)]
    if changes.isna().all():
        lines.append("No recommendation: no run has a change against dense on these windows.")
    elif affordable.empty:
        least = compressed.sort_values("metrics.ppl_change").iloc[0]
        lines.append(f"Every compressed option here costs more than {threshold:+.0%} perplexity; none is within the "
                     f"threshold (the least costly: {_describe(least)}). Try milder settings, or raise the threshold "
                     "if that cost is acceptable.")
    else:
        pick = affordable.sort_values(["metrics.size_fraction", "metrics.ppl"]).iloc[0]
        lines.append(f"Recommended: {_describe(pick)}: the smallest stored run within {threshold:+.0%} perplexity "
                     "that no other run dominates.")
    if beaten:
        named = ", ".join(f"run {i}" for i in sorted(beaten))
        lines.append(f"Not recommended: {named}, because another run is smaller and at least as good"
                     + (" as each." if len(beaten) > 1 else "."))
    noisy = [int(r["id"]) for _, r in compressed.iterrows() if within_noise(r)]
    windows = runs["data.n_windows"].dropna().iloc[0] \
        if "data.n_windows" in runs and runs["data.n_windows"].notna().any() else "?"
    caveat = (f"Caveats: perplexity on {windows} evaluation windows ({data_label}); changes against dense are paired "
              "over the same windows, with 95% bootstrap intervals")
    if noisy:
        caveat += f"; for run(s) {', '.join(map(str, noisy))} the interval contains 0, so the change is within noise"
    lines.append(caveat + ". Sizes count unquantized parts at 16 bits; dense is the same model at 16 bits.")
    return lines


def run_warnings(record) -> list[str]:
    """Where a stored run loses or cannot be trusted: bigger or slower than dense, within noise, a preview."""
    m, warnings = record.metrics, list(record.config.get("warnings") or [])
    if _number(m.get("size_fraction")) and m["size_fraction"] > 1.0:
        warnings.append(f"This model is larger than dense ({m['size_fraction']:.2f}× the 16-bit bytes): "
                        "the shortcut matrices and untied head outweigh what was removed. "
                        "Slice more, or use another method.")
    if _number(m.get("latency_speedup")) and m["latency_speedup"] < 1.0:
        warnings.append(f"This model ran slower than dense ({m['latency_speedup']:.2f}× speed, median of 3 forwards"
                        " on one window; CPU timings on a shared machine are noisy).")
    if within_noise(m):
        warnings.append(f"Change vs dense {change_text(m)}: the paired interval contains 0, so the difference is "
                        "within the noise of these windows. Evaluate on more windows to tell them apart.")
    if record.config.get("preview"):
        windows = record.data.get("n_windows")
        warnings.append(f"Preview on {windows} windows: a quick look, noisy. Compare it only with dense on the same "
                        "windows (shown), and run the full evaluation before deciding.")
    if record.data.get("task_error"):
        warnings.append(f"Zero-shot accuracy was not measured: {record.data['task_error']}")
    return warnings


def quantization_vs_dropping(runs: pd.DataFrame, tolerance: float = MATCH_TOLERANCE) -> str:
    """The layer-wise quantization paper's claim, tested on these runs (one model, one evaluation set):
    "at equal size, quantizing to lower bits beats dropping, unless the quantization is 2-bit".

    Every dropping run is compared with the best quantization run whose size is within ``tolerance`` of it
    (either side); a difference the paired interval cannot tell from 0 counts as a tie.
    """
    final = _final_compressed(runs)
    dropping = final[final["method"] == Dropping.name] if not final.empty else final
    quant = final[final["method"] == Quantization.name] if not final.empty else final
    if dropping.empty or quant.empty:
        return "Not enough runs to test the claim: run dropping and quantization at similar sizes."
    wins, losses, ties, two_bit_losses = [], [], [], []
    for _, drop in dropping.iterrows():
        near = quant[(quant["metrics.size_fraction"] - drop["metrics.size_fraction"]).abs() <= tolerance + 1e-9]
        if near.empty:
            continue
        best = near.sort_values("metrics.ppl").iloc[0]
        entry = (best, drop)
        paired = paired_between(best, drop)
        if paired is not None and paired.within_noise:
            ties.append(entry)
        elif best["metrics.ppl"] < drop["metrics.ppl"]:
            wins.append(entry)
        else:
            losses.append(entry)
            if best.get("config.low_bits") == 2:
                two_bit_losses.append(entry)
    matched = len(wins) + len(losses) + len(ties)
    if not matched:
        return (f"No matched sizes yet: no quantization run within ±{tolerance * 100:.0f} points of dense bytes of a "
                "dropping run. Run the matched-size sweep.")
    tie_text = f", {len(ties)} within noise" if ties else ""
    if not losses:
        return (f"Holds here: quantization beats dropping at {len(wins)} of {matched} matched sizes{tie_text} "
                f"(e.g. {_pair(wins[0] if wins else ties[0])}).")
    verdict = "Holds except with 2-bit quantization" if len(two_bit_losses) == len(losses) else "Does not hold here"
    return (f"{verdict}: dropping wins at {len(losses)} of {matched} matched sizes{tie_text} "
            f"(e.g. {_pair(losses[0])}).")


def _pair(entry) -> str:
    quant, drop = entry
    return (f"quantization {quant['series']} at {quant['metrics.size_fraction']:.0%} of dense bytes, perplexity "
            f"{quant['metrics.ppl']:.1f}, vs dropping {drop['series']} at {drop['metrics.size_fraction']:.0%}, "
            f"{drop['metrics.ppl']:.1f}")
