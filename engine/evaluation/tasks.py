"""Offline zero-shot tasks built from the wiki-offline *evaluation* articles.

No download is needed: the text ships in the gensim wheel.  Two tasks, both
deterministic (fixed seed, articles in file order), written as jsonl + an
lm-eval task YAML under ``cache/data/tasks/<version>/``:

- ``layerlab_wiki_continuation`` (multiple choice, 4 options): the first one to
  three sentences of a paragraph as context; the paragraph's next sentence is
  the right answer; three distractors are sentences of similar length drawn
  from *other* evaluation articles.  Chance is 25%; reports acc and acc_norm.
- ``layerlab_wiki_lastword`` (LAMBADA-style): a paragraph's opening sentences
  with the final word of the last one removed; acc is whether the model's
  greedy continuation is exactly that word.

Calibration articles are never used, so calibration text and task text are
disjoint.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.data import wiki_offline_split
from engine.core.paths import atomic_file, cache_root

TASKS_VERSION = 1
CONTINUATION_TASK = "layerlab_wiki_continuation"
LASTWORD_TASK = "layerlab_wiki_lastword"
OFFLINE_TASKS = (CONTINUATION_TASK, LASTWORD_TASK)
MAX_ITEMS = 400
SEED = 1234

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class Paragraph:
    article: str
    sentences: tuple[str, ...]


def _good_sentence(sentence: str) -> bool:
    words = sentence.split()
    return 6 <= len(words) <= 45 and "=" not in sentence and sentence[-1] in ".!?"


def evaluation_paragraphs() -> list[Paragraph]:
    """Paragraphs of the evaluation articles, split into clean sentences."""
    paragraphs = []
    for title, text in wiki_offline_split("evaluation"):
        for block in text.split("\n\n"):
            block = " ".join(block.split())
            sentences = tuple(s for s in _SENTENCE_END.split(block) if s)
            if len(sentences) >= 2 and all(_good_sentence(s) for s in sentences[:4]):
                paragraphs.append(Paragraph(title, sentences[:4]))
    return paragraphs


def continuation_items(paragraphs: list[Paragraph], rng: random.Random) -> list[dict]:
    """Multiple-choice items: context, 4 choices, index of the real next sentence."""
    pool = [(p.article, s) for p in paragraphs for s in p.sentences]
    items = []
    for paragraph in paragraphs:
        cut = min(len(paragraph.sentences) - 1, 3)
        context, gold = " ".join(paragraph.sentences[:cut]), paragraph.sentences[cut]
        length = len(gold.split())
        candidates = [s for a, s in pool
                      if a != paragraph.article and abs(len(s.split()) - length) <= max(3, length // 3)]
        if len(candidates) < 3:
            continue
        choices = rng.sample(candidates, 3) + [gold]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(gold),
                      "article": paragraph.article})
    return items


def lastword_items(paragraphs: list[Paragraph]) -> list[dict]:
    """Last-word items: context without the final word, target ' word'."""
    items = []
    for paragraph in paragraphs:
        text = " ".join(paragraph.sentences[:3])
        match = re.match(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]$", text)
        if match:
            items.append({"context": match.group(1), "target": " " + match.group(2),
                          "article": paragraph.article})
    return items


def _task_yaml(task: str, data_file: Path) -> str:
    common = (
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
    )
    if task == CONTINUATION_TASK:
        return common + (
            "output_type: multiple_choice\n"
            "doc_to_text: \"{{context}}\"\n"
            "doc_to_choice: choices\n"
            "doc_to_target: label\n"
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: {TASKS_VERSION}\n"
        )
    return common + (
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_target: \"{{target}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: {TASKS_VERSION}\n"
    )


def build_offline_tasks(folder: Path | None = None) -> Path:
    """Write both tasks (jsonl + YAML) once; returns the folder for ``include_path``."""
    folder = folder or cache_root() / "data" / "tasks" / f"v{TASKS_VERSION}"
    if all((folder / f"{task}.yaml").exists() for task in OFFLINE_TASKS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = evaluation_paragraphs()
    rng = random.Random(SEED)
    items = {CONTINUATION_TASK: continuation_items(paragraphs, rng), LASTWORD_TASK: lastword_items(paragraphs)}
    for task, rows in items.items():
        rng.shuffle(rows)  # a fixed-seed sample over all articles, not the first few
        rows = rows[:MAX_ITEMS]
        data_file = folder / f"{task}.jsonl"
        _atomic_write(data_file, "".join(json.dumps(row) + "\n" for row in rows))
        _atomic_write(folder / f"{task}.yaml", _task_yaml(task, data_file))
    return folder


def _atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as temp:
        temp.write_text(text)
