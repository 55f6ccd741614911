"""SliceGPT on the built-in model: constant vs LR-driven dynamic schedules.

    python -m bench.slicing [--quick]

PCA calibration on the wiki-offline *calibration* split; the slicing basis SB
of each dynamic schedule is chosen by perplexity on a few further
calibration-split windows (the *selection* windows, not used for PCA), and
every row is then scored on the *evaluation* split.  LR scores come from
``engine.scores`` on the PCA calibration windows.  Peak memory is the peak
resident-set growth of this process while slicing (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import torch

from bench.common import report
from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.models import load_model, model_size
from engine.evaluation.latency import compare_latency
from engine.evaluation.perplexity import perplexity
from engine.slicing.schedules import ScheduleError, schedule_constant, schedule_dynamic
from engine.slicing.slice_model import slice_model

FULL = dict(targets=[0.10, 0.20, 0.25, 0.30], bases=[0.0, 0.05, 0.10, 0.15, 0.20], cal=32, sel=4, eval=16, seqlen=256)
QUICK = dict(targets=[0.10, 0.25], bases=[0.0, 0.10], cal=16, sel=2, eval=8, seqlen=256)


class PeakRSS:
    """Peak growth of this process's resident memory (MiB) inside a ``with`` block."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s, self.peak_mib = interval_s, 0.0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * self._page / 2**20
        except OSError:  # not Linux: process-lifetime peak instead
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._rss())

    def __enter__(self) -> PeakRSS:
        self._base = self._max = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self._max, self._rss()) - self._base


def lr_scores(loaded, windows: TokenWindows) -> list[float]:
    """LR per layer from the engine's scorer (hooks on decoder layers, docs/methods.md §1)."""
    from engine.scores.redundancy import layer_redundancy

    return layer_redundancy(loaded.model, loaded.architecture, windows).lr


def run_one(loaded, cal, sel, ev, schedule, label: str, probe: torch.Tensor) -> dict:
    """Slice, then measure selection and evaluation perplexity, parameters, time, memory, latency."""
    with PeakRSS() as memory:
        result = slice_model(loaded, schedule, cal)
    rep = result.report
    row = {
        "schedule": label, "SP": schedule.target, "SB": schedule.basis,
        "achieved": round(rep.achieved_fraction, 4), "min_dim": min(rep.dims), "max_dim": max(rep.dims),
        "sel_ppl": perplexity(result.model, sel).ppl if sel is not None else None,
        "ppl": perplexity(result.model, ev).ppl,
        "params_M": rep.params_sliced / 1e6, "shortcut_M": rep.shortcut_params / 1e6,
        "slice_s": rep.seconds, "peak_MiB": memory.peak_mib,
        "speedup": compare_latency(loaded.model, result.model, probe, repeats=3)["speedup"],
    }
    del result
    return row


def best_dynamic(loaded, cal, sel, ev, lr, target, bases, probe) -> tuple[list[dict], list[str]]:
    """Dynamic rows for every feasible SB < SP; the one with the lowest selection ppl is marked."""
    rows, skipped = [], []
    for basis in [b for b in bases if b < target]:
        try:
            schedule = schedule_dynamic(lr, target, basis)
        except ScheduleError as err:
            skipped.append(f"SP={target} SB={basis}: {err}")
            continue
        rows.append(run_one(loaded, cal, sel, ev, schedule, "dynamic", probe))
    if rows:
        best = min(rows, key=lambda r: r["sel_ppl"])
        best["schedule"] = "dynamic*"
    return rows, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="SP 10/25%%, SB {0, 0.1}, 16+2 × 256 calibration, 8 × 256 eval")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    loaded = load_model()
    seqlen = grid["seqlen"]
    pool = token_windows(DataSpec(split="calibration", seqlen=seqlen, n_windows=grid["cal"] + grid["sel"]),
                         loaded.tokenizer)
    cal = TokenWindows(pool.input_ids[: grid["cal"]],
                       DataSpec(split="calibration", seqlen=seqlen, n_windows=grid["cal"]))
    sel = TokenWindows(pool.input_ids[grid["cal"]:],
                       DataSpec(split="calibration", seqlen=seqlen, n_windows=grid["sel"]))
    ev = token_windows(DataSpec(split="evaluation", seqlen=seqlen, n_windows=grid["eval"]), loaded.tokenizer)
    probe = ev.input_ids[:1]
    started = time.perf_counter()
    lr = lr_scores(loaded, cal)
    lr_s = time.perf_counter() - started
    dense_params = model_size(loaded.model)["params"]
    rows = [{"schedule": "dense", "SP": 0.0, "SB": None, "achieved": 0.0, "min_dim": loaded.model.config.hidden_size,
             "max_dim": loaded.model.config.hidden_size, "sel_ppl": perplexity(loaded.model, sel).ppl,
             "ppl": perplexity(loaded.model, ev).ppl, "params_M": dense_params / 1e6, "shortcut_M": 0.0,
             "slice_s": 0.0, "peak_MiB": 0.0, "speedup": 1.0}]
    skipped = []
    for target in grid["targets"]:
        rows.append(run_one(loaded, cal, sel, ev, schedule_constant(target, loaded.num_layers), "constant", probe))
        dynamic, notes = best_dynamic(loaded, cal, sel, ev, lr, target, grid["bases"], probe)
        rows += dynamic
        skipped += notes
    meta = {
        "model": loaded.source, "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "quick": args.quick,
        "calibration": cal.label(), "selection": sel.label() + " (after the PCA windows)",
        "evaluation": ev.label(), "round_to": 8, "wiring": "head unsliced (last layer writes full D)",
        "lr_scores": [round(v, 4) for v in lr], "lr_s": round(lr_s, 2),
        "dynamic*": "SB with the lowest selection ppl for that SP", "skipped": skipped,
        "speedup": "dense / sliced median forward time on 1 evaluation window",
        "peak_MiB": "peak RSS growth while slicing (includes the model copy)",
    }
    report("slicing-quick" if args.quick else "slicing", rows, meta)


if __name__ == "__main__":
    main()
