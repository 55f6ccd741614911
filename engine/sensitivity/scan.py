"""Measure one action on every layer alone, from the dense reference (docs/methods.md §6).

For layer ``i``: build the modified layer (:mod:`engine.sensitivity.layer_actions`),
feed it the cached dense input of layer ``i``, run the shared model's layers
``i+1..L-1`` (called with their recorded keyword arguments, never modified)
and the head, and compare with the dense next-token distribution at every
position that has a next token:

- ``kl``: mean KL(p_dense ‖ p_modified) per token, nats (primary; fp64 sums,
  see :mod:`engine.sensitivity.dense` for how it is computed without storing
  distributions);
- ``delta_nll``: change of the mean next-token NLL, nats per token (negative:
  the action happened to help on this sample).

Per-window means are kept for bootstrap intervals.  Nothing is stored here;
a scan either returns a complete :class:`ActionDamage` or raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from engine.core.architectures import Architecture
from engine.core.progress import StageProgress
from engine.sensitivity.actions import Action
from engine.sensitivity.cost import action_forward_equivalents
from engine.sensitivity.dense import DenseReference, head_output, module_device
from engine.sensitivity.errors import ScanCancelled
from engine.sensitivity.layer_actions import layer_for_action

StopCheck = Callable[[], bool]
"""``should_stop()``: True asks a running scan to stop (it raises :class:`ScanCancelled`)."""


@dataclass
class ActionDamage:
    """Damage of one action applied to each decoder layer alone; KL and ΔNLL in nats per token.

    ``kl`` / ``delta_nll``: ``[L]`` means over all measured tokens;
    ``window_kl`` / ``window_delta_nll``: ``[L][n_windows]`` means per window
    (every window has ``seqlen − 1`` measured tokens).  ``details[i]``: facts
    about the modified layer ``i`` (kept dims, bits per weight...).
    ``forward_equivalents``: cost of this scan in dense forwards over the
    sample (dense reference pass not included); ``seconds``: wall time.
    """

    action: dict
    kl: list[float]
    delta_nll: list[float]
    window_kl: list[list[float]]
    window_delta_nll: list[list[float]]
    dense_nll: float
    n_windows: int
    seqlen: int
    n_tokens: int
    data_label: str
    seconds: float
    forward_equivalents: float
    details: list[dict] = field(default_factory=list)

    @property
    def spec(self) -> Action:
        return Action.from_dict(self.action)

    @property
    def num_layers(self) -> int:
        return len(self.kl)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ActionDamage:
        return cls(**data)


def _damage(model: nn.Module, architecture: Architecture, dense: DenseReference, batch: int,
            last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL and ΔNLL ``[b, T−1]`` (fp64, nats) of a batch whose last layer output is ``last``."""
    out = head_output(model, architecture, last, dense.targets[batch])
    ref = dense.head[batch]
    device = out.hidden.device
    shift = ref.hidden.to(device, torch.float64) - out.hidden.to(torch.float64)
    kl = (ref.expected_rows.to(device, torch.float64) * shift).sum(-1) + (out.lse - ref.lse.to(device))
    return kl, out.nll - ref.nll.to(device)


@torch.no_grad()
def scan_action(
    model: nn.Module,
    architecture: Architecture,
    dense: DenseReference,
    action: Action,
    *,
    data_label: str = "",
    progress: StageProgress | None = None,
    should_stop: StopCheck | None = None,
) -> ActionDamage:
    """Apply ``action`` to each layer alone and measure KL and ΔNLL against ``dense``.

    ``model`` is the shared model ``dense`` was taken from; it is only called.
    ``progress(stage, done, total)`` advances once per layer and batch;
    ``should_stop`` is polled as often and raises :class:`ScanCancelled`.
    """
    started = time.perf_counter()
    layers = architecture.decoder_layers(model)
    n_layers, n_batches = len(layers), dense.n_batches
    kl_sums = torch.zeros(n_layers, dense.n_windows, dtype=torch.float64)
    nll_sums = torch.zeros_like(kl_sums)
    details = []
    for i in range(n_layers):
        device = module_device(layers[i])
        modified, detail = layer_for_action(layers[i], architecture, action, partial(dense.layer_batches, i, device))
        details.append(detail)
        for b in range(n_batches):
            if should_stop is not None and should_stop():
                raise ScanCancelled(
                    f"The {action.label} scan was stopped at layer {i} of {n_layers}; nothing of it was stored. "
                    "Run it again to measure it (finished actions are kept).")
            x, kwargs = dense.inputs[i][b].to(device), dense.captured.kwargs_for(i, b, device)
            if modified is not None:
                x = modified(x, **kwargs)
            for j in range(i + 1, n_layers):
                device_j = module_device(layers[j])
                x = layers[j](x.to(device_j), **dense.captured.kwargs_for(j, b, device_j))
            kl, dnll = _damage(model, architecture, dense, b, x)
            first = dense.batch_starts[b]
            kl_sums[i, first : first + kl.shape[0]] = kl.sum(-1).cpu()
            nll_sums[i, first : first + kl.shape[0]] = dnll.sum(-1).cpu()
            if progress is not None:
                progress(f"{action.label}, layer {i + 1}/{n_layers}", i * n_batches + b + 1, n_layers * n_batches)
        del modified
    per_window = dense.tokens_per_window
    dense_nll = float(sum(h.nll.sum() for h in dense.head)) / (per_window * dense.n_windows)
    return ActionDamage(
        action=action.to_dict(),
        kl=(kl_sums.sum(1) / (per_window * dense.n_windows)).tolist(),
        delta_nll=(nll_sums.sum(1) / (per_window * dense.n_windows)).tolist(),
        window_kl=(kl_sums / per_window).tolist(),
        window_delta_nll=(nll_sums / per_window).tolist(),
        dense_nll=dense_nll,
        n_windows=dense.n_windows,
        seqlen=dense.seqlen,
        n_tokens=per_window * dense.n_windows,
        data_label=data_label,
        seconds=time.perf_counter() - started,
        forward_equivalents=action_forward_equivalents(dense.costs, action),
        details=details,
    )
