"""The dense reference: one pass that caches what every later measurement starts from.

The hidden state entering layer ``i`` does not depend on anything done to
layers ``≥ i``, so one dense pass records, per batch of calibration windows:

- ``inputs[i]``: the residual stream entering every layer ``i`` (``L`` tensors
  ``[b, T, D]`` in the model's dtype), and the keyword arguments the model
  passes each layer (attention masks, rotary position embeddings), taken with
  :func:`engine.core.capture.capture_layer_inputs` on a *shell copy* of the
  model (a new module tree sharing every parameter and buffer, so the shared
  model is never touched, not even for a moment);
- the head's reference statistics for the next-token distribution ``p`` of
  every position that has a next token (``T − 1`` per window): the final
  normed hidden state ``h`` ``[b, T−1, D]``, ``lse = log Σ_v exp z_v`` (fp64),
  the dense NLL of the real next token (fp64), and the *expected head row*
  ``u = Σ_v p_v W_v = pᵀW`` ``[b, T−1, D]`` (fp32).

With those, the KL divergence of a modified model (final hidden ``h'``,
logits ``z' = h'Wᵀ + b``) needs no stored distribution of size ``V``:

    KL(p ‖ p') = Σ_v p_v (z_v − z'_v) − lse + lse' = u·(h − h') + (lse' − lse)

(the bias cancels).  ``u·(h − h')`` is taken in fp64 from the exact
difference of the hidden states, so an action that changes nothing gives
exactly 0.  The decoder layers, final norm and head are the shared model's
own modules, only ever *called*; nothing is registered on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.core.capture import LayerInputs, capture_layer_inputs
from engine.core.progress import StageProgress
from engine.core.sharing import shell_copy
from engine.sensitivity.cost import LayerCosts, layer_costs

LOGIT_CHUNK_ELEMENTS = 1 << 22  # logits materialised at once: 16 MiB in fp32 (85 tokens of a 49k vocabulary)


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter."""
    return next(module.parameters()).device


@dataclass
class HeadOutput:
    """Head statistics of one batch at the ``T − 1`` positions that have a next token.

    ``hidden``: final normed hidden state ``[b, T−1, D]`` (model dtype);
    ``lse``: log-sum-exp of the logits ``[b, T−1]`` (fp64, nats);
    ``nll``: −log p(next token) ``[b, T−1]`` (fp64, nats);
    ``expected_rows``: ``pᵀW`` ``[b, T−1, D]`` (fp32), only when asked for.
    """

    hidden: torch.Tensor
    lse: torch.Tensor
    nll: torch.Tensor
    expected_rows: torch.Tensor | None = None


def head_output(model: nn.Module, architecture: Architecture, last: torch.Tensor, targets: torch.Tensor,
                expected_rows: bool = False) -> HeadOutput:
    """Final norm and head on the last layer's output ``last`` ``[b, T, D]``; ``targets`` ``[b, T−1]``.

    Logits are produced in chunks of tokens (at most ``LOGIT_CHUNK_ELEMENTS``
    values at a time) and never kept: ``lse`` sums ``exp`` of fp32 logits in
    fp64 after subtracting the maximum.
    """
    norm, head = get_submodule(model, architecture.final_norm), get_submodule(model, architecture.head)
    device = module_device(head)
    hidden = norm(last[:, :-1].to(module_device(norm))).to(device)
    b, t, width = hidden.shape
    flat, flat_targets = hidden.reshape(b * t, width), targets.reshape(b * t, 1).to(device)
    weight = head.weight.float() if expected_rows else None
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    lse, nll, rows = [], [], []
    for start in range(0, b * t, chunk):
        logits = head(flat[start : start + chunk]).float()
        target = logits.gather(1, flat_targets[start : start + chunk]).squeeze(-1).double()
        top = logits.max(dim=-1, keepdim=True).values
        exp = logits.sub_(top).exp_()  # in place: one logits-sized buffer per chunk
        total = exp.sum(dim=-1, dtype=torch.float64)
        part = top.squeeze(-1).double() + torch.log(total)
        lse.append(part)
        nll.append(part - target)
        if weight is not None:
            rows.append(exp.div_(total.float().unsqueeze(-1)) @ weight)
    return HeadOutput(hidden=hidden, lse=torch.cat(lse).reshape(b, t), nll=torch.cat(nll).reshape(b, t),
                      expected_rows=torch.cat(rows).reshape(b, t, width) if weight is not None else None)


@dataclass
class DenseReference:
    """Everything a measurement starts from (see the module docstring).  Tensors live on ``cache_device``.

    Per batch ``b`` of windows (``batch_starts[b]`` = index of its first window):
    ``inputs[i][b]`` the input of layer ``i`` ``[b, T, D]``; ``targets[b]``
    ``[b, T−1]``; ``head[b]`` the dense :class:`HeadOutput` (with expected rows).
    ``captured`` holds every layer's keyword arguments per batch.
    """

    inputs: list[list[torch.Tensor]]
    captured: LayerInputs
    targets: list[torch.Tensor]
    head: list[HeadOutput]
    batch_starts: list[int]
    n_windows: int
    seqlen: int
    costs: LayerCosts
    cache_device: torch.device

    @property
    def num_layers(self) -> int:
        return len(self.inputs)

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts)

    @property
    def tokens_per_window(self) -> int:
        """Positions with a next token: where KL and NLL are measured."""
        return self.seqlen - 1

    def layer_batches(self, index: int, device: torch.device) -> Iterator[tuple[torch.Tensor, dict]]:
        """``(input of layer index, its keyword arguments)`` per batch, on ``device``."""
        for b in range(self.n_batches):
            yield self.inputs[index][b].to(device), self.captured.kwargs_for(index, b, device)

    def cache_bytes(self) -> int:
        """Bytes held by the cached layer inputs and head statistics."""
        tensors = [t for per_layer in self.inputs for t in per_layer]
        tensors += [t for h in self.head for t in (h.hidden, h.lse, h.nll, h.expected_rows) if t is not None]
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())


@torch.no_grad()
def dense_reference(
    model: nn.Module,
    architecture: Architecture,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    cache_device: torch.device | str = "cpu",
    progress: StageProgress | None = None,
) -> DenseReference:
    """Run the dense model once over ``input_ids`` ``[n, T]`` and cache what measurements need.

    Cost: one forward plus one head-sized product.  Memory on ``cache_device``:
    ``L + 2`` tensors of ``[n, T, D]`` (model dtype / fp32) and three of ``[n, T−1]``.
    """
    cache_device = torch.device(cache_device)
    captured = capture_layer_inputs(shell_copy(model), architecture, input_ids, batch_size=batch_size,
                                    device=cache_device)
    layers = architecture.decoder_layers(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    targets, heads, starts = [], [], []
    for b in range(captured.n_batches):
        start = b * batch_size
        x = captured.hidden[b]
        for i, layer in enumerate(layers):
            inputs[i].append(x)
            device = module_device(layer)
            x = layer(x.to(device), **captured.kwargs_for(i, b, device)).to(cache_device)
        batch_targets = input_ids[start : start + x.shape[0], 1:]
        out = head_output(model, architecture, x, batch_targets, expected_rows=True)
        heads.append(HeadOutput(*(t.to(cache_device) for t in (out.hidden, out.lse, out.nll, out.expected_rows))))
        targets.append(batch_targets.to(cache_device))
        starts.append(start)
        if progress is not None:
            progress("dense reference pass", b + 1, captured.n_batches)
    return DenseReference(inputs=inputs, captured=captured, targets=targets, head=heads, batch_starts=starts,
                          n_windows=int(input_ids.shape[0]), seqlen=int(input_ids.shape[1]),
                          costs=layer_costs(model, architecture), cache_device=cache_device)
