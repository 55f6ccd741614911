"""AppTest of the Quantization page: bit map preview, refusals, preview run and sweep chart."""

from __future__ import annotations

import pytest

from tests.apptest import open_app, use_small_data

pytestmark = pytest.mark.slow


def _bits_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Average"))


def test_bit_map_follows_the_sliders_and_bad_levels_are_refused():
    at = use_small_data(open_app("quantization"), "quant")
    assert not at.exception and not at.error
    assert "Per-layer bit allocation" in at.get("plotly_chart")[0].proto.spec
    assert _bits_caption(at).startswith("Average 3.467 code bits")  # 25% of 30 layers -> 8 at 2 bits
    at.slider(key="quant_fraction").set_value(50).run()
    assert _bits_caption(at).startswith("Average 3.000 code bits")
    at.radio(key="quant_mode").set_value("average").run()
    assert _bits_caption(at).startswith("Average 3.200")  # 3.25 target: 18 layers at 4, 12 at 2
    at.select_slider(key="quant_low").set_value(6).run()  # low above high
    assert not at.exception
    assert "must not exceed the high level" in at.error[0].value or "unreachable" in at.error[0].value


def test_preview_run_is_stored_and_charted():
    at = use_small_data(open_app("quantization"), "quant")
    at.select_slider(key="quant_low").set_value(3).run()
    next(b for b in at.button if b.label.startswith("Preview")).click().run()
    assert not at.exception and not at.error, at.error
    assert at.metric[0].label == "Perplexity" and float(at.metric[0].value) > 1
    assert any("Stored as run" in c.value for c in at.caption)
    assert any("ppl vs fraction of layers at the low bit level" in c.proto.spec for c in at.get("plotly_chart"))
