"""Gemma-3-270M, the second built-in model, end to end: a different family (gemma3_text: sliding-window and
global attention, four norms per layer, 262k vocabulary) whose tokenizer prepends BOS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.core.data import BOS_LABEL, DataSpec, split_text, token_windows
from engine.core.models import LOCAL_FILES_ROW, load_model
from engine.runs.plans import DropPlan, EvalPlan
from engine.runs.runner import run_dropping
from engine.runs.summary import executive_summary, run_warnings
from engine.scores.findings import redundancy_findings
from engine.scores.redundancy import layer_redundancy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_gemma_loads_as_a_built_in_with_its_terms_and_says_what_it_cannot_do(gemma):
    assert gemma.card["architecture"] == "gemma3_text" and gemma.card["layers"] == 18
    assert gemma.card["hidden size"] == 640 and gemma.card["vocabulary"] == 262144
    assert "Gemma Terms of Use" in gemma.card["license"] and "GEMMA_TERMS.html" in gemma.card[LOCAL_FILES_ROW]
    assert "Q4_K_M" in gemma.note
    message = gemma.architecture.unavailable_message("slicing")
    assert message.startswith("Slicing (SliceGPT) is not available") and "layer-wise quantization" in message


def test_dense_perplexity_equals_a_plain_loop_that_prepends_bos(gemma):
    """Windows of 256 tokens, the Model page's default length: BOS + 255 text tokens each (6 windows: the
    page's 16 cost Gemma-3's 262k-word head a minute here, and the BOS rule is the same in each)."""
    spec = DataSpec(split="evaluation", seqlen=256, n_windows=6)
    windows = token_windows(spec, gemma.tokenizer, gemma.max_seqlen)
    assert windows.bos and windows.label().endswith(BOS_LABEL)
    from engine.evaluation.perplexity import perplexity

    ours = perplexity(gemma.model, windows)
    text = gemma.tokenizer(split_text(spec), add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = gemma.tokenizer.bos_token_id
    total = 0.0
    with torch.no_grad():  # the reference: plain transformers, one window at a time, every non-BOS token scored
        for i in range(spec.n_windows):
            ids = torch.cat([torch.tensor([bos]), text[i * 255: (i + 1) * 255]])[None]
            logits = gemma.model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    reference = math.exp(total / (spec.n_windows * 255))
    assert ours.ppl == pytest.approx(reference, rel=1e-3)
    assert 10 < ours.ppl < 80  # without BOS per window it read ~150 on these windows


def test_lr_findings_and_a_dropping_run_with_a_paired_change(gemma, store):
    calibration = DataSpec(split="calibration", seqlen=128, n_windows=4)
    windows = token_windows(calibration, gemma.tokenizer, gemma.max_seqlen)
    scores = layer_redundancy(gemma.model, gemma.architecture, windows)
    assert all(math.isnan(v) for v in scores.attn_cos)  # Gemma's block outputs are normed: no sublayer split
    findings = " ".join(redundancy_findings(scores))
    assert "attention block" not in findings and "Most redundant layers" in findings
    evaluation = EvalPlan(DataSpec(split="evaluation", seqlen=128, n_windows=4))
    outcome = run_dropping(store, gemma, DropPlan("layer", 2), calibration, evaluation)
    m = outcome.metrics
    assert outcome.data["bos"] is True and outcome.record.data_label.endswith(BOS_LABEL)
    assert len(m["window_nll"]) == 4 and m["ppl_change_low"] <= m["ppl_change"] <= m["ppl_change_high"]
    assert m["ppl_change"] == pytest.approx(m["ppl"] / m["dense_ppl"] - 1, rel=1e-9)
    if m["ppl_change_low"] > 0:
        assert not any("within the noise" in w for w in run_warnings(outcome.record))
    lines = executive_summary(store.runs_frame(), outcome.record.data_label)
    assert lines[0].startswith("Dense model: perplexity") and any("No matched sizes yet" in line for line in lines)


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_llamacpp_measures_the_same_perplexity_on_the_same_gguf_and_windows(gemma):
    """The world's check of LayerLab's protocol: llama.cpp runs the very GGUF file the built-in model came from on
    LayerLab's windows (BOS + 255 tokens each); both perplexities agree within 2%."""
    from engine.core.builtins import builtin_gguf_path
    from engine.llamacpp.agreement import agreement

    windows = token_windows(DataSpec(split="evaluation", seqlen=256, n_windows=4), gemma.tokenizer, gemma.max_seqlen)
    result = agreement(gemma.model, builtin_gguf_path("gemma3-270m"), windows)
    assert abs(result.ppl_gap) < 0.02, result.describe()
    assert result.same_top > 0.9 and result.kld_mean < 0.02


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_llama_perplexity_protocol_reproduced_in_app_within_two_percent(gemma):
    """llama-perplexity's own protocol (its chunking, BOS per chunk, second-half scoring) on the same GGUF and text."""
    from engine.core.builtins import builtin_gguf_path
    from engine.llamacpp.protocol import inapp_perplexity, llama_perplexity

    text = split_text(DataSpec(split="evaluation"))
    ours = inapp_perplexity(gemma.model, gemma.tokenizer, text, 256, 8)
    theirs = llama_perplexity(builtin_gguf_path("gemma3-270m"), text, 256, 8)
    assert abs(theirs / ours - 1) < 0.02, (ours, theirs)
