"""SliceGPT engine: exactness, schedules, wiring, parameter counts, save/load, built-in model."""

from __future__ import annotations

import statistics

import pytest
import torch

from engine.core.architectures import architecture_for, get_submodule
from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.models import LoadedModel, weights_fingerprint
from engine.core.paths import FolderExistsError
from engine.evaluation.latency import compare_latency
from engine.evaluation.perplexity import perplexity
from engine.slicing.schedules import (
    ScheduleError,
    achieved_fraction,
    flat_schedule_note,
    schedule_constant,
    schedule_custom,
    schedule_dims,
    schedule_dynamic,
)
from engine.slicing.slice_model import load_sliced, save_sliced, slice_model
from engine.slicing.sliced_layers import SlicedLayerMixin, SlicedModelError, layer_widths
from tests.tiny_models import TINY_FACTORIES

D = 64  # tiny models' hidden size


def windows(n: int = 6, seqlen: int = 16, seed: int = 1, vocab: int = 128) -> TokenWindows:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=generator)
    return TokenWindows(ids, DataSpec(split="calibration", seqlen=seqlen, n_windows=n))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def tiny(name: str = "llama"):
    return TINY_FACTORIES[name]()


def arch_of(model):
    return architecture_for(model.config.model_type)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("final_rotation", [False, True])
def test_unsliced_rotation_is_exact(tiny_model, final_rotation):
    cal, probe = windows(), windows(n=2, seed=7).input_ids
    result = slice_model(LoadedModel.from_model(tiny_model), schedule_constant(0.0, 3), cal,
                         final_rotation=final_rotation, batch_size=4)
    assert result.dims == [D, D, D]
    assert max_rel_err(logits(tiny_model, probe), logits(result.model, probe)) <= 1e-4
    assert all(isinstance(layer, SlicedLayerMixin) for layer in arch_of(tiny_model).decoder_layers(result.model))


def test_input_model_is_not_modified(tiny_model):
    before = weights_fingerprint(tiny_model)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    slice_model(LoadedModel.from_model(tiny_model), schedule_constant(0.25, 3), windows())
    assert weights_fingerprint(tiny_model) == before
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not any(isinstance(m, SlicedLayerMixin) for m in tiny_model.modules())


def test_generate_with_kv_cache_matches_dense():
    model = tiny("llama-tied")
    sliced = slice_model(LoadedModel.from_model(model), schedule_constant(0.0, 3), windows()).model
    prompt = windows(n=1, seqlen=5, seed=3).input_ids
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), sliced.generate(prompt, **kwargs))


def test_bfloat16_model_slices_close_to_dense():
    model = tiny("qwen2").to(torch.bfloat16)
    probe = windows(n=2, seed=7).input_ids
    result = slice_model(LoadedModel.from_model(model), schedule_constant(0.0, 3), windows())
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert max_rel_err(logits(model, probe).float(), logits(result.model, probe).float()) < 0.05


def test_padding_is_masked_out_of_pca():
    """Right padding masked out gives the same model as windows without the padded tail."""
    model = tiny("llama")
    cal = windows(n=6, seqlen=16)
    short = TokenWindows(cal.input_ids[:, :12].clone(), DataSpec(split="calibration", seqlen=12, n_windows=6))
    mask = torch.ones_like(cal.input_ids)
    mask[:, 12:] = 0
    padded = cal.input_ids.clone()
    padded[:, 12:] = 0
    a = slice_model(LoadedModel.from_model(model), schedule_constant(0.25, 3), short).model
    b = slice_model(LoadedModel.from_model(model), schedule_constant(0.25, 3), TokenWindows(padded, cal.spec),
                    attention_mask=mask).model
    probe = windows(n=2, seed=7).input_ids
    assert max_rel_err(logits(a, probe), logits(b, probe)) < 1e-4


# ---------------------------------------------------------------- wiring and counts


def test_sliced_shapes_follow_the_wiring():
    model = tiny("llama")
    arch = arch_of(model)
    schedule = schedule_custom([0.25, 0.5, 0.125])
    calls = []
    result = slice_model(LoadedModel.from_model(model), schedule, windows(), progress=lambda d, t: calls.append((d, t)))
    assert result.dims == [48, 32, 56]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    sliced = result.model
    assert get_submodule(sliced, arch.embedding).weight.shape == (128, 48)
    outs = [32, 56, D]
    for layer, d, d_out in zip(arch.decoder_layers(sliced), result.dims, outs):
        assert layer.self_attn.q_proj.weight.shape == (64, d)
        assert layer.self_attn.k_proj.weight.shape == (32, d)
        assert layer.self_attn.o_proj.weight.shape == (d, 64)
        assert layer.mlp.gate_proj.weight.shape == (96, d)
        assert layer.mlp.down_proj.weight.shape == (d_out, 96)
        assert layer.attn_shortcut.shape == (d, d) and layer.mlp_shortcut.shape == (d, d_out)
    assert get_submodule(sliced, arch.head).weight.shape == (128, D)
    assert result.report.achieved_fraction == pytest.approx(statistics.fmean([0.25, 0.5, 0.125]))
    assert logits(sliced, windows(n=1).input_ids).shape == (1, 16, 128)


def hand_count(dims: list[int], vocab=128, hidden=D, inter=96, q_out=64, kv_out=32) -> int:
    total = vocab * dims[0] + vocab * hidden  # embedding + untied head
    for w in layer_widths(dims, hidden):
        total += (q_out + 2 * kv_out) * w.d_in + w.d_mid * q_out  # q, k, v, o
        total += 2 * inter * w.d_mid + w.d_out * inter  # gate, up, down
        total += w.d_in * w.d_mid + w.d_mid * w.d_out  # shortcuts
    return total


def test_parameter_count_matches_hand_count():
    model = tiny("llama-tied")
    result = slice_model(LoadedModel.from_model(model), schedule_constant(0.25, 3), windows())
    report = result.report
    assert result.dims == [48, 48, 48]
    assert report.params_sliced == hand_count(result.dims)
    assert report.params_dense == hand_count([D, D, D]) - 128 * D - 6 * D * D + 7 * D  # tied, no shortcuts, 7 norms
    assert report.shortcut_params == 48 * 48 * 3 + 48 * 48 * 2 + 48 * 64
    assert report.nominal_fraction == 0.25 and report.achieved_fraction == 0.25


def test_latency_helper_reports_medians():
    model = tiny("llama")
    sliced = slice_model(LoadedModel.from_model(model), schedule_constant(0.25, 3), windows()).model
    timing = compare_latency(model, sliced, windows(n=2).input_ids, repeats=2)
    assert timing["dense_s"] > 0 and timing["sliced_s"] > 0
    assert timing["speedup"] == pytest.approx(timing["dense_s"] / timing["sliced_s"])


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["llama-tied", "qwen2", "phi3"])
def test_save_load_round_trip(tmp_path, name):
    model = tiny(name)
    result = slice_model(LoadedModel.from_model(model, source=f"tiny-{name}"), schedule_custom([0.25, 0.5, 0.0]),
                         windows(), final_rotation=True)
    folder = save_sliced(result, tmp_path / "sliced")
    with pytest.raises(FolderExistsError):  # never overwritten silently
        save_sliced(result, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "slicing.json"]
    loaded = load_sliced(folder)
    probe = windows(n=2, seed=9).input_ids
    assert torch.equal(logits(result.model, probe), logits(loaded.model, probe))
    assert loaded.dims == result.dims and loaded.source == f"tiny-{name}"
    assert loaded.schedule == result.schedule
    assert loaded.report.params_sliced == result.report.params_sliced


def test_load_refuses_a_folder_without_a_sliced_model(tmp_path):
    with pytest.raises(SlicedModelError, match="slicing.json"):
        load_sliced(tmp_path)


# ---------------------------------------------------------------- schedules

LR = [0.02, 0.95, 0.97, 0.90, 0.60, 0.98, 0.75]


def test_dynamic_schedule_mean_and_basis():
    schedule = schedule_dynamic(LR, target=0.3, basis=0.1)
    assert statistics.fmean(schedule.fractions) == pytest.approx(0.3, abs=1e-12)
    assert schedule.fractions[0] == pytest.approx(0.1, abs=1e-12)  # least redundant layer gets SB
    assert min(schedule.fractions) == schedule.fractions[0]
    assert max(range(len(LR)), key=schedule.fractions.__getitem__) == LR.index(max(LR))


def test_dynamic_with_basis_equal_target_is_constant():
    assert schedule_dynamic(LR, 0.25, 0.25).fractions == schedule_constant(0.25, len(LR)).fractions
    assert schedule_dynamic([0.5, 0.5, 0.5], 0.2, 0.2).fractions == (0.2, 0.2, 0.2)


def test_a_nearly_constant_dynamic_schedule_is_explained():
    """One outlier LR (layer 0 near 0, the rest 0.90-0.98) squeezes the others into a narrow band: the note says
    so with the numbers; a spread-out profile, SB = SP and constant schedules get no note."""
    outlier = [0.02, 0.95, 0.97, 0.90, 0.93, 0.98, 0.91]
    note = flat_schedule_note(schedule_dynamic(outlier, 0.25, 0.1))
    assert note is not None and "layer 0's LR (0.020)" in note and "0.900–0.980" in note and "other 6 layers" in note
    assert flat_schedule_note(schedule_dynamic(LR, 0.25, 0.1)) is None  # 0.60 and 0.75 spread the schedule
    assert flat_schedule_note(schedule_dynamic(outlier, 0.25, 0.25)) is None
    assert flat_schedule_note(schedule_constant(0.25, 7)) is None


def test_dims_are_rounded_and_achieved_fraction_reported():
    dims = schedule_dims(schedule_constant(0.1, 4), hidden_size=576, round_to=8)
    assert dims == [520] * 4  # 518.4 -> nearest multiple of 8
    assert achieved_fraction(dims, 576) == pytest.approx(1 - 520 / 576)
    assert schedule_dims(schedule_constant(0.1, 2), 576, round_to=1) == [518, 518]
    assert schedule_dims(schedule_constant(0.0, 2), 100, round_to=8) == [100, 100]  # capped at D


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: schedule_constant(1.0, 3), r"\[0, 1\)"),
        (lambda: schedule_constant(-0.1, 3), r"\[0, 1\)"),
        (lambda: schedule_dynamic(LR, 0.2, 0.3), "SB ≤ SP"),
        (lambda: schedule_dynamic(LR, 0.2, -0.1), "SB must be ≥ 0"),
        (lambda: schedule_dynamic([0.9, 0.9, 0.9], 0.3, 0.1), "All 3 LR scores are equal"),
        (lambda: schedule_dynamic([0.1, 0.1, 0.1, 0.1, 0.9], 0.5, 0.0), "Raise SB to at least"),
        (lambda: schedule_dynamic([], 0.2, 0.1), "empty"),
        (lambda: schedule_dynamic([0.1, float("nan")], 0.2, 0.1), "NaN"),
        (lambda: schedule_custom([0.2, 1.2]), "layer 1"),
        (lambda: schedule_custom([0.2, -0.2]), "layer 1"),
        (lambda: schedule_dims(schedule_custom([0.1, 0.99]), 64, 8), "rounds to 0"),
    ],
)
def test_impossible_schedules_are_refused(make, message):
    with pytest.raises(ScheduleError, match=message):
        make()


def test_suggested_basis_is_feasible():
    lr = [0.1, 0.1, 0.1, 0.1, 0.9]
    with pytest.raises(ScheduleError) as info:
        schedule_dynamic(lr, 0.5, 0.0)
    suggested = float(str(info.value).split("at least ")[1].split(",")[0]) + 1e-3
    assert max(schedule_dynamic(lr, 0.5, suggested).fractions) < 1


def test_wrong_schedule_length_and_dims_are_refused():
    model = tiny("llama")
    with pytest.raises(ScheduleError, match="3 decoder layers"):
        slice_model(LoadedModel.from_model(model), schedule_constant(0.2, 5), windows())
    with pytest.raises(ScheduleError, match="1..64"):
        slice_model(LoadedModel.from_model(model), [64, 0, 32], windows())
    assert issubclass(ScheduleError, ValueError)


def test_attention_mask_of_wrong_shape_is_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="one 0/1 entry per token"):
        slice_model(LoadedModel.from_model(model), schedule_constant(0.2, 3), windows(),
                    attention_mask=torch.ones(6, 5))


def test_explicit_dims_are_used_as_given():
    model = tiny("mistral")
    result = slice_model(LoadedModel.from_model(model), [60, 44, 52], windows(), round_to=4)
    assert result.dims == [60, 44, 52]
    assert result.report.achieved_fraction == pytest.approx(1 - statistics.fmean([60, 44, 52]) / 64)


# ---------------------------------------------------------------- built-in model


@pytest.mark.slow
def test_builtin_perplexity_rises_with_slicing(builtin):
    """Calibration 4 × 128 (wiki-offline calibration split), evaluation 4 × 128 (evaluation split)."""
    cal = token_windows(DataSpec(split="calibration", seqlen=128, n_windows=4), builtin.tokenizer)
    ev = token_windows(DataSpec(split="evaluation", seqlen=128, n_windows=4), builtin.tokenizer)
    dense = perplexity(builtin.model, ev).ppl
    ppls = []
    for target in (0.0, 0.1, 0.25):
        result = slice_model(builtin, schedule_constant(target, builtin.num_layers), cal)
        ppls.append(perplexity(result.model, ev).ppl)
        del result
    assert ppls[0] == pytest.approx(dense, rel=1e-4)  # tied embeddings untied, norms fused: still exact
    assert dense <= ppls[0] * (1 + 1e-4) and ppls[0] < ppls[1] < ppls[2]
