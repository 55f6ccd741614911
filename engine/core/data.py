"""Text sources and token windows (docs/methods.md §5).

A :class:`DataSpec` names a text source, a split, a window length and a
number of windows.  :func:`token_windows` tokenizes the split once, joins
documents with ``"\\n\\n"``, and cuts non-overlapping windows of ``seqlen``
tokens (the remainder is dropped).

BOS, the model's way: when the tokenizer puts a BOS token in front of a sequence (decided by what
``tokenizer("x").input_ids`` produces, see :func:`bos_token_id`), every window starts with BOS followed by
``seqlen - 1`` text tokens, as llama.cpp and a plain transformers loop feed such a model; the BOS position is
never a prediction target.  Tokenizers that add no BOS (SmolLM2, GPT-2, OPT without one) get plain windows of
``seqlen`` text tokens.

Sources:
- ``wiki-offline``: ~100 real Wikipedia articles from the gensim wheel, markup
  stripped, split by article (a hash of the title) into disjoint
  ``calibration`` and ``evaluation`` parts.
- ``wikitext2``: WikiText-2 raw via ``datasets`` when reachable or cached.
- ``file``: a user's UTF-8 text file; its first half (by paragraphs) is
  ``calibration``, the second half ``evaluation``.
"""

from __future__ import annotations

import bz2
import hashlib
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.core.paths import atomic_file, cache_root

SOURCES = ("wiki-offline", "wikitext2", "file")
SPLITS = ("calibration", "evaluation")
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVALUATION_SHARE = 0.25  # fraction of wiki-offline articles held out for evaluation
MAX_UPLOAD_BYTES = 50 * 1024 * 1024


class DataError(ValueError):
    """A text source cannot provide the requested windows; the message says why."""


class DataUnavailableError(DataError):
    """The source needs data that is neither cached nor reachable."""


@dataclass(frozen=True)
class DataSpec:
    """What text to use: source, split, window length (tokens), number of windows.

    ``n_windows=None`` means every full window the split holds.  ``offset``: windows skipped at the start
    (held-out windows: e.g. calibration windows 16-19 after a measurement on windows 0-15).
    """

    source: str = "wiki-offline"
    split: str = "evaluation"
    seqlen: int = 512
    n_windows: int | None = 32
    path: str | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"Unknown text source '{self.source}'. Choose one of: {', '.join(SOURCES)}.")
        if self.split not in SPLITS:
            raise DataError(f"Unknown split '{self.split}'. Choose 'calibration' or 'evaluation'.")
        if self.seqlen < 2:
            raise DataError(f"seqlen must be at least 2 tokens, got {self.seqlen}.")
        if self.n_windows is not None and self.n_windows < 1:
            raise DataError(f"Number of windows must be at least 1, got {self.n_windows}.")
        if self.source == "file" and not self.path:
            raise DataError("The 'file' source needs the path of a text file.")
        if self.offset < 0:
            raise DataError(f"The window offset must be 0 or more, got {self.offset}.")

    def to_dict(self) -> dict:
        """Plain fields (cache keys, run records); ``offset`` only when non-zero, so keys made before it existed
        still match."""
        fields = asdict(self)
        if not self.offset:
            del fields["offset"]
        return fields

    def label(self) -> str:
        """Short human description for chart captions (asked-for window count)."""
        return describe_data(self.source, self.split, self.n_windows, self.seqlen, self.path, self.offset)


BOS_LABEL = ", BOS each window"  # in the data label of windows that start with BOS (runs never mix with others)


@dataclass(frozen=True)
class TokenWindows:
    """Token ids ``[n_windows, seqlen]`` (int64) cut from one split.

    ``bos``: every window starts with the tokenizer's BOS token (then ``seqlen - 1`` text tokens follow);
    ``note``: a remark on the BOS rule a user should read (e.g. a tokenizer that asks for BOS but has none).
    """

    input_ids: torch.Tensor
    spec: DataSpec
    available: int | None = None  # full windows the split holds (None: unknown)
    bos: bool = False
    note: str = ""

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def label(self) -> str:
        """Caption text with the number of windows actually used (and ``", BOS each window"`` when they start
        with BOS)."""
        return describe_data(self.spec.source, self.spec.split, self.n_windows, self.seqlen, self.spec.path,
                             self.spec.offset) + (BOS_LABEL if self.bos else "")

    def key(self) -> dict:
        """What identifies these windows in cache keys: the spec's fields, plus ``bos`` when BOS was added
        (keys of windows without BOS are what they always were)."""
        return {**self.spec.to_dict(), "bos": True} if self.bos else self.spec.to_dict()

    @property
    def first_scored(self) -> int:
        """First position whose hidden state belongs to text (1 after a BOS, else 0): scores skip BOS."""
        return 1 if self.bos else 0

    def usage(self) -> str:
        """Windows used, asked for and available, e.g.
        ``"2,189 windows of 512 tokens (4,096 asked, 2,189 available)"``."""
        asked = "all" if self.spec.n_windows is None else f"{self.spec.n_windows:,}"
        available = "" if self.available is None else f", {self.available:,} available"
        bos = ", each BOS + text" if self.bos else ""
        return f"{self.n_windows:,} windows of {self.seqlen:,} tokens ({asked} asked{available}{bos})"


def file_identity(path: str) -> str:
    """``name#sha`` of a text file: its name and the first 8 hex digits of its content's SHA-256.

    Two different files with the same name (or one file edited) never share an identity.
    """
    file = Path(path)
    try:
        stat = file.stat()
    except OSError:
        return f"{file.name}#missing"
    return f"{file.name}#{_content_hash(str(file), stat.st_size, stat.st_mtime_ns)}"


@lru_cache(maxsize=64)
def _content_hash(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def describe_data(source: str, split: str, n_windows: int | None, seqlen: int | None, path: str | None = None,
                  offset: int = 0) -> str:
    """The one data label: ``"<source or file#hash> <split>, <n> windows × <seqlen> tokens"`` (``", from window
    <offset>"`` appended when windows were skipped)."""
    name = file_identity(path) if source == "file" and path else source
    count = "all" if n_windows is None else n_windows
    return f"{name} {split}, {count} windows × {seqlen} tokens" + (f", from window {offset}" if offset else "")


def clean_wiki_markup(text: str) -> str:
    """Plain text from gensim-filtered wiki text: no bold/italic quotes, tidy blank lines."""
    text = re.sub(r"'{2,}", "", text)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _is_evaluation_article(title: str) -> bool:
    bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % 1000
    return bucket < EVALUATION_SHARE * 1000


@lru_cache(maxsize=1)
def wiki_offline_articles() -> tuple[tuple[str, str], ...]:
    """(title, clean text) of every real article in the gensim sample, in file order."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / WIKI_FILE
    if not path.exists():
        raise DataUnavailableError(f"The gensim wheel has no Wikipedia sample at {path}; reinstall gensim.")
    articles = []
    with bz2.open(path) as stream:
        for title, raw, _page_id in extract_pages(stream):
            text = clean_wiki_markup(filter_wiki(raw))
            if text.upper().startswith("#REDIRECT") or len(text) < 500:
                continue
            articles.append((title, text))
    return tuple(articles)


def wiki_offline_split(split: str) -> list[tuple[str, str]]:
    """Articles of one split; the two splits share no article."""
    want_eval = split == "evaluation"
    return [a for a in wiki_offline_articles() if _is_evaluation_article(a[0]) == want_eval]


def _wikitext2_text(split: str) -> str:
    try:
        from datasets import load_dataset

        hf_split = "train" if split == "calibration" else "test"
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as err:  # datasets raises many types when offline
        raise DataUnavailableError(
            "WikiText-2 is not cached and the Hugging Face hub cannot be reached. "
            "Use the offline source 'wiki-offline' (Wikipedia bundled with gensim) instead."
        ) from err
    return "\n\n".join(rows["text"])


def read_user_text(path: str | Path) -> str:
    """A user's file as text, refusing missing, empty, oversized or binary files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Text file '{path}' does not exist.")
    raw = path.read_bytes()
    return validate_text_bytes(raw, path.name)


def validate_text_bytes(raw: bytes, name: str = "upload") -> str:
    """Decode an upload as UTF-8 text or explain why it is not usable text."""
    if len(raw) > MAX_UPLOAD_BYTES:
        raise DataError(f"'{name}' is {len(raw) / 2**20:.0f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB.")
    if b"\x00" in raw:
        raise DataError(f"'{name}' looks binary (it contains NUL bytes). Upload a UTF-8 plain-text file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"'{name}' is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not text.strip():
        raise DataError(f"'{name}' is empty. Upload a file with some text in it.")
    return text


def save_upload(raw: bytes, name: str) -> Path:
    """Validate an uploaded file and keep it under ``cache/uploads`` (content-addressed)."""
    validate_text_bytes(raw, name)
    folder = cache_root() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).stem)[:40] or "upload"
    target = folder / f"{stem}-{hashlib.sha256(raw).hexdigest()[:12]}.txt"
    if not target.exists():
        with atomic_file(target) as temp:
            temp.write_bytes(raw)
    return target


def _file_text(path: str, split: str) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", read_user_text(path)) if p.strip()]
    if len(paragraphs) == 1:
        text = paragraphs[0]
        half = len(text) // 2
        return text[:half] if split == "calibration" else text[half:]
    half = len(paragraphs) // 2
    chosen = paragraphs[:half] if split == "calibration" else paragraphs[half:]
    return "\n\n".join(chosen)


def split_text(spec: DataSpec) -> str:
    """All text of the spec's split, documents joined with blank lines."""
    if spec.source == "wiki-offline":
        return "\n\n".join(text for _title, text in wiki_offline_split(spec.split))
    if spec.source == "wikitext2":
        return _wikitext2_text(spec.split)
    return _file_text(spec.path, spec.split)


@lru_cache(maxsize=16)
def tokenizer_fingerprint(tokenizer) -> str | None:
    """SHA-256 prefix of everything a fast tokenizer's output depends on (its full JSON: vocabulary,
    normalizer, pre-tokenizer, post-processor with BOS/EOS rules, added tokens); ``None`` for a slow
    tokenizer (then token ids are cached in memory only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{backend.to_str()}".encode()).hexdigest()[:24]


def bos_token_id(tokenizer) -> int | None:
    """The BOS id every window must start with, or ``None`` when the tokenizer adds no BOS to a sequence.

    Decided by what the tokenizer does (``tokenizer("x").input_ids`` starts with its BOS id), not by its
    ``add_bos_token`` attribute: Gemma-3's tokenizer prepends BOS through its template whatever the attribute
    says, SmolLM2's adds none.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x").input_ids
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def bos_note(tokenizer) -> str:
    """A remark when the tokenizer's BOS settings contradict each other, else ``""``."""
    if getattr(tokenizer, "add_bos_token", False) and getattr(tokenizer, "bos_token_id", None) is None:
        return ("The tokenizer sets add_bos_token but defines no BOS token, so windows start with text, not BOS. "
                "If the model expects BOS, give its tokenizer a bos_token (tokenizer_config.json) and reload.")
    return ""


@lru_cache(maxsize=8)
def _token_ids(tokenizer, source: str, split: str, path: str | None, _identity: str | None,
               plain: bool = False) -> torch.Tensor:
    """Token ids ``[n_tokens]`` of a split; also kept on disk under ``cache/tokens`` (keyed by the tokenizer's
    fingerprint and the text's SHA-256), so reloading a model or restarting the app does not re-tokenize.
    ``_identity``: the file's content identity (part of the in-memory key: an edited file is re-read).
    ``plain``: without the tokenizer's special tokens (BOS is then added per window)."""
    text = split_text(DataSpec(source=source, split=split, path=path))

    def tokenize() -> torch.Tensor:
        return tokenizer(text, return_tensors="pt", add_special_tokens=not plain).input_ids[0]

    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return tokenize()
    text_sha = hashlib.sha256(text.encode()).hexdigest()[:24]
    file = cache_root() / "tokens" / f"{fingerprint}-{text_sha}{'-plain' if plain else ''}.pt"
    try:
        return torch.load(file, weights_only=True)
    except Exception:  # noqa: BLE001 - missing or damaged (any unpickling error): tokenize and (re)write
        pass
    ids = tokenize()
    with atomic_file(file) as temp:
        torch.save(ids, temp)
    return ids


def token_windows(spec: DataSpec, tokenizer, max_seqlen: int | None = None) -> TokenWindows:
    """Non-overlapping windows ``[n, seqlen]``; fewer than asked if the split is short.

    With a BOS tokenizer (:func:`bos_token_id`) each window is BOS + ``seqlen - 1`` text tokens.
    """
    if max_seqlen is not None and spec.seqlen > max_seqlen:
        raise DataError(
            f"seqlen {spec.seqlen} is longer than this model allows ({max_seqlen} tokens). "
            f"Choose {max_seqlen} or less."
        )
    bos = bos_token_id(tokenizer)
    text_len = spec.seqlen - (bos is not None)
    if bos is not None and text_len < 2:
        raise DataError(f"This model's windows start with BOS, so a window of {spec.seqlen} tokens holds only "
                        f"{text_len} text token: nothing to learn from. Choose a window of at least 3 tokens.")
    ids = _token_ids(tokenizer, spec.source, spec.split, spec.path, file_identity(spec.path) if spec.path else None,
                     bos is not None)
    available = ids.numel() // text_len - spec.offset
    if available <= 0:
        skipped = f" after skipping {spec.offset} windows" if spec.offset else ""
        raise DataError(
            f"The {spec.split} text of '{spec.label()}' has only {ids.numel()} tokens: "
            f"not one window of {spec.seqlen}{skipped}. Use a shorter seqlen, fewer windows or more text."
        )
    count = available if spec.n_windows is None else min(spec.n_windows, available)
    start = spec.offset * text_len
    windows = ids[start: start + count * text_len].reshape(count, text_len)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=windows.dtype), windows], dim=1)
    return TokenWindows(input_ids=windows.clone(), spec=spec, available=available, bos=bos is not None,
                        note=bos_note(tokenizer))
