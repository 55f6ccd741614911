"""AppTest of the Sensitivity page (tiny model)."""

from __future__ import annotations

from tests.apptest import click, open_app


def _page(windows: int, seqlen: int):  # each test its own windows: the store is shared by the session
    at = open_app("sensitivity")
    assert at.title[0].value == "Sensitivity"
    at.number_input(key="keep.calib_windows").set_value(windows)
    at.number_input(key="keep.calib_seqlen").set_value(seqlen).run()
    assert not at.exception
    return at


def test_page_measures_on_a_button_and_shows_heatmap_scatters_table_and_finding(tiny_app):
    at = _page(4, 32)
    assert not at.get("plotly_chart")  # nothing heavy starts without the button
    assert any("Cost estimate" in m.value for m in at.markdown)
    at = click(at, "Measure sensitivity")
    assert not at.exception and not at.error
    charts = at.get("plotly_chart")
    assert len(charts) >= 4  # damage heatmap, agreement heatmap, one scatter per distinct score ranking
    text = " ".join(m.value for m in at.markdown)
    assert "ρ = " in text and " cost " in text  # the finding, written from the numbers
    captions = " ".join(c.value for c in at.caption)
    assert "4 windows × 32 tokens" in captions and "fingerprint" in captions
    downloads = [d.proto.label for d in at.get("download_button")]
    assert "sensitivity_heatmap.csv" in downloads and "sensitivity_agreement.csv" in downloads
    assert any(label.startswith("sensitivity_lr_vs_") for label in downloads)
    assert len(at.dataframe) == 1
    at.run()  # a rerun finds everything in the cache
    assert any("loaded from the cache" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == len(charts)
    click(at, "Pin this chart")  # every chart has its report pin
    assert len(at.session_state["report_pins"]) == 1


def test_too_few_windows_are_refused_with_what_to_do(tiny_app):
    at = _page(2, 32)
    assert any("at least 4" in e.value for e in at.error)
    assert not any(b.label.startswith("Measure sensitivity") for b in at.button)


def test_slicing_on_too_few_calibration_tokens_is_warned(tiny_app):
    from tests.apptest import open_app

    at = open_app("sensitivity")
    at.number_input(key="keep.calib_windows").set_value(4)
    at.number_input(key="keep.calib_seqlen").set_value(16).run()  # 64 tokens, hidden 64: fine
    assert not any("rank-deficient" in w.value for w in at.warning)
    at.number_input(key="keep.calib_windows").set_value(3).run()  # 48 tokens < 64
    assert any("rank-deficient" in w.value and "near 0" in w.value for w in at.warning)


def test_one_linear_at_a_time_becomes_its_own_row(tiny_app):
    """Whole layer and down_proj alone at 3 bits: two rows of the damage heatmap; no linear chosen is refused."""
    at = _page(4, 40)
    at.multiselect(key="keep.sens_actions").set_value(["rtn"])
    at.multiselect(key="keep.sens_modules").set_value([]).run()
    assert any("whole layer or at least one of its linears" in e.value for e in at.error)
    at.multiselect(key="keep.sens_modules").set_value(["whole layer", "down"]).run()
    at = click(at, "Measure sensitivity")
    assert not at.exception and not at.error, [e.value for e in at.error]
    heatmap = next(c.proto.spec for c in at.get("plotly_chart") if "RTN 3-bit down" in c.proto.spec)
    assert '"RTN 3-bit"' in heatmap


def test_the_target_runtime_narrows_the_quantization_actions(tiny_app):
    at = open_app("sensitivity")
    at.selectbox(key="keep.runtime").set_value("vllm").run()
    assert not at.exception, at.exception
    assert list(at.multiselect(key="keep.sens_bits_vllm").options) == ["4", "8"]
    offered = at.multiselect(key="keep.sens_actions_vllm").options
    assert "quantize (RTN)" in offered and not any("llama.cpp" in o for o in offered)
    assert any("vLLM (compressed-tensors) does not run it" in c.value for c in at.caption)
