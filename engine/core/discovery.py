"""Discovering a decoder-only causal LM's layout from its module tree.

For a model whose ``model_type`` has no entry in
:data:`engine.core.architectures.ARCHITECTURES`, :func:`discover_architecture`
reads off the module tree what the engine needs:

- the decoder-layer stack: the one ``nn.ModuleList`` of repeated blocks of one
  class that contain linear layers (nested lists such as expert lists are
  ignored; several stacks, e.g. an encoder and a decoder, or a vision tower
  and a text model, are refused with what was found);
- per layer: the attention and MLP children, the norms among the layer's
  children (in registration order), residual dropouts, a residual multiplier
  (Granite), and every linear: ``nn.Linear`` modules and the experts of fused
  mixture-of-experts tensors ``[E, out, in]`` (paths ``...down_proj[3]``);
  which of them read the normed residual stream (``in_features == D``) and
  which write it (``out_features == D``);
- the token embedding (``get_input_embeddings``), other embeddings added to
  it (learned positions), the final norm (a norm beside the layer stack) and
  the head (``get_output_embeddings``);
- the norm kind, by probing a copy of one norm on random inputs: ``rms``
  (``x / rms(x) * w``), ``rms_offset`` (``x / rms(x) * (1 + w)``, Gemma),
  ``layer`` (LayerNorm with scale and bias) or ``unknown``.

:func:`feature_refusals` then says which features the layout cannot support
and why (:attr:`Architecture.unavailable`); table entries get the same
checks through :func:`table_architecture`.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from engine.core.architectures import Architecture, ExpertLinear, Feature, UnsupportedArchitectureError, get_submodule

# Families whose decoder-layer forward the sliced layer reproduces, verified
# exact at 0% slicing by tests/slicing/test_families.py.
SLICING_VERIFIED = ("gemma", "granite", "llama", "mistral", "opt", "phi", "phi3", "qwen2", "qwen3")
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
_MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "proj")
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
          "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_MIN_OUT_FEATURES = 8  # narrower linears are gates (e.g. a shared expert's scalar gate), not quantized


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (LayerNorm, RMSNorm or a model's own ``*Norm`` class)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return "Norm" in type(module).__name__ and not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _is_fused_expert(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 3


def _has_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds at least two weight matrices (linear, Conv1D or fused-expert weights)."""
    holders = [sub for sub in module.modules() if any(p.dim() >= 2 for p in sub.parameters(recurse=False))]
    return len(holders) >= 2


def _describe(path: str, stack: nn.ModuleList) -> str:
    return f"'{path}' ({len(stack)} × {type(stack[0]).__name__})"


def find_layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every outermost ``nn.ModuleList`` of repeated blocks (one class) holding linear weights."""
    stacks = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) == 1 and _has_weights(module[0]) and not isinstance(module[0], nn.Linear):
            stacks.append((path, module))
    return [(p, m) for p, m in stacks if not any(p.startswith(q + ".") for q, _ in stacks if q != p)]


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    stacks = find_layer_stacks(model)
    kind = type(model).__name__
    if not stacks:
        children = ", ".join(f"{n} ({type(c).__name__})" for n, c in model.named_children()) or "none"
        raise UnsupportedArchitectureError(
            f"{kind} has no decoder-layer stack: no list of repeated blocks with linear layers was found "
            f"(top-level modules: {children}). LayerLab supports decoder-only causal LMs whose layers sit in one "
            "ModuleList (Llama, Mistral, Qwen, Gemma, Phi, OPT, Granite, OLMo, StarCoder2, Mixtral, ...)."
        )
    if len(stacks) > 1:
        found = ", ".join(_describe(p, m) for p, m in stacks)
        nested = any(w in p for p, _ in stacks for w in ("vision", "visual", "image", "audio", "encoder"))
        what = ("a model with several stacks (an encoder, or a vision / audio tower beside a nested text model)"
                if nested else "a model with several layer stacks")
        raise UnsupportedArchitectureError(
            f"{kind} is {what}: found {found}. LayerLab supports decoder-only causal LMs with one decoder-layer "
            "stack; load the text model alone (e.g. its language-model checkpoint) instead."
        )
    return stacks[0]


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for path, module in model.named_modules():
        if module is target:
            return path
    return None


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def _embedding(model: nn.Module, layers_path: str) -> str:
    path = _path_of(model, _call_or_none(model, "get_input_embeddings"))
    if path is None:
        path = next((p for p, m in model.named_modules() if isinstance(m, nn.Embedding)
                     and not p.startswith(layers_path + ".")), None)
    if path is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has a layer stack ('{layers_path}') but no token embedding (nn.Embedding) "
            "was found: LayerLab supports causal LMs that read token ids."
        )
    return path


def _head(model: nn.Module, embedding: nn.Embedding, layers_path: str) -> str:
    path = _path_of(model, _call_or_none(model, "get_output_embeddings"))
    if path is None:
        vocab = embedding.weight.shape[0]
        path = next((p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == vocab
                     and not p.startswith(layers_path + ".")), None)
    if path is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no language-model head (a linear from the hidden size to the "
            "vocabulary): LayerLab supports causal LMs (…ForCausalLM / …LMHeadModel)."
        )
    return path


def _final_norm(model: nn.Module, layers_path: str) -> str:
    parent = layers_path.rpartition(".")[0]
    outside = [p for p, m in model.named_modules() if is_norm(m) and not p.startswith(layers_path + ".")]
    siblings = [p for p in outside if p.rpartition(".")[0] == parent]
    chosen = siblings or outside
    return chosen[-1] if chosen else ""


def _extra_embeddings(model: nn.Module, token_path: str, layers_path: str, hidden: int) -> tuple[str, ...]:
    return tuple(p for p, m in model.named_modules() if isinstance(m, nn.Embedding) and p != token_path
                 and not p.startswith(layers_path + ".") and m.embedding_dim == hidden)


# ---------------------------------------------------------------- one layer


def _child(layer: nn.Module, names: tuple[str, ...], class_words: tuple[str, ...]) -> str:
    children = dict(layer.named_children())
    for name in names:
        if name in children:
            return name
    for name, child in children.items():
        if any(word in type(child).__name__ for word in class_words):
            return name
    return ""


def _linears(layer: nn.Module) -> list[tuple[str, nn.Linear | ExpertLinear]]:
    """(path, linear) of every linear in ``layer``, experts of fused tensors as ``path[e]``, in registration order."""
    found = []
    for path, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            if module.out_features >= _MIN_OUT_FEATURES:
                found.append((path, module))
            continue
        for name, param in module.named_parameters(recurse=False):
            if _is_fused_expert(param):
                prefix = f"{path}.{name}" if path else name
                found.extend((f"{prefix}[{e}]", ExpertLinear(param, e)) for e in range(param.shape[0]))
    return found


def _short_name(path: str, containers: tuple[str, ...]) -> str:
    expert = re.match(r"^(?:.*\.)?(?P<name>[^.\[]+)\[(?P<e>\d+)\]$", path)
    if expert:
        return f"expert{expert['e']}.{expert['name'].removesuffix('_proj')}"
    head, _, rest = path.partition(".")
    local = rest if head in containers and rest else path
    return _SHORT.get(local, local)


def _pick_output(candidates: list[tuple[str, object]], names: tuple[str, ...]) -> str:
    for name in names:
        for path, _ in candidates:
            if path.rpartition(".")[2] == name:
                return path
    return candidates[-1][0] if candidates else ""


def _block_io(linears: list[tuple[str, object]], prefix: str, hidden: int,
              out_names: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(paths of the block's linears reading width ``hidden``, the one linear writing the residual or ``""``).

    Several linears may have ``out_features == hidden`` (a square ``q_proj``);
    the writer is then the one with a known output name, else the last one
    registered.  A block with fused experts has no single writer (``""``).
    """
    inside = [(p, m) for p, m in linears if prefix and p.startswith(prefix + ".")]
    writers = [(p, m) for p, m in inside if m.out_features == hidden]
    if not writers or any("[" in p for p, _ in inside):
        output = ""
    else:
        output = _pick_output(writers, out_names)
    inputs = tuple(p for p, m in inside if m.in_features == hidden and p != output)
    return inputs, output


def probe_norm_kind(norm: nn.Module, hidden: int) -> str:
    """``rms``, ``rms_offset``, ``layer`` (LayerNorm with scale and bias) or ``unknown``, from a probe of a copy."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.is_meta or weight.shape != (hidden,):
        return "unknown"
    eps = next((float(getattr(norm, a)) for a in _EPS_ATTRS if isinstance(getattr(norm, a, None), (int, float))), 1e-6)
    probe = copy.deepcopy(norm).to("cpu", torch.float32).eval()
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with torch.no_grad():
        try:
            y = probe(x)
        except Exception:  # noqa: BLE001 - a norm we cannot call on a plain tensor is simply unknown
            return "unknown"
        w = probe.weight.float()
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        bias = getattr(probe, "bias", None)
        candidates = {"rms": rms * w, "rms_offset": rms * (1 + w),
                      "layer": nn.functional.layer_norm(x, (hidden,), w, bias, eps)}
    for kind, expected in candidates.items():
        if isinstance(y, torch.Tensor) and y.shape == expected.shape \
                and torch.allclose(y, expected, rtol=1e-4, atol=1e-5):
            return kind
    return "unknown"


def _eps_attr(norm: nn.Module | None) -> str:
    return next((a for a in _EPS_ATTRS if norm is not None and hasattr(norm, a)), "eps")


def _dropouts(layer: nn.Module) -> tuple[str | None, str | None]:
    drops = [n for n, c in layer.named_children() if isinstance(c, nn.Dropout)]
    attn = next((n for n in drops if "attn" in n or "attention" in n), None)
    mlp = next((n for n in drops if "mlp" in n or "ffn" in n), None)
    if attn is None and mlp is None and len(drops) == 1 and "resid" in drops[0]:
        attn = mlp = drops[0]
    return attn, mlp


def _mlp_norm(norms: list[str]) -> str:
    if len(norms) <= 2:
        return norms[-1] if norms else ""
    return next((n for n in norms if "pre_feedforward" in n or "pre_mlp" in n), norms[2])


def discover_architecture(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of ``model`` read off its module tree (``source="discovered"``).

    Raises :class:`UnsupportedArchitectureError` naming what was found when
    there is no single decoder-layer stack, no token embedding or no head.
    Parts that cannot be identified leave a feature unavailable (with the
    reason) rather than failing.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(encoder_decoder_message(config))
    layers_path, layers = _layer_stack(model)
    embedding_path = _embedding(model, layers_path)
    embedding = get_submodule(model, embedding_path)
    hidden = int(embedding.weight.shape[1])
    head = _head(model, embedding, layers_path)
    first = layers[0]
    attention = _child(first, _ATTENTION_NAMES, ("Attention", "Attn"))
    mlp = _child(first, _MLP_NAMES, ("MLP", "Moe", "MoE", "FeedForward", "Experts"))
    norms = [n for n, c in first.named_children() if is_norm(c)]
    containers = tuple(c for c in (attention, mlp) if c)
    paths: dict[str, str] = {}
    for layer in layers:
        for path, _ in _linears(layer):
            if path not in paths.values():
                name = _short_name(path, containers)
                paths[name if name not in paths else path] = path
    first_linears = _linears(first)
    attn_inputs, attn_output = _block_io(first_linears, attention, hidden, _ATTN_OUT_NAMES)
    mlp_inputs, mlp_output = _block_io(first_linears, mlp, hidden, _MLP_OUT_NAMES)
    attn_drop, mlp_drop = _dropouts(first)
    multiplier = "residual_multiplier" if isinstance(getattr(first, "residual_multiplier", None), float) else None
    attn_norm = norms[0] if norms else ""
    arch = Architecture(
        model_type=str(getattr(config, "model_type", None) or type(model).__name__),
        linears=paths,
        attn_inputs=attn_inputs,
        mlp_inputs=mlp_inputs,
        attn_output=attn_output,
        mlp_output=mlp_output,
        embedding=embedding_path,
        layers=layers_path,
        final_norm=_final_norm(model, layers_path),
        head=head,
        attn_norm=attn_norm,
        mlp_norm=attn_norm if len(norms) == 1 else _mlp_norm(norms),
        attention=attention,
        mlp=mlp,
        norm_kind=probe_norm_kind(getattr(first, attn_norm), hidden) if attn_norm else "unknown",
        norm_eps_attr=_eps_attr(getattr(first, attn_norm, None)),
        attn_residual_dropout=attn_drop,
        mlp_residual_dropout=mlp_drop,
        source="discovered",
        extra_embeddings=_extra_embeddings(model, embedding_path, layers_path, hidden),
        parallel_blocks=len(norms) == 1 and bool(attention and mlp),
        residual_multiplier=multiplier,
    )
    return arch.with_unavailable(feature_refusals(model, arch))


def table_architecture(model: nn.Module, entry: Architecture) -> Architecture:
    """A table entry checked against ``model``: its :attr:`~Architecture.unavailable` filled in."""
    return entry.with_unavailable(feature_refusals(model, entry))


def encoder_decoder_message(config) -> str:
    """Why an encoder-decoder checkpoint is refused, naming what it is."""
    names = ", ".join(getattr(config, "architectures", None) or []) or getattr(config, "model_type", "?")
    return (f"This checkpoint is an encoder-decoder model ({names}, model_type "
            f"'{getattr(config, 'model_type', '?')}'): it has an encoder stack and a decoder stack. LayerLab "
            "supports decoder-only causal LMs (Llama, Mistral, Qwen, Gemma, Phi, OPT, Granite, ...).")


# ---------------------------------------------------------------- what works


def _norm_children(layer: nn.Module) -> list[str]:
    return [n for n, c in layer.named_children() if is_norm(c)]


def _has_experts(arch: Architecture) -> bool:
    return any("[" in p for p in arch.linears.values()) or (bool(arch.mlp) and not arch.mlp_output
                                                              and not arch.mlp_steps)


def slicing_refusal(model: nn.Module, arch: Architecture) -> str | None:
    """Why SliceGPT cannot slice this model exactly, or ``None`` if it can."""
    layers = arch.decoder_layers(model)
    config = getattr(model, "config", None)
    norms = _norm_children(layers[0])
    if _has_experts(arch):
        return ("mixture-of-experts layers: the router and every expert read the residual stream and the experts' "
                "outputs are mixed per token, which LayerLab's sliced layer does not rewrite; scores, quantization "
                "and dropping work.")
    if len(norms) > 2:
        return (f"the decoder layer has {len(norms)} norms ({', '.join(norms)}): norms on the block outputs sit "
                "inside the residual path, so a rotation of the residual stream no longer passes through them "
                "(computational invariance does not hold).")
    if arch.model_type not in SLICING_VERIFIED:
        return (f"slicing rewrites the decoder layer's forward, and that rewrite is verified exact only for "
                f"{', '.join(SLICING_VERIFIED)}; '{arch.model_type}' is not among them.")
    if arch.norm_kind not in ("rms", "rms_offset", "layer"):
        return f"its norms are of a kind SliceGPT cannot fold into the linears ('{arch.norm_kind}')."
    if config is not None and getattr(config, "do_layer_norm_before", True) is False:
        return "post-LayerNorm layout (do_layer_norm_before=False): the norms sit on the residual path."
    proj = getattr(config, "word_embed_proj_dim", None)
    if proj is not None and proj != getattr(config, "hidden_size", proj):
        return (f"the embedding width ({proj}) differs from the hidden size (project_in / project_out linears "
                "around the decoder), which SliceGPT's wiring does not cover.")
    missing = [name for name, path in (("attention output", arch.attn_output), ("MLP output", arch.mlp_output),
                                       ("attention norm", arch.attn_norm), ("MLP norm", arch.mlp_norm),
                                       ("final norm", arch.final_norm)) if not path]
    if not arch.attn_inputs or not arch.mlp_inputs:
        missing.append("attention / MLP inputs")
    if missing:
        return f"these parts were not found: {', '.join(missing)}."
    return None


def feature_refusals(model: nn.Module, arch: Architecture) -> dict[Feature, str]:
    """Feature key -> reason, for every feature this model's layout cannot support."""
    out: dict[str, str] = {}
    layers = arch.decoder_layers(model)
    norms = _norm_children(layers[0])
    if not arch.attention:
        out[Feature.SUBLAYER] = "no attention submodule was found in the decoder layer, so it cannot be split in two."
        out[Feature.DROP_ATTENTION] = "no attention submodule was found in the decoder layer."
    elif len(norms) > 2:
        out[Feature.SUBLAYER] = (f"norms on the block outputs ({', '.join(norms)}): the attention module's output "
                                 "is not what is added to the residual stream.")
    if not arch.mlp:
        out[Feature.DROP_MLP] = ("the MLP is no submodule of the decoder layer" +
                           (f" ({' -> '.join(arch.mlp_steps)} sit on the layer)" if arch.mlp_steps else "") + ".")
    if not arch.attn_norm or (not arch.mlp_norm and arch.mlp):
        out.setdefault(Feature.DROP_ATTENTION, "the decoder layer's norms were not found.")
        out.setdefault(Feature.DROP_MLP, "the decoder layer's norms were not found.")
    if not arch.linears:
        found = sorted({type(m).__name__ for m in layers[0].modules() if m is not layers[0]})
        out[Feature.QUANTIZATION] = ("no nn.Linear modules were found in the decoder layers (found: "
                               f"{', '.join(found) or 'nothing'}); e.g. GPT-2's Conv1D stores weights as [in, out].")
        out[Feature.GPTQ] = out[Feature.QUANTIZATION]
    elif any("[" in p for p in arch.linears.values()):
        out[Feature.GPTQ] = ("GPTQ hooks each linear's inputs, and this model's experts are fused 3-D tensors with no "
                       "per-expert module; RTN quantizes every expert.")
    reason = slicing_refusal(model, arch)
    if reason:
        out[Feature.SLICING] = reason
    return out
