"""Would vLLM serve this compressed-tensors folder?  Its weight-only scheme's rules, checked on the config.

vLLM runs compressed-tensors ``pack-quantized`` int weights with ``CompressedTensorsWNA16``
(``vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py``, read in
vllm-project/vllm through the code index).  Its rules, as released there:

- ``num_bits`` in ``WNA16_SUPPORTED_BITS = [4, 8]`` (symmetric types ``uint4b8`` / ``uint8b128``); a zero point
  (``symmetric: false``) only at 4 bits (``uint4``: the scheme table also lists ``uint8``, but Marlin's zero-point
  kernels take ``uint4`` only).  Some newer forks list 2-8 symmetric bits for particular kernels; LayerLab checks
  the released rule;
- ``strategy`` ``group`` with a ``group_size``, or ``channel`` (one scale per output row);
- vLLM fuses ``q_proj``/``k_proj``/``v_proj`` into one ``qkv_proj`` and ``gate_proj``/``up_proj`` into one
  ``gate_up_proj``: the parts of one fused module must carry one scheme (a checkpoint whose fused parts differ
  does not load; reported for AutoRound's mixed-bit exports, intel/auto-round #2174).

:func:`vllm_problems` lists every rule a config breaks (empty: vLLM loads it); the export states the verdict.
"""

from __future__ import annotations

from engine.quant.runtimes import FUSED

SUPPORTED_BITS = (4, 8)
ZERO_POINT_BITS = (4,)
"""Widths vLLM runs with zero points: its scheme table lists ``uint4`` and ``uint8``, but Marlin's zero-point
kernels (``query_marlin_supported_quant_types(has_zp=True)``) take ``uint4`` only; an 8-bit zero point passes the
config check and then finds no kernel."""


def has_zero_points(quantization_config: dict) -> bool:
    """Whether any config group stores zero points (``symmetric: false``)."""
    return any(not (group.get("weights") or {}).get("symmetric", True)
               for group in quantization_config.get("config_groups", {}).values())


def _scheme_of(config_groups: dict) -> dict[str, tuple]:
    """Module name -> (num_bits, symmetric, strategy, group_size) from ``config_groups``' targets."""
    found = {}
    for group in config_groups.values():
        weights = group.get("weights") or {}
        scheme = (weights.get("num_bits"), weights.get("symmetric"), weights.get("strategy"),
                  weights.get("group_size"))
        for target in group.get("targets", []):
            found[target] = scheme
    return found


def vllm_problems(quantization_config: dict) -> list[str]:
    """Every vLLM WNA16 rule the folder's ``quantization_config`` breaks, in words (empty: it loads)."""
    problems = []
    groups = quantization_config.get("config_groups", {})
    for name, group in groups.items():
        weights = group.get("weights") or {}
        bits, symmetric = weights.get("num_bits"), weights.get("symmetric", True)
        if bits not in SUPPORTED_BITS:
            problems.append(f"{name}: {bits}-bit weights (vLLM's weight-only kernels take 4 or 8 bits)")
        elif not symmetric and bits not in ZERO_POINT_BITS:
            problems.append(f"{name}: a zero point at {bits} bits (vLLM's kernels take zero points at 4 bits only)")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel") or (strategy == "group" and not weights.get("group_size")):
            problems.append(f"{name}: strategy {strategy!r} with group size {weights.get('group_size')!r} "
                            "(vLLM takes 'group' with a group size, or 'channel')")
    schemes = _scheme_of(groups)
    fused_seen: dict[tuple[str, str], set] = {}
    for module, scheme in schemes.items():
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED.items():
            if leaf in parts:
                fused_seen.setdefault((parent, fused), set()).add(scheme[:2])
    split = sorted(f"{parent}.{fused}" for (parent, fused), kinds in fused_seen.items() if len(kinds) > 1)
    if split:
        problems.append(f"{len(split)} fused modules whose parts have different bit widths (e.g. {split[0]}): vLLM "
                        "loads q/k/v and gate/up as one module each, with one scheme")
    return problems


def vllm_verdict(quantization_config: dict) -> str:
    """One line for the export dialog: vLLM serves it, or why not and what would; and whether transformers loads it
    (not with zero points: transformers 5.23 with compressed-tensors 0.20 refuses them, see
    :mod:`engine.export.ct_folder`)."""
    problems = vllm_problems(quantization_config)
    zero_points = has_zero_points(quantization_config)
    transformers = ("transformers 5.23 does not load its zero points (LayerLab checks it with compressed-tensors' "
                    "own decompressor)" if zero_points else "transformers loads it")
    if not problems:
        return f"vLLM (compressed-tensors WNA16): loads as written; {transformers}."
    return ("vLLM would refuse this folder: " + "; ".join(problems) + f". {transformers[0].upper()}{transformers[1:]}; "
            "for vLLM quantize with target runtime vLLM (4 and 8 bits, zero points at 4 bits only, q/k/v and gate/up "
            "at one level each).")
