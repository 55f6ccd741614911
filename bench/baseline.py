"""Baseline perplexity of the built-in model on wiki-offline evaluation windows.

    python -m bench.baseline [--windows 32] [--seqlen 512]
"""

from __future__ import annotations

import argparse

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.core.progress import Timer
from engine.evaluation.perplexity import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    with Timer() as load_timer:
        loaded = load_model()
    spec = DataSpec(split="evaluation", seqlen=args.seqlen, n_windows=args.windows)
    windows = token_windows(spec, loaded.tokenizer)
    with Timer() as timer:
        result = perplexity(loaded.model, windows)
    row = {"model": loaded.source, "data": windows.label(), "ppl": result.ppl,
           "ci_low": result.ci_low, "ci_high": result.ci_high, "eval_s": timer.seconds,
           "load_s": load_timer.seconds}
    report("baseline", [row], {"device": str(loaded.device), "dtype": str(loaded.dtype)})


if __name__ == "__main__":
    main()
