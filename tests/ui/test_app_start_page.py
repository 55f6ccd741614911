"""AppTest of the Start page: the path through the pages and the guided first run on the tiny model."""

from __future__ import annotations

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app


def test_start_page_is_the_first_page_and_the_guided_run_stores_runs_and_says_what_it_found(tiny_app):
    at = open_app(page=None)
    assert at.title[0].value == "LayerLab"
    steps = [m.value for m in at.markdown if m.value[:2] in ("1.", "2.", "3.", "4.", "5.")]
    assert [s.split("**")[1] for s in steps] == ["Baseline", "Layer scores", "Quantization", "Slicing", "Dropping"]
    assert at.expander[0].label == "Terms used here (glossary)"  # the terms the pages use, from docs/glossary.md
    assert any(m.value.lstrip().startswith("- **Dense**") and "**LIM (layer input modification)**" in m.value
               for m in at.expander[0].markdown)
    assert not any(b.label.startswith("Cancel") for b in at.button)  # nothing runs yet: nothing to cancel
    button = next(b for b in at.button if b.label.startswith("Start the guided run"))
    assert "(≈" in button.label or "s)" in button.label  # the estimate is on the button
    before = {r.id for r in ResultsStore().runs()}  # the session's store may hold other tests' runs
    click(at, "Start the guided run")
    assert not at.exception and not at.error, at.error
    runs = [r for r in ResultsStore().runs() if r.id not in before]
    assert {r.method for r in runs} >= {"quantization", "slicing", "dropping"}
    assert all(r.data_label.endswith("8 windows × 128 tokens") for r in runs)
    found = [m.value for m in at.markdown if m.value.startswith("**")]
    assert any(f.startswith("**Baseline.** Dense perplexity") for f in found)
    assert any(f.startswith("**Quantization.**") and "vs dense (95% interval" in f for f in found)
    assert any("KL divergence to dense" in f for f in found)
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("perplexity vs size" in spec and "dense model" in spec for spec in specs)  # with dense as the star

    # a second guided run shows the same runs again instead of storing copies (the summary then named "run 3,
    # run 6" as two options that were one)
    stored = len(ResultsStore().runs())
    click(at, "Start the guided run")
    assert not at.exception and not at.error, at.error
    assert len(ResultsStore().runs()) == stored
    again = [m.value for m in at.markdown if m.value.startswith("**Quantization.**")]
    assert again and "Stored by an earlier guided run as run" in again[0]


def test_after_the_guided_run_its_windows_can_be_chosen_for_every_page_and_the_pages_say_where_runs_are(tiny_app):
    """The pages start on 16 × 256 evaluation windows, the guided run measures on 8 × 128: a newcomer following
    its "Next" found no runs on Compare methods and no scores on Layer redundancy, with nothing saying why."""
    at = open_app(page=None)
    click(at, "Start the guided run")
    assert not at.exception and not at.error, at.error
    nxt = next(m.value for m in at.markdown if m.value.startswith("Next: open"))
    assert "**Quantization**, **Slicing** or **Dropping**" in nxt  # the methods it ran (Slicing where it can)
    assert any("runs are compared only on the same windows" in c.value for c in at.caption)

    at.switch_page("pages/compare.py").run()  # still on the pages' default windows
    info = " ".join(i.value for i in at.info)
    assert "No compressed runs on" in info and "8 windows × 128 tokens" in info and "choose those windows" in info
    at.switch_page("pages/redundancy.py").run()
    assert any("The guided run's scores (8 windows × 128 tokens) are cached" in i.value for i in at.info)

    at.switch_page("pages/start.py").run()
    click(at, "Use 8 windows × 128 tokens on every page")
    assert any("Every page now measures on the guided run's 8 windows × 128 tokens" in c.value for c in at.caption)
    assert not any(b.label.startswith("Use 8 windows") for b in at.button)
    at.switch_page("pages/compare.py").run()
    assert not at.exception and not any("No compressed runs" in i.value for i in at.info)
    assert at.number_input(key="keep.eval_windows").value == 8 and at.number_input(key="keep.eval_seqlen").value == 128
    at.switch_page("pages/redundancy.py").run()
    assert not at.exception and any("Scores loaded from the cache" in c.value for c in at.caption)
