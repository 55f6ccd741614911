"""llama.cpp's stock presets (Q4_K_M, Q3_K_M, ...) as LayerLab allocations: the type ``llama-quantize`` gives
each decoder linear, read from its own ``--dry-run`` (nothing is quantized), turned into a level per linear.

The bits optimizer under llama.cpp's types measures the presets that fit its budget beside its own candidates,
so the allocation it picks is never worse than those presets on its held-out windows: the in-app preset *is*
the preset's file (same types, same quantizer, same imatrix).  Needs the GGUF the model came from (the
built-in models): the dry run reads its tensor names and shapes.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

from engine.core.models import LoadedModel
from engine.export.gguf_llamacpp import gguf_arch_of, linear_tensor_names, read_template, source_gguf
from engine.llamacpp.runtime import tool
from engine.quant.layer_bits import LayerBits, normalize

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
LEVEL_OF_TYPE = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8,
                 "Q4_0": 3, "Q5_0": 4, "Q5_1": 5}
"""A type llama-quantize wrote -> the level that gives it (k-quant type set; fallbacks map back: Q4_0 is what
Q2_K and Q3_K fall back to on rows not a multiple of 256, Q5_0 Q4_K's, Q5_1 Q5_K's, Q8_0 Q6_K's and Q8_0's)."""
_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-.*type =\s*(?P<source>\w+),.*?(\((?P<type>\w+)\))?\s*$")
"""A dry-run line: ``... type = q6_K, size = 1.03 MiB -> 0.86 MiB (q5_K)`` when the tensor is converted, without the
arrow when it keeps its type (a source GGUF already in the preset's type for it, e.g. Gemma-3's Q4_K_M file)."""


@lru_cache(maxsize=32)
def preset_tensor_types(gguf: Path, preset: str) -> dict[str, str]:
    """Tensor name -> the type ``llama-quantize --dry-run`` gives it under ``preset`` (quantized tensors only)."""
    done = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", "--dry-run", str(gguf), preset],
                          capture_output=True, text=True, timeout=300)
    found = {m["name"]: (m["type"] or m["source"]).upper() for line in (done.stdout + done.stderr).splitlines()
             if (m := _LINE.match(line))}
    if done.returncode != 0 or not found:
        raise RuntimeError(f"llama-quantize --dry-run {preset} failed: {done.stderr.strip()[-300:]}")
    return found


def preset_bits(loaded: LoadedModel, preset: str) -> list[LayerBits] | None:
    """The level of each decoder linear under llama.cpp's ``preset``; ``None`` when it cannot be told (no source
    GGUF for this model, or the preset uses a type outside the k-quant type set)."""
    gguf = source_gguf(loaded)
    if gguf is None:
        return None
    arch, _permute = gguf_arch_of(loaded, read_template(gguf))
    per_layer: list[dict[str, int]] = [{} for _ in range(loaded.num_layers)]
    types = preset_tensor_types(gguf, preset)
    for name, (layer, short) in linear_tensor_names(loaded, arch).items():
        level = LEVEL_OF_TYPE.get(types.get(name, ""))
        if level is None:
            return None
        per_layer[layer][short] = level
    return [normalize(entry) for entry in per_layer]
