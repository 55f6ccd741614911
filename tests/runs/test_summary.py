"""Every summary sentence against hand-built stores: matched sizes only, paired intervals, dominated runs,
a threshold on cost, and the quantization-vs-dropping verdict."""

from __future__ import annotations

import math

import pytest
import torch

from engine.evaluation.paired import paired_change
from engine.runs.record import RunRecord
from engine.runs.summary import (
    dominated,
    executive_summary,
    matched_groups,
    quantization_vs_dropping,
    run_warnings,
)

SEQLEN = 129  # 128 scored tokens per window
LABEL = "wiki-offline evaluation, 8 windows × 129 tokens"
DATA = {"source": "wiki-offline", "split": "evaluation", "n_windows": 8, "seqlen": SEQLEN, "label": LABEL}
DENSE_NLL = [2.0 + 0.4 * math.sin(i) for i in range(8)]  # nats per token, hard and easy windows


def _add(store, method: str, series: str, size: float, shift: float, noise: float = 0.0, low_bits=None) -> int:
    """A run whose per-token NLL is dense's plus ``shift`` (plus ``noise`` alternating per window)."""
    per_token = [d + shift + (noise if i % 2 else -noise) for i, d in enumerate(DENSE_NLL)]
    sums = [v * (SEQLEN - 1) for v in per_token]
    mean = sum(per_token) / len(per_token)
    metrics = {"ppl": math.exp(mean), "ci_low": math.exp(mean) * 0.8, "ci_high": math.exp(mean) * 1.25,
               "size_fraction": size, "window_nll": sums, "seqlen": SEQLEN, "n_windows": 8}
    if method != "dense":
        dense_sums = [d * (SEQLEN - 1) for d in DENSE_NLL]
        paired = paired_change(dense_sums, sums, SEQLEN - 1)
        metrics.update({"ppl_change": paired.change, "ppl_change_low": paired.low, "ppl_change_high": paired.high,
                        "dense_ppl": math.exp(sum(DENSE_NLL) / 8)})
    config = {"series": series, "preview": False}
    if low_bits is not None:
        config["low_bits"] = low_bits
    return store.add_run(model="m", model_fingerprint="f", method=method, config=config, data=DATA,
                         metrics=metrics, duration_s=1.0)


@pytest.fixture
def dense_store(store):
    _add(store, "dense", "dense", 1.0, 0.0)
    return store


def test_paired_interval_is_tight_when_windows_move_together_and_contains_zero_for_noise():
    dense = [d * 128 for d in DENSE_NLL]
    shifted = [(d + 0.05) * 128 for d in DENSE_NLL]
    paired = paired_change(dense, shifted, 128)
    assert paired.change == pytest.approx(math.expm1(0.05))
    assert paired.low == pytest.approx(paired.change) and not paired.within_noise  # every window moved the same
    noisy = [(d + (0.05 if i % 2 else -0.05)) * 128 for i, d in enumerate(DENSE_NLL)]
    assert paired_change(dense, noisy, 128).within_noise
    with pytest.raises(ValueError):
        paired_change(dense, noisy[:3], 128)


def test_a_large_change_is_never_called_noise_although_separate_intervals_overlap(dense_store):
    run = _add(dense_store, "quantization", "q", 0.4, 1.69)  # exp(1.69) - 1 ≈ +443%
    record = dense_store.get_run(run)
    assert record.metrics["ci_low"] < 20 * 10  # wide per-run intervals are irrelevant to the paired judgement
    assert not any("within the noise" in w for w in run_warnings(record))
    noisy = dense_store.get_run(_add(dense_store, "quantization", "q2", 0.4, 0.0, noise=0.05))
    assert any("within the noise" in w and "95% interval" in w for w in run_warnings(noisy))


def test_methods_at_different_sizes_are_not_compared(dense_store):
    _add(dense_store, "quantization", "lim 4/3-bit rtn", 0.40, 0.30)
    _add(dense_store, "dropping", "drop 2 layers by LR", 0.89, 0.60)
    lines = executive_summary(dense_store.runs_frame(), LABEL)
    assert any(line.startswith("No matched sizes yet") for line in lines)
    assert not any(" is better " in line for line in lines)
    assert quantization_vs_dropping(dense_store.runs_frame()).startswith("No matched sizes yet")


def test_methods_within_the_tolerance_are_compared_with_a_paired_verdict(dense_store):
    _add(dense_store, "quantization", "lim 4/3-bit rtn", 0.75, 0.05)
    _add(dense_store, "dropping", "drop 4 layers by LR", 0.76, 0.50)
    _add(dense_store, "dropping", "drop 8 layers by LR", 0.50, 0.90)  # alone at its size
    lines = executive_summary(dense_store.runs_frame(), LABEL)
    matched = [line for line in lines if line.startswith("At ")]
    assert len(matched) == 1 and "75%–76%" in matched[0] and "Quantization is better" in matched[0]
    assert "drop 8 layers" not in matched[0]
    verdict = quantization_vs_dropping(dense_store.runs_frame())
    assert verdict.startswith("Holds here") and "1 of 1 matched sizes" in verdict


def test_indistinguishable_runs_at_a_matched_size_are_called_so(dense_store):
    _add(dense_store, "quantization", "q", 0.75, 0.10, noise=0.02)
    _add(dense_store, "dropping", "d", 0.75, 0.10, noise=-0.02)
    lines = executive_summary(dense_store.runs_frame(), LABEL)
    assert any("cannot be told apart" in line for line in lines)
    assert "1 within noise" in quantization_vs_dropping(dense_store.runs_frame())


def test_dominated_runs_are_never_recommended(dense_store):
    small_good = _add(dense_store, "quantization", "q 3.5 bits", 0.30, 0.04)
    big_worse = _add(dense_store, "dropping", "drop 2", 0.89, 0.06)  # bigger and worse: dominated
    frame = dense_store.runs_frame()
    assert dominated(frame[frame["method"] != "dense"]) == {big_worse}
    lines = executive_summary(frame, LABEL)
    recommended = next(line for line in lines if line.startswith("Recommended"))
    assert f"run {small_good}" in recommended
    assert any(line.startswith("Not recommended") and f"run {big_worse}" in line for line in lines)


def test_every_option_above_the_threshold_is_said_plainly(dense_store):
    _add(dense_store, "quantization", "q", 0.30, 0.6)
    _add(dense_store, "dropping", "d", 0.80, 0.8)
    lines = executive_summary(dense_store.runs_frame(), LABEL, threshold=0.10)
    assert not any(line.startswith("Recommended") for line in lines)
    assert any(line.startswith("Every compressed option here costs more than +10%") for line in lines)
    relaxed = executive_summary(dense_store.runs_frame(), LABEL, threshold=1.0)
    assert any(line.startswith("Recommended") for line in relaxed)


def test_matched_groups_need_two_methods_within_the_tolerance(dense_store):
    _add(dense_store, "quantization", "a", 0.50, 0.1)
    _add(dense_store, "quantization", "b", 0.51, 0.2)
    _add(dense_store, "dropping", "c", 0.535, 0.3)  # 3.5 points from 0.50: another group
    frame = dense_store.runs_frame()
    assert matched_groups(frame[frame["method"] != "dense"], 0.02) == []
    assert len(matched_groups(frame[frame["method"] != "dense"], 0.04)) == 1


def test_runs_stored_before_paired_intervals_are_read_without_a_noise_claim():
    old = RunRecord(id=1, created_at="", model="m", model_fingerprint="f", method="quantization",
                    config={"series": "q"}, data=DATA, duration_s=1.0,
                    metrics={"ppl": 30.0, "ci_low": 20.0, "ci_high": 40.0, "ppl_change": 0.5,
                             "ci_overlaps_dense": True, "size_fraction": 0.4})
    assert not any("noise" in w for w in run_warnings(old))
    assert torch.isfinite(torch.tensor(old.metrics["ppl"]))


def test_runs_without_any_change_against_dense_get_no_recommendation(store):
    for method, size in (("quantization", 0.4), ("dropping", 0.41)):
        store.add_run(model="m", model_fingerprint="f", method=method, config={"series": method, "preview": False},
                      data=DATA, metrics={"ppl": 30.0, "size_fraction": size}, duration_s=1.0)
    lines = executive_summary(store.runs_frame(), LABEL)
    assert any(line.startswith("No dense baseline") for line in lines)
    assert any(line.startswith("No recommendation") for line in lines)
    assert any("has the lower perplexity (no paired interval" in line or "At 40%" in line for line in lines)


def test_the_recommendation_shows_kl_divergence_when_the_run_has_it(dense_store):
    run = _add(dense_store, "quantization", "q 3.5 bits", 0.30, 0.04)
    frame = dense_store.runs_frame()
    frame.loc[frame["id"] == run, "metrics.kld_mean"] = 0.0421
    recommended = next(line for line in executive_summary(frame, LABEL) if line.startswith("Recommended"))
    assert f"run {run}" in recommended and "KL divergence to dense 0.042" in recommended


def test_the_guided_runs_sentence_says_why_a_quantized_model_stays_large():
    """Gemma-3-270M quantized to 4/3 bits is 71% of dense's bytes (SmolLM2: 40%): its 262k-row embedding, 63% of
    the parameters, stays at 16 bits; the sentence says so, and only where that share is large."""
    from engine.runs.first_run import run_sentence

    metrics = {"ppl": 99.0, "ppl_change": 3.17, "size_fraction": 0.71, "unquantized_fraction": 0.626}
    record = RunRecord(id=3, created_at="", model="m", model_fingerprint="f", method="quantization",
                       config={"series": "lim 4/3-bit rtn"}, data=DATA, duration_s=1.0, metrics=metrics)
    assert "63% of this model's parameters" in run_sentence(record)
    small = RunRecord(**{**record.__dict__, "metrics": {**metrics, "unquantized_fraction": 0.21}})
    assert "left at 16 bits" not in run_sentence(small) and "stays high" not in run_sentence(small)
