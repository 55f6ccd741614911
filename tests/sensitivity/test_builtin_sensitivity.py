"""The built-in SmolLM2-135M end to end (slow tier): costs, plausible damage, agreement."""

from __future__ import annotations

import pytest

from engine.core.data import DataSpec
from engine.runs.cached_scores import compute_scores
from engine.sensitivity.actions import parse_actions
from engine.sensitivity.cached import cached_agreement, measure_sensitivity

pytestmark = pytest.mark.slow


def test_builtin_scan_costs_about_half_the_forwards_and_layer_zero_matters_most(builtin, store):
    spec = DataSpec(split="calibration", seqlen=32, n_windows=4)
    matrix = measure_sensitivity(store, builtin, spec, parse_actions("drop,quant:3"))
    drop, quant = matrix.damages
    layers = builtin.num_layers
    assert 0.5 * layers < drop.forward_equivalents < 0.6 * layers  # the head is ~21% of a forward here
    assert 0.5 * layers < quant.forward_equivalents < 0.65 * layers
    assert max(range(layers), key=lambda i: drop.kl[i]) == 0  # layer 0 rewrites the embedding (LR ≈ 0)
    assert all(v > 0 for v in drop.kl + quant.kl)
    lr, zd, _ = compute_scores(store, builtin, spec)
    rows = {(r.score, r.action): r for r in cached_agreement(store, builtin, matrix, lr, zd, resamples=200)}
    assert rows["LR", "drop"].rho > 0.5 and rows["LR", "drop"].low > 0
