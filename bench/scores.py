"""Scoring overhead: LR scoring pass vs the same forward pass without hooks.

    python -m bench.scores [--windows 16] [--seqlen 256] [--repeats 3]

Both sides run the identical forward call (``logits_to_keep=1``) over the
same calibration windows; the ratio is median(scoring) / median(plain).
Peak memory is the growth of the process's max RSS over the plain pass.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.core.progress import Timer
from engine.scores.outliers import weight_outliers
from engine.scores.redundancy import layer_redundancy


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def plain_pass(model, windows, batch_size: int = 4) -> None:
    for start in range(0, windows.n_windows, batch_size):
        model(input_ids=windows.input_ids[start : start + batch_size], use_cache=False, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model()
    windows = token_windows(DataSpec(split="calibration", seqlen=args.seqlen, n_windows=args.windows),
                            loaded.tokenizer)
    plain_pass(loaded.model, windows)  # warm-up
    plain_times, score_times = [], []
    for _ in range(args.repeats):
        with Timer() as plain:
            plain_pass(loaded.model, windows)
        plain_times.append(plain.seconds)
        rss_plain = max_rss_mib()
        with Timer() as scoring:
            scores = layer_redundancy(loaded.model, loaded.architecture, windows)
        score_times.append(scoring.seconds)
    with Timer() as zd_timer:
        weight_outliers(loaded.model, loaded.architecture)
    plain_s, score_s = statistics.median(plain_times), statistics.median(score_times)
    rows = [
        {"pass": "plain forward", "seconds": plain_s, "ratio": 1.0},
        {"pass": "LR scoring", "seconds": score_s, "ratio": score_s / plain_s},
        {"pass": "ZD (weights only)", "seconds": zd_timer.seconds, "ratio": zd_timer.seconds / plain_s},
    ]
    most = sorted(range(len(scores.lr)), key=lambda i: -scores.lr[i])[:5]
    meta = {
        "model": loaded.source, "data": windows.label(), "threads": torch.get_num_threads(),
        "peak_rss_mib": round(max_rss_mib(), 1),
        "extra_peak_rss_mib_while_scoring": round(max_rss_mib() - rss_plain, 1),
        "most_redundant_layers": most,
        "lr": [round(v, 4) for v in scores.lr],
    }
    report("scores", rows, meta)


if __name__ == "__main__":
    main()
