"""Layer Redundancy (docs/methods.md §1): LR cosine and its attention / MLP parts.

``layer_redundancy`` streams calibration windows through the model once, with
forward hooks on every decoder layer and on its attention block, and
accumulates per-token cosines in fp32/fp64 without keeping any token tensor:
memory is O(layers × positions).  Pure math: caching lives in
``engine.runs.cached_scores``.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.core.architectures import Architecture, Feature, get_submodule
from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn
from engine.evaluation.perplexity import model_device

HIST_BINS = 200  # per-token cosine histogram over [-1, 1], bins of 0.01


@dataclass
class LayerRedundancy:
    """Per-token cosine statistics between each decoder layer's input and output.

    Lists are indexed by layer (``L`` entries).  ``position_cos`` is
    ``[L][seqlen]`` (mean over windows), ``window_cos`` is ``[L][n_windows]``,
    ``histogram`` is ``[L][HIST_BINS]`` token counts over [-1, 1].
    ``attn_cos`` compares the residual before attention with the residual
    after adding attention's output (times the layer's residual multiplier,
    if any); ``mlp_cos`` the same around the MLP.  Both are NaN for a model
    whose attention block cannot be identified (``arch.reason("sublayer")``);
    for parallel blocks (Phi-2) "after attention" is ``x + attention(norm(x))``.
    """

    lr: list[float]
    attn_cos: list[float]
    mlp_cos: list[float]
    position_cos: list[list[float]]
    window_cos: list[list[float]]
    histogram: list[list[int]]
    n_tokens: int
    n_windows: int
    seqlen: int
    data_label: str

    @property
    def lim(self) -> list[float]:
        """Layer Input Modification, −LR: higher means more important."""
        return [-v for v in self.lr]

    @property
    def bi(self) -> list[float]:
        """ShortGPT's Block Influence, 1 − LR."""
        return [1.0 - v for v in self.lr]

    def to_dict(self) -> dict:
        return asdict(self)


class _Accumulator:
    """Running sums of per-token cosines for one pass (fp64, O(L × seqlen))."""

    def __init__(self, n_layers: int, n_windows: int, seqlen: int) -> None:
        shape = (n_layers,)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.attn = torch.zeros(shape, dtype=torch.float64)
        self.mlp = torch.zeros(shape, dtype=torch.float64)
        self.tokens = 0
        self.position = torch.zeros((n_layers, seqlen), dtype=torch.float64)
        self.position_count = torch.zeros(seqlen, dtype=torch.float64)
        self.window = torch.zeros((n_layers, n_windows), dtype=torch.float64)
        self.window_count = torch.zeros(n_windows, dtype=torch.float64)
        self.histogram = torch.zeros((n_layers, HIST_BINS), dtype=torch.int64)

    def add_batch_mask(self, mask: torch.Tensor, first_window: int) -> None:
        """Count the tokens of a batch once (``mask``: [b, s], 1 = real token)."""
        mask = mask.double().cpu()
        self.tokens += int(mask.sum())
        self.position_count[: mask.shape[1]] += mask.sum(dim=0)
        self.window_count[first_window : first_window + mask.shape[0]] += mask.sum(dim=1)

    def add_layer(self, layer: int, cos: torch.Tensor, mask: torch.Tensor, first_window: int) -> None:
        """Add one layer's per-token cosines ``cos`` [b, s] (masked by ``mask``)."""
        cos = (cos.double() * mask).cpu()
        self.total[layer] += cos.sum()
        self.position[layer, : cos.shape[1]] += cos.sum(dim=0)
        self.window[layer, first_window : first_window + cos.shape[0]] += cos.sum(dim=1)
        real = cos[mask.cpu().bool()].float()
        bins = ((real.clamp(-1, 1) + 1) / 2 * HIST_BINS).long().clamp(max=HIST_BINS - 1)
        self.histogram[layer] += torch.bincount(bins, minlength=HIST_BINS)


def _token_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine per token between hidden states [b, s, D] -> [b, s], in fp32."""
    return F.cosine_similarity(x.float(), y.float(), dim=-1)


class _LayerHooks:
    """Hooks on one decoder layer that feed the accumulator; outputs untouched.

    The model may be shared (one cached copy serves every dashboard session),
    so the hooks act only on forwards run by the thread that installed them:
    another session's concurrent forward passes through them unseen.
    """

    def __init__(self, index: int, layer: torch.nn.Module, arch: Architecture, acc: _Accumulator):
        self.index, self.acc = index, acc
        self.thread = threading.get_ident()
        self.batch_mask: torch.Tensor | None = None
        self.first_window = 0
        self._x = self._attn_out = None
        self.sublayers = arch.reason(Feature.SUBLAYER) is None
        multiplier = arch.residual_multiplier
        self.scale = float(getattr(layer, multiplier)) if multiplier else 1.0  # Granite scales block outputs
        self.handles = [
            layer.register_forward_pre_hook(self._on_input, with_kwargs=True),
            layer.register_forward_hook(self._on_output),
        ]
        if self.sublayers:
            self.handles.append(get_submodule(layer, arch.attention).register_forward_hook(self._on_attention))

    def _mine(self) -> bool:
        return threading.get_ident() == self.thread

    def _on_input(self, _module, args, kwargs):
        if self._mine():
            self._x = args[0] if args else kwargs["hidden_states"]

    def _on_attention(self, _module, _args, output):
        if self._mine():
            self._attn_out = output[0] if isinstance(output, tuple) else output

    def _on_output(self, _module, _args, output):
        if not self._mine():
            return
        y = output[0] if isinstance(output, tuple) else output
        mask = self.batch_mask.to(y.device, torch.float64)
        acc, i, w = self.acc, self.index, self.first_window
        acc.add_layer(i, _token_cos(self._x, y), mask, w)
        if not self.sublayers:  # attention / MLP not identifiable: their cosines stay NaN
            acc.attn[i] = acc.mlp[i] = float("nan")
        else:
            mid = self._x.float() + self.scale * self._attn_out.float()
            acc.attn[i] += (_token_cos(self._x, mid).double() * mask).sum().cpu()
            acc.mlp[i] += (_token_cos(mid, y).double() * mask).sum().cpu()
        self._x = self._attn_out = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def layer_redundancy(
    model: torch.nn.Module,
    arch: Architecture,
    windows: TokenWindows,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> LayerRedundancy:
    """LR and sublayer cosines over ``windows`` (``attention_mask`` [n, seqlen], 1 = real token).

    A BOS position (windows that start with BOS) is attended to but not scored: its hidden state carries no
    text, and its outsized norm (an attention sink) would otherwise weigh on every layer's mean.
    """
    layers = arch.decoder_layers(model)
    ids = windows.input_ids
    mask_all = torch.ones_like(ids) if attention_mask is None else attention_mask
    scored_all = mask_all.clone()
    scored_all[:, : windows.first_scored] = 0
    acc = _Accumulator(len(layers), ids.shape[0], ids.shape[1])
    hooks = [_LayerHooks(i, layer, arch, acc) for i, layer in enumerate(layers)]
    device = model_device(model)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch, mask = ids[start : start + batch_size], mask_all[start : start + batch_size]
            scored = scored_all[start : start + batch_size]
            for hook in hooks:
                hook.batch_mask, hook.first_window = scored, start
            acc.add_batch_mask(scored, start)
            model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
            if progress is not None:
                progress(min(start + batch_size, ids.shape[0]), ids.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    return _finish(acc, windows)


def _finish(acc: _Accumulator, windows: TokenWindows) -> LayerRedundancy:
    tokens = max(acc.tokens, 1)
    position = torch.where(acc.position_count > 0, acc.position / acc.position_count.clamp(min=1), float("nan"))
    window = acc.window / acc.window_count.clamp(min=1)
    return LayerRedundancy(
        lr=(acc.total / tokens).tolist(),
        attn_cos=(acc.attn / tokens).tolist(),
        mlp_cos=(acc.mlp / tokens).tolist(),
        position_cos=position.tolist(),
        window_cos=window.tolist(),
        histogram=acc.histogram.tolist(),
        n_tokens=acc.tokens,
        n_windows=windows.n_windows,
        seqlen=windows.seqlen,
        data_label=windows.label(),
    )
