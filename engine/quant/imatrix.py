"""Importance of each input column of every decoder linear, as llama.cpp's ``llama-imatrix`` collects it.

For a linear ``y = x W^T`` the importance of input column ``j`` is the mean of
``x_j**2`` over every calibration token (llama.cpp stores the sum
``in_sum2`` and the token count ``counts``; ``llama-quantize --imatrix``
divides them).  llama.cpp's quantizers then weight each weight's squared
rounding error by the importance of its column when they fit scales.

Collected on the dense model (a shell copy with forward pre-hooks: the loaded
model is not touched), one forward per batch of calibration windows, every
position counted (BOS too, as ``llama-imatrix`` counts every token of a
chunk).  Results are kept in memory per (model, windows).

:func:`write_imatrix_gguf` writes them as the GGUF imatrix file
``llama-quantize --imatrix`` reads (``general.type = imatrix``,
``<tensor>.in_sum2`` and ``<tensor>.counts`` per linear).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from engine.core.data import TokenWindows
from engine.core.models import LoadedModel
from engine.core.progress import ProgressFn
from engine.core.sharing import shell_copy
from engine.quant.grid import QuantizationError

_KEPT = 4
_memory: OrderedDict[tuple, Importance] = OrderedDict()


@dataclass(frozen=True)
class Importance:
    """``sums[(layer, linear)]``: float64 ``[in]`` sums of squared inputs over ``count`` tokens."""

    sums: dict[tuple[int, str], torch.Tensor]
    count: int
    windows: str

    def mean(self, layer: int, linear: str) -> torch.Tensor:
        """Mean squared input per column, float32 ``[in]``: what llama.cpp's quantizers are given."""
        return (self.sums[(layer, linear)] / self.count).float()


def _key(loaded: LoadedModel, windows: TokenWindows) -> tuple:
    digest = hashlib.sha256(windows.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return loaded.fingerprint, digest


@torch.no_grad()
def collect_importance(loaded: LoadedModel, windows: TokenWindows, batch_size: int = 4,
                       progress: ProgressFn | None = None) -> Importance:
    """Importance of every decoder linear's input columns on ``windows`` (cached in memory)."""
    key = _key(loaded, windows)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    arch = loaded.architecture
    model = shell_copy(loaded.model)
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def hook(name: tuple[int, str]):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0).cpu()
        return record

    linears = [(i, short, linear) for i, layer in enumerate(arch.decoder_layers(model))
               for short, linear in arch.layer_linears(layer).items()]
    if any(not isinstance(linear, torch.nn.Linear) for _, _, linear in linears):
        raise QuantizationError(f"An importance matrix needs plain linear layers; {arch.model_type} has fused "
                                "experts or another kind: quantize it with llama.cpp's types without an imatrix.")
    handles = [linear.register_forward_pre_hook(hook((i, short))) for i, short, linear in linears]
    device = next(model.parameters()).device
    try:  # the decoder alone where the model exposes it: the head's logits (batch x seqlen x vocab) are not needed
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        run = decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else model
        ids = windows.input_ids
        for start in range(0, ids.shape[0], batch_size):
            run(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            if progress:
                progress(min(start + batch_size, ids.shape[0]), ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    found = Importance(sums=sums, count=int(windows.input_ids.numel()), windows=windows.label())
    _memory[key] = found
    while len(_memory) > _KEPT:
        _memory.popitem(last=False)
    return found


def write_imatrix_gguf(importance: Importance, tensor_names: dict[tuple[int, str], str], path: str | Path,
                       chunk_size: int) -> Path:
    """The GGUF imatrix file for ``llama-quantize --imatrix``; ``tensor_names[(layer, linear)]`` is the GGUF
    name of each linear's weight (e.g. ``blk.0.attn_q.weight``)."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", [importance.windows])
    writer.add_uint32("imatrix.chunk_count", importance.count // chunk_size)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for key, name in tensor_names.items():
        writer.add_tensor(f"{name}.in_sum2", importance.sums[key].numpy().astype(np.float32)[None])
        writer.add_tensor(f"{name}.counts", np.array([[float(importance.count)]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
