"""Text sources and windows."""

from __future__ import annotations

import pytest
import torch

from engine.core.data import (
    DataError,
    DataSpec,
    DataUnavailableError,
    save_upload,
    split_text,
    token_windows,
    validate_text_bytes,
    wiki_offline_split,
)


def test_wiki_offline_splits_are_disjoint_and_clean():
    calibration = wiki_offline_split("calibration")
    evaluation = wiki_offline_split("evaluation")
    assert len(calibration) > 50 and len(evaluation) > 15
    assert not {t for t, _ in calibration} & {t for t, _ in evaluation}
    text = split_text(DataSpec(split="evaluation"))
    assert "'''" not in text and "#REDIRECT" not in text.upper()


def test_windows_are_consecutive_non_overlapping_cuts(builtin):
    spec = DataSpec(split="evaluation", seqlen=64, n_windows=5)
    windows = token_windows(spec, builtin.tokenizer)
    assert windows.input_ids.shape == (5, 64)
    stream = builtin.tokenizer(split_text(spec), return_tensors="pt").input_ids[0]
    assert torch.equal(windows.input_ids.reshape(-1), stream[: 5 * 64])


def test_window_count_is_capped_by_the_text(builtin, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("First paragraph is here.\n\nSecond paragraph is also here, a bit longer.")
    windows = token_windows(DataSpec(source="file", split="evaluation", seqlen=4, n_windows=100,
                                     path=str(path)), builtin.tokenizer)
    assert 1 <= windows.n_windows < 100


def test_seqlen_longer_than_model_allows(builtin):
    with pytest.raises(DataError, match="longer than this model allows"):
        token_windows(DataSpec(seqlen=9000), builtin.tokenizer, builtin.max_seqlen)


def test_too_little_text_for_one_window(builtin, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.")
    with pytest.raises(DataError, match="not one window"):
        token_windows(DataSpec(source="file", seqlen=512, path=str(path)), builtin.tokenizer)


@pytest.mark.parametrize("raw, message", [
    (b"", "empty"),
    (b"   \n\n ", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_uploads_are_refused(raw, message):
    with pytest.raises(DataError, match=message):
        validate_text_bytes(raw, "upload.bin")
    with pytest.raises(DataError):
        save_upload(raw, "upload.bin")


def test_upload_is_kept_by_content():
    first = save_upload(b"Some useful text.\n\nMore of it.", "notes.txt")
    again = save_upload(b"Some useful text.\n\nMore of it.", "notes.txt")
    assert first == again and first.read_text().startswith("Some useful")


def test_wikitext2_offline_names_the_offline_source():
    with pytest.raises(DataUnavailableError, match="wiki-offline"):
        split_text(DataSpec(source="wikitext2"))


@pytest.mark.parametrize("kwargs", [dict(source="pg19"), dict(split="test"), dict(seqlen=1),
                                    dict(n_windows=0), dict(source="file")])
def test_invalid_specs(kwargs):
    with pytest.raises(DataError):
        DataSpec(**kwargs)


def test_token_ids_are_cached_on_disk_by_tokenizer_and_text(tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    from engine.core.data import _token_ids, tokenizer_fingerprint
    from engine.core.paths import cache_root

    def entries() -> set:
        return set((cache_root() / "tokens").glob(f"{tokenizer_fingerprint(first)}-*.pt"))

    text = tmp_path / "notes.txt"
    text.write_text("The first paragraph about layers.\n\nThe second paragraph about bits and widths.")
    spec = DataSpec(source="file", split="evaluation", seqlen=4, n_windows=2, path=str(text))
    first, second = AutoTokenizer.from_pretrained(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    assert first is not second and tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    expected = first(split_text(spec), return_tensors="pt").input_ids[0]
    before = entries()
    ids = token_windows(spec, first).input_ids
    (file,) = entries() - before
    assert torch.equal(torch.load(file), expected)
    file.write_bytes(b"damaged")  # a damaged entry is re-tokenized, not trusted
    _token_ids.cache_clear()
    assert torch.equal(token_windows(spec, second).input_ids, ids)
    assert torch.equal(torch.load(file), expected)
    text.write_text("Other words entirely.\n\nAnd a second paragraph here.")  # an edited file: a new entry
    assert not torch.equal(token_windows(spec, second).input_ids, ids)
    assert len(entries() - before) == 2
    first.add_tokens(["<layerlab-new-token>"])  # a changed tokenizer: another fingerprint
    tokenizer_fingerprint.cache_clear()
    assert tokenizer_fingerprint(first) != tokenizer_fingerprint(second)
