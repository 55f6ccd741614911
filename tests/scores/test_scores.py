"""Layer scores: hand-checked LR cosines, padding, hooks, ZD counts, ranking, cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.core.architectures import architecture_for, get_submodule
from engine.core.data import DataSpec, TokenWindows
from engine.runs.cached_scores import cached_layer_redundancy, cached_weight_outliers
from engine.scores.outliers import weight_outliers
from engine.scores.ranking import importance_order, ranks, spearman
from engine.scores.redundancy import HIST_BINS, layer_redundancy
from tests.tiny_models import TINY_FACTORIES


def _windows(n=4, seqlen=24, vocab=128, seed=3):
    torch.manual_seed(seed)
    return TokenWindows(torch.randint(0, vocab, (n, seqlen)), DataSpec(seqlen=seqlen, n_windows=n))


def test_layer_with_zeroed_outputs_has_cosine_one(tiny_model):
    arch = architecture_for(tiny_model.config.model_type)
    layer = arch.decoder_layers(tiny_model)[1]
    with torch.no_grad():
        for path in (arch.attn_output, arch.mlp_output):
            linear = get_submodule(layer, path)
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    scores = layer_redundancy(tiny_model, arch, _windows())
    assert scores.lr[1] == pytest.approx(1.0, abs=1e-6)
    assert scores.attn_cos[1] == pytest.approx(1.0, abs=1e-6)
    assert scores.mlp_cos[1] == pytest.approx(1.0, abs=1e-6)
    assert scores.lr[0] < 0.99  # a real layer changes its input


def test_matches_hand_computation_from_hidden_states():
    model = TINY_FACTORIES["mistral"]()
    arch = architecture_for("mistral")
    windows = _windows()
    scores = layer_redundancy(model, arch, windows, batch_size=3)
    with torch.no_grad():
        hidden = model(windows.input_ids, output_hidden_states=True).hidden_states
    # hidden[i] enters layer i; hidden[-1] is after the final norm, so skip the last layer
    for i in range(len(hidden) - 2):
        cos = F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert scores.lr[i] == pytest.approx(float(cos.mean()), abs=1e-5)
        assert scores.position_cos[i] == pytest.approx(cos.mean(dim=0).tolist(), abs=1e-5)
        assert scores.window_cos[i] == pytest.approx(cos.mean(dim=1).tolist(), abs=1e-5)
        assert sum(scores.histogram[i]) == windows.input_ids.numel()
    assert len(scores.histogram[0]) == HIST_BINS
    assert scores.lim == [-v for v in scores.lr] and scores.bi[0] == pytest.approx(1 - scores.lr[0])


def test_padding_does_not_change_the_score():
    model = TINY_FACTORIES["llama"]()
    arch = architecture_for("llama")
    torch.manual_seed(5)
    short, full = torch.randint(0, 128, (1, 10)), torch.randint(0, 128, (1, 16))
    alone_short = layer_redundancy(model, arch, TokenWindows(short, DataSpec(seqlen=10, n_windows=1)))
    alone_full = layer_redundancy(model, arch, TokenWindows(full, DataSpec(seqlen=16, n_windows=1)))
    pooled = [(a * 10 + b * 16) / 26 for a, b in zip(alone_short.lr, alone_full.lr)]
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0
    for pad_token in (0, 77):
        padded = torch.cat([torch.cat([short, torch.full((1, 6), pad_token)], dim=1), full])
        scores = layer_redundancy(model, arch, TokenWindows(padded, DataSpec(seqlen=16, n_windows=2)),
                                  attention_mask=mask)
        assert scores.lr == pytest.approx(pooled, abs=1e-5)
        assert scores.n_tokens == 26


def test_hooks_leave_outputs_unchanged_and_are_removed_on_failure():
    model = TINY_FACTORIES["qwen2"]()
    arch = architecture_for("qwen2")
    windows = _windows(n=2)
    layers = arch.decoder_layers(model)
    with torch.no_grad():
        before = model(windows.input_ids).logits
    seen = []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    layer_redundancy(model, arch, windows, batch_size=2)
    handle.remove()
    with torch.no_grad():
        reference = model(windows.input_ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model(windows.input_ids).logits, before)
    torch.testing.assert_close(seen[0], reference)
    bad = TokenWindows(torch.full((1, 8), 10_000), DataSpec(seqlen=8, n_windows=1))
    with pytest.raises(IndexError):
        layer_redundancy(model, arch, bad)
    for layer in layers:
        for hooks in (layer._forward_hooks, layer._forward_pre_hooks, layer.self_attn._forward_hooks):
            assert not [h for h in hooks.values() if "_LayerHooks" in h.__qualname__]


def test_zd_matches_hand_count():
    model = TINY_FACTORIES["llama"]()
    arch = architecture_for("llama")
    q = arch.decoder_layers(model)[0].self_attn.q_proj.weight  # 64 x 64 = 4096 weights
    with torch.no_grad():
        q.zero_()
        q.view(-1)[:16] = 10.0
    # mean = 160/4096; the 16 tens have z ≈ 15.9 (> 1 and > 3), the zeros z ≈ -0.06
    scores = weight_outliers(model, arch, k=3)
    column = scores.modules.index("q")
    assert scores.zd[0][column] == pytest.approx(16 / 4096)
    assert scores.outliers[0][column] == 16
    assert len(scores.zd) == 3 and len(scores.zd[0]) == 7
    all_weights = torch.cat([m.weight.flatten() for m in arch.layer_linears(arch.decoder_layers(model)[0]).values()])
    z = (all_weights - all_weights.mean()) / all_weights.std()
    assert scores.zd_layer[0] == pytest.approx(float((z > 1).float().mean()), rel=1e-4)
    assert scores.outliers_layer[0] == int((z.abs() > 3).sum())


def test_ranks_spearman_and_order():
    assert ranks([0.3, 0.1, 0.3, 0.9]) == [2.5, 1.0, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert importance_order([0.1, 0.9, 0.5]) == [1, 2, 0]


def test_cache_hit_returns_identical_values_without_recomputing(store):
    model = TINY_FACTORIES["phi3"]()
    arch = architecture_for("phi3")
    windows = _windows(n=3)
    first, hit = cached_layer_redundancy(store, model, arch, "fp-1", windows)
    assert not hit
    calls = []
    again, hit = cached_layer_redundancy(store, model, arch, "fp-1", windows, progress=lambda *a: calls.append(a))
    assert hit and not calls and again == first
    _, hit = cached_layer_redundancy(store, model, arch, "fp-2", windows)
    assert not hit
    zd, hit = cached_weight_outliers(store, model, arch, "fp-1")
    zd_again, hit_again = cached_weight_outliers(store, model, arch, "fp-1")
    assert (hit, hit_again) == (False, True) and zd_again == zd


def test_concurrent_forward_from_another_thread_does_not_disturb_scoring():
    import threading

    model = TINY_FACTORIES["llama"]()
    arch = architecture_for("llama")
    windows = _windows(n=6)
    alone = layer_redundancy(model, arch, windows, batch_size=1)
    other_input = torch.randint(0, 128, (2, 40))
    stop, errors = threading.Event(), []

    def hammer():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    model(other_input)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        together = layer_redundancy(model, arch, windows, batch_size=1)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert together.lr == pytest.approx(alone.lr, abs=1e-6)
    assert together.n_tokens == alone.n_tokens


def test_a_model_without_sublayer_cosines_gets_no_sentence_or_legend_entry_about_them():
    from engine.scores.findings import redundancy_findings
    from engine.scores.redundancy import LayerRedundancy
    from engine.viz.charts import lr_profile_chart

    nan = float("nan")
    lr = [0.2, 0.9, 0.95, 0.97, 0.96, 0.8]
    scores = LayerRedundancy(lr=lr, attn_cos=[nan] * 6, mlp_cos=[nan] * 6,
                             position_cos=[[nan, v, v] for v in lr], window_cos=[[v] for v in lr],
                             histogram=[[0] * 200 for _ in lr], n_tokens=12, n_windows=1, seqlen=3, data_label="d")
    text = " ".join(redundancy_findings(scores))
    assert "attention block" not in text and "Most redundant layers" in text
    figure = lr_profile_chart(scores, "d")
    assert [t.name for t in figure.data] == ["layer (LR)"]
    low, high = figure.layout.yaxis.range
    assert all(low <= v <= high for v in lr)  # NaN sublayer values do not widen or break the axis
    with_sublayers = LayerRedundancy(**{**scores.__dict__, "attn_cos": lr, "mlp_cos": lr})
    assert "attention block" in " ".join(redundancy_findings(with_sublayers))
    assert len(lr_profile_chart(with_sublayers, "d").data) == 3
