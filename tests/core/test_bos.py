"""BOS per window, the tokenizer's way: windows, labels, cache keys, perplexity and LR on tiny models with and
without BOS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.core.architectures import architecture_of
from engine.core.data import BOS_LABEL, DataError, DataSpec, bos_token_id, split_text, token_windows
from engine.evaluation.perplexity import perplexity
from engine.scores.redundancy import layer_redundancy
from tests.tiny_models import tiny_model_folder

SPEC = DataSpec(split="evaluation", seqlen=32, n_windows=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-bos"))


def _bos_tokenizer(folder):
    """The built-in tokenizer made to prepend BOS through its template, as Gemma-3's does (its
    ``add_bos_token`` attribute still says False)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tokenizer.bos_token = "<|endoftext|>"
    assert not getattr(tokenizer, "add_bos_token", False)
    return tokenizer


def test_a_tokenizer_that_adds_no_bos_keeps_plain_windows(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token_id is not None and bos_token_id(tokenizer) is None  # SmolLM2 has one, adds none
    windows = token_windows(SPEC, tokenizer)
    text_ids = tokenizer(split_text(SPEC), return_tensors="pt").input_ids[0]
    assert torch.equal(windows.input_ids, text_ids[: 4 * 32].reshape(4, 32))
    assert not windows.bos and BOS_LABEL not in windows.label() and "bos" not in windows.key()


def test_a_bos_tokenizer_gets_bos_then_seqlen_minus_one_text_tokens_per_window(folder):
    tokenizer = _bos_tokenizer(folder)
    assert bos_token_id(tokenizer) == 0
    windows = token_windows(SPEC, tokenizer)
    text_ids = tokenizer(split_text(SPEC), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert windows.input_ids.shape == (4, 32)
    assert (windows.input_ids[:, 0] == 0).all()
    assert torch.equal(windows.input_ids[:, 1:], text_ids[: 4 * 31].reshape(4, 31))  # consecutive text
    assert windows.bos and windows.label().endswith(BOS_LABEL) and windows.key()["bos"] is True
    assert windows.first_scored == 1 and "BOS" in windows.usage()


def test_bos_windows_refuse_a_window_with_one_text_token(folder):
    with pytest.raises(DataError, match="at least 3"):
        token_windows(DataSpec(split="evaluation", seqlen=2, n_windows=1), _bos_tokenizer(folder))


def test_a_tokenizer_asking_for_bos_without_one_says_so(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = None
    object.__setattr__(tokenizer, "_add_bos_token", True)  # as a custom tokenizer may report (transformers' own
    assert tokenizer.add_bos_token and tokenizer.bos_token_id is None  # setter resets it)
    windows = token_windows(SPEC, tokenizer)
    assert not windows.bos and "defines no BOS token" in windows.note


def test_perplexity_with_bos_equals_a_plain_loop_that_prepends_bos(folder):
    tokenizer = _bos_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = token_windows(SPEC, tokenizer)
    text_ids = tokenizer(split_text(SPEC), add_special_tokens=False, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(4):  # the reference: BOS + the next 31 text tokens, every text token scored
            ids = torch.cat([torch.tensor([0]), text_ids[i * 31: (i + 1) * 31]])[None]
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
            count += 31
    result = perplexity(model, windows)
    assert result.n_tokens == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert len(result.window_nll) == 4


def test_lr_skips_the_bos_position(folder):
    tokenizer = _bos_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    arch = architecture_of(model)
    windows = token_windows(SPEC, tokenizer)
    scores = layer_redundancy(model, arch, windows)
    assert scores.n_tokens == 4 * 31
    assert all(math.isnan(row[0]) for row in scores.position_cos)
    for layer, row in enumerate(scores.position_cos):  # LR is the token mean over text positions only
        assert scores.lr[layer] == pytest.approx(sum(row[1:]) / 31, rel=1e-6)
