"""Sensitivity lab on the built-in model: cost of a full scan per action, memory, and score agreement.

    python -m bench.sensitivity [--windows 16] [--seqlen 256] [--actions quant:3,gptq:3,slice:0.25,drop,...]

One dense reference pass caches every layer's input on the wiki-offline
*calibration* split; each action is then measured on every layer alone
(layers i..L-1 and the head re-run).  Per action:

- ``fwd_eq``: forward-equivalents counted from the layers and heads that ran
  (multiply-accumulates of linear weights; target ≤ 0.6·L), and ``wall_fwd``:
  the scan's wall time over one plain dense forward on the same windows
  (``model(input_ids)`` with full logits, timed right before and right after
  the scan and averaged: the machine may be shared, so the load changes);
- ``mem_x_model``: peak resident-memory growth from before the dense pass to the
  peak while the action runs (dense-pass peak + the action's own peak growth,
  sampled every 20 ms), over the model's own parameter bytes; it includes what
  the allocator keeps after frees and one-time library buffers, so it is an upper
  bound; ``cache_x_model`` is the exact size of the cached layer inputs and
  head statistics over the model's bytes;
- Spearman ρ [95% bootstrap interval over windows] of LR (= LIM = BI: one
  ranking), ZD and the best other score against the measured KL per layer.

``--shapes-only`` prints just the counted cost of each action on other model
shapes (built on the meta device, no weights): the same counter on TinyLlama-1.1B's
and Llama-3-8B's shapes, to show how the head's share of a forward sets the floor.
Exact KL needs the full-vocabulary head after every modified layer, so a scan
costs at least ``((L+1)/2·layer + L·head) / forward``; with the built-in model's
head at 21% of a forward that floor is 0.62·L for any action that runs the layer.

Nothing is read from or written to the results store: every number is computed here.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.common import report
from bench.slicing import PeakRSS
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model, model_size
from engine.core.progress import Timer
from engine.scores.outliers import weight_outliers
from engine.scores.redundancy import layer_redundancy
from engine.sensitivity.actions import parse_actions
from engine.sensitivity.agreement import agreement_table, layer_scores
from engine.sensitivity.dense import dense_reference
from engine.sensitivity.findings import rho_text, sensitivity_finding
from engine.sensitivity.scan import scan_action

DEFAULT_ACTIONS = "quant:3,gptq:3,slice:0.25,drop,drop-attn,drop-mlp"


@torch.no_grad()
def plain_forward_seconds(model, input_ids: torch.Tensor, batch_size: int) -> float:
    """Wall time of one dense forward (full logits) over all windows, in the scan's batches."""
    with Timer() as timer:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size], use_cache=False)
    return timer.seconds


def cost_by_shape(actions, loaded) -> list[dict]:
    """Counted forward-equivalents per L of one full scan of each action, on the built-in model and on other
    shapes (meta-device skeletons of ``bench.scale``'s presets), with the head's share of a forward."""
    from transformers import LlamaConfig

    from bench.scale import PRESETS
    from engine.core.architectures import architecture_of
    from engine.core.models import skeleton_of
    from engine.sensitivity.cost import action_forward_equivalents, layer_costs

    models = {"built-in (SmolLM2-135M)": loaded.model}
    for name in ("1b", "llama3-8b"):
        models[f"{name} shape"] = skeleton_of(LlamaConfig(**PRESETS[name], tie_word_embeddings=False))
    rows = []
    for name, model in models.items():
        costs = layer_costs(model, architecture_of(model))
        row = {"shape": name, "layers": costs.num_layers, "head_share": costs.head / costs.forward}
        row.update({a.label: action_forward_equivalents(costs, a) / costs.num_layers for a in actions})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actions", default=DEFAULT_ACTIONS)
    parser.add_argument("--shapes-only", action="store_true", help="only the counted cost on other model shapes")
    args = parser.parse_args()
    actions = parse_actions(args.actions)
    loaded = load_model()
    report("sensitivity_cost_by_shape", cost_by_shape(actions, loaded), {"unit": "forward-equivalents / L"})
    if args.shapes_only:
        return
    model, arch = loaded.model, loaded.architecture
    windows = token_windows(DataSpec(split="calibration", seqlen=args.seqlen, n_windows=args.windows),
                            loaded.tokenizer)
    n_layers = loaded.num_layers
    model_mib = model_size(model)["bytes"] / 2**20
    plain_forward_seconds(model, windows.input_ids, args.batch_size)  # warm-up
    forwards = [plain_forward_seconds(model, windows.input_ids, args.batch_size)]
    with PeakRSS() as dense_memory, Timer() as dense_timer:
        dense = dense_reference(model, arch, windows.input_ids, batch_size=args.batch_size)
    cache_mib = dense.cache_bytes() / 2**20
    damages, rows = [], []
    for action in actions:
        with PeakRSS() as memory:
            damage = scan_action(model, arch, dense, action, data_label=windows.label())
        forwards.append(plain_forward_seconds(model, windows.input_ids, args.batch_size))
        forward_s = (forwards[-2] + forwards[-1]) / 2
        print(f"{action.label}: {damage.seconds:.0f} s (dense forward {forward_s:.1f} s)", file=sys.stderr, flush=True)
        damages.append(damage)
        rows.append({"action": action.label, "seconds": round(damage.seconds, 1),
                     "fwd_eq": damage.forward_equivalents, "fwd_eq_per_L": damage.forward_equivalents / n_layers,
                     "wall_fwd": damage.seconds / forward_s,
                     "mem_x_model": (dense_memory.peak_mib + memory.peak_mib) / model_mib,
                     "cache_x_model": cache_mib / model_mib,
                     "max_kl_layer": max(range(n_layers), key=lambda i: damage.kl[i]),
                     "median_kl": statistics.median(damage.kl)})
    del dense
    lr = layer_redundancy(model, arch, windows)
    outliers = weight_outliers(model, arch)
    table = agreement_table(layer_scores(lr, outliers), damages)
    for row, damage in zip(rows, damages):
        own = {r.score: r for r in table if r.action == damage.spec.key}
        others = [r for r in own.values() if r.same_as is None and r.score not in ("LR", "ZD")]
        best = max(others, key=lambda r: r.rho)
        row.update({"LR=LIM=BI": rho_text(own["LR"]).removeprefix("ρ = "),
                    "ZD": rho_text(own["ZD"]).removeprefix("ρ = "),
                    "best other": f"{best.score} {best.rho:.2f} [{best.low:.2f}, {best.high:.2f}]"})
    meta = {
        "model": loaded.source, "data": windows.label(), "layers": n_layers, "threads": torch.get_num_threads(),
        "device": str(loaded.device), "model_mib": round(model_mib, 1),
        "dense_forward_s": [round(v, 2) for v in forwards], "dense_reference_s": round(dense_timer.seconds, 2),
        "dense_cache_mib": round(cache_mib, 1),
        "dense_reference_peak_mib": round(dense_memory.peak_mib, 1),
        "finding": sensitivity_finding(table, actions),
        "kl": {d.spec.key: [round(v, 6) for v in d.kl] for d in damages},
        "delta_nll": {d.spec.key: [round(v, 5) for v in d.delta_nll] for d in damages},
        "agreement": [r.to_dict() for r in table],
    }
    report("sensitivity", rows, meta)


if __name__ == "__main__":
    main()
