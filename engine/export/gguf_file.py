"""Mixed-bit GGUF files (llama.cpp) from a quantized run: a tensor type per layer that follows the allocation.

Two type choices (:func:`plan_gguf_types`), per quantized linear of ``bits`` bits:

- **exact** (default): the smallest type whose blocks hold LayerLab's codes as
  they are, for any group size that is a multiple of 32.  ``code * scale +
  minimum`` (float zero point) *is* Q4_1 for codes of up to 4 bits and Q5_1
  for 5: codes, fp16 scales and minimums are copied bit for bit and llama.cpp
  computes the weights the app measured.  With an integer zero point the
  minimum ``-zero * scale`` is rounded to fp16 (nearly exact), and 6-7-bit
  codes go to Q8_0 as ``code - zero``.  2- and 3-bit layers take Q4_1's
  space: exact, not small.  Levels with no exact type are re-quantized.
- **compact**: the nearest type with at least as many code bits that fits the
  row (k-quants need rows that are a multiple of 256 weights, the others of
  32): 2 -> Q2_K, 3 -> Q3_K, 4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K, 7-8 -> Q8_0,
  falling back up the ladder (a 2-bit row of 576 weights becomes Q4_1),
  re-quantized from the in-app weights: a second rounding, which the export's
  verification measures.

Each choice says why.  Dense layers' linears and the embeddings are written as F16, norms as F32.
The file carries the family's hyper-parameters and, for byte-level BPE
tokenizers, the tokenizer (tokens, types, merges, special ids, chat template),
so llama.cpp and ``transformers`` (``from_pretrained(folder, gguf_file=...)``)
both read it.  Families: Llama, Mistral (written as ``llama``, as llama.cpp
does) and Qwen2.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from engine.core.models import LoadedModel
from engine.core.paths import atomic_folder
from engine.export.hf_folder import ExportError
from engine.quant.ggml_types import tensor_bytes
from engine.quant.grid import QuantizedWeight, QuantizerSpec, effective_group_size
from engine.quant.layer_bits import LayerBits, linear_bits
from engine.quant.quantize_model import QuantizedModel
from engine.quant.size import linear_storage

GGUF_NAME = "model.gguf"
T = gguf.GGMLQuantizationType
# model_type -> (GGUF architecture, q/k rows permuted as llama.cpp's converter does)
GGUF_FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# code bits -> types with at least that many code bits, nearest first ("compact" files)
TYPE_LADDER = {
    2: ("Q2_K", "Q3_K", "Q4_1", "Q5_1", "Q8_0"),
    3: ("Q3_K", "Q4_1", "Q5_1", "Q8_0"),
    4: ("Q4_K", "Q4_1", "Q5_1", "Q8_0"),
    5: ("Q5_K", "Q5_1", "Q8_0"),
    6: ("Q6_K", "Q8_0"),
    7: ("Q8_0",),
    8: ("Q8_0",),
}
MODES = ("exact", "compact")


def exact_type(bits: int, zero_point: str) -> str | None:
    """The smallest GGUF type whose blocks hold LayerLab's codes as they are (group sizes a multiple of 32).

    ``code * scale + minimum`` (float zero point) is Q4_1 for codes of up to 4 bits and Q5_1 for 5;
    ``(code - zero) * scale`` (integer zero point) is the same with minimum ``-zero * scale`` (rounded to
    fp16: nearly exact), and Q8_0 (``d * q``, ``q`` int8) for 6 and 7 bits, whose ``code - zero`` fits int8.
    The symmetric grid (zero ``2**(bits-1)``) is Q4_0 (``d * (q - 8)``) up to 4 bits, Q5_0 (``d * (q - 16)``)
    for 5 and Q8_0 for 6 to 8: exact, and smaller than the types with a minimum.
    """
    if zero_point == "symmetric":
        return "Q4_0" if bits <= 4 else "Q5_0" if bits == 5 else "Q8_0"
    if bits <= 4:
        return "Q4_1"
    if bits == 5:
        return "Q5_1"
    if zero_point == "integer" and bits <= 7:
        return "Q8_0"
    return None


@dataclass(frozen=True)
class TensorChoice:
    """The GGUF type of one quantized linear and why."""

    layer: int
    linear: str
    bits: int
    qtype: str
    exact: bool
    reason: str


def _block(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[T[qtype]][0]


def _fits(qtype: str, row: int) -> bool:
    return row % _block(qtype) == 0


def choose_type(bits: int, row: int, spec: QuantizerSpec, mode: str = "exact") -> TensorChoice:
    """Type for one linear of ``bits`` bits whose rows hold ``row`` weights (layer/linear filled in later).

    ``exact``: the smallest type that holds LayerLab's codes (:func:`exact_type`), else re-quantized;
    ``compact``: the nearest type with at least ``bits`` code bits (k-quants included), re-quantized.
    """
    if mode not in MODES:
        raise ExportError(f"Unknown GGUF type choice '{mode}': choose 'exact' or 'compact'.")
    group = effective_group_size(row, spec.group_size)
    exact = exact_type(bits, spec.zero_point)
    if mode == "exact" and exact and group % 32 == 0 and row % 32 == 0 and not spec.stores_group_index:
        if spec.zero_point == "float":
            why = f"LayerLab's codes, scales and minimums copied ({bits}-bit codes in {exact} blocks)"
        elif spec.zero_point == "symmetric":
            why = f"LayerLab's symmetric codes and fp16 scales copied ({bits}-bit codes in {exact} blocks)"
        elif exact == "Q8_0":
            why = f"LayerLab's code − zero copied as int8 with the fp16 scale ({bits}-bit codes in Q8_0 blocks)"
        else:
            why = "LayerLab's codes copied; the minimum −zero·scale is rounded to fp16 (nearly exact)"
        return TensorChoice(-1, "", bits, exact, True, why)
    ladder = TYPE_LADDER[bits] if mode == "compact" else tuple(t for t in TYPE_LADDER[bits] if not t.endswith("_K"))
    for qtype in ladder:
        if _fits(qtype, row):
            why = f"re-quantized from the in-app weights ({qtype}'s grid differs from LayerLab's)"
            if mode == "compact" and qtype != TYPE_LADDER[bits][0]:
                why += f"; {TYPE_LADDER[bits][0]} needs rows that are a multiple of {_block(TYPE_LADDER[bits][0])}"
            elif mode == "exact":
                why += ("; group index (act-order with dynamic groups)" if spec.stores_group_index else
                        f"; no GGUF type holds these codes (group {group})" if exact else
                        f"; no GGUF type holds {bits}-bit codes with a float zero point")
            return TensorChoice(-1, "", bits, qtype, False, why)
    return TensorChoice(-1, "", bits, "F16", False, f"rows of {row} weights fit no quantized type (multiples of 32)")


def plan_gguf_types(loaded: LoadedModel, bits: list[LayerBits], spec: QuantizerSpec,
                    mode: str = "exact") -> list[TensorChoice]:
    """The type of every quantized linear for ``bits`` per layer (one level, or a level per linear)."""
    check_gguf_family(loaded.model)
    arch = loaded.architecture
    choices = []
    for index, (layer, b) in enumerate(zip(arch.decoder_layers(loaded.model), bits)):
        for name, linear in arch.layer_linears(layer).items():
            choice = choose_type(linear_bits(b, name), int(linear.in_features), spec, mode)
            choices.append(TensorChoice(index, name, choice.bits, choice.qtype, choice.exact, choice.reason))
    return choices


def describe_choices(choices: list[TensorChoice]) -> list[str]:
    """One line per (bits, type, reason): which layers and linears, for the export dialog."""
    groups: dict[tuple, list[TensorChoice]] = {}
    for c in choices:
        groups.setdefault((c.bits, c.qtype, c.exact, c.reason), []).append(c)
    lines = []
    for (bits, qtype, exact, reason), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        layers = sorted({c.layer for c in members})
        linears = sorted({c.linear for c in members})
        lines.append(f"{bits}-bit → {qtype}{' (exact)' if exact else ''}: {len(members)} tensors in "
                     f"{len(layers)} layer{'s' if len(layers) != 1 else ''} ({', '.join(linears)}); {reason}.")
    return lines


def quantized_bytes(loaded: LoadedModel, bits: list[LayerBits], spec: QuantizerSpec,
                    choices: list[TensorChoice]) -> tuple[float, float]:
    """Bytes of the quantized linears in the file's types (``choices``) and on the run's grid (``spec``)."""
    arch = loaded.architecture
    layers = list(arch.decoder_layers(loaded.model))
    in_file = in_run = 0.0
    for c in choices:
        linear = arch.layer_linears(layers[c.layer])[c.linear]
        out, inp = (int(n) for n in linear.weight.shape)
        in_file += tensor_bytes(c.qtype, out, inp)
        in_run += linear_storage(linear, linear_bits(bits[c.layer], c.linear), spec) / 8
    return in_file, in_run


def size_against_run(loaded: LoadedModel, bits: list[LayerBits], spec: QuantizerSpec,
                     choices: list[TensorChoice]) -> str | None:
    """A line for the export dialog when the file's types take more room than the run's grid (a 2-bit layer held
    as Q4_1): the quantized weights' MiB in the file against the run's, or ``None`` within 1%."""
    in_file, in_run = quantized_bytes(loaded, bits, spec, choices)
    if in_file <= 1.01 * in_run:
        return None
    return (f"The quantized weights take {in_file / 2**20:.1f} MiB in these types against {in_run / 2**20:.1f} MiB "
            f"on the run's grid: the file is about {(in_file - in_run) / 2**20:.1f} MiB larger than the size this "
            "run shows. Smaller: the compact tensor types (k-quants, re-quantized), or, for a file of the size a run "
            "shows, the target runtime llama.cpp (GGUF) in the sidebar and a new run: its levels are llama.cpp's "
            "own types.")


def check_gguf_family(model: nn.Module) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) for ``model``'s family, or a clear refusal."""
    model_type = model.config.model_type
    if model_type not in GGUF_FAMILIES:
        raise ExportError(f"GGUF export supports {', '.join(sorted(GGUF_FAMILIES))} models; this one is "
                          f"'{model_type}'. Export a Hugging Face folder instead.")
    return GGUF_FAMILIES[model_type]


# ---------------------------------------------------------------- tensors


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (``LlamaModel.permute``): ``[out, ...]`` with rotary halves interleaved."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, dim, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _pack_exact(weight: QuantizedWeight, qtype: str, n_head: int | None) -> np.ndarray:
    """GGUF blocks of 32 weights holding LayerLab's codes as they are: ``[out, in/32 * type_size]`` bytes.

    Q4_1 / Q5_1: ``d = scale``, ``m = minimum`` (float zero point) or ``-zero * scale`` (integer), ``q = code``;
    Q4_0 / Q5_0 (symmetric grid): ``d = scale``, ``q = code - zero + 8`` / ``+ 16``;
    Q8_0: ``d = scale``, ``q = code - zero``.  Every block of 32 columns lies inside one LayerLab group.
    """
    out, inp = weight.shape
    block_group = torch.arange(0, inp, 32) // weight.group_size  # group of each 32-column block
    scales = weight.scales.cpu()[:, block_group].to(torch.float16)
    zeros = weight.zeros.cpu()[:, block_group]
    codes = weight.codes.cpu().numpy().astype(np.int16)
    if qtype == "Q8_0":
        values = codes.reshape(out, -1, 32) - zeros.numpy().astype(np.int16)[..., None]
        parts = [scales.numpy(), values.reshape(out, -1).astype(np.int8)]
    elif qtype in ("Q4_0", "Q5_0"):
        offset = 8 if qtype == "Q4_0" else 16
        values = codes.reshape(out, -1, 32) - zeros.numpy().astype(np.int16)[..., None] + offset
        parts = [scales.numpy(), values.reshape(out, -1).astype(np.uint8)]
    else:
        minimum = zeros.to(torch.float16) if weight.zero_point == "float" else (
            -zeros.float() * weight.scales.cpu()[:, block_group].float()).to(torch.float16)
        parts = [scales.numpy(), minimum.numpy(), codes.astype(np.uint8)]
    if n_head is not None:
        parts = [_permute_rows(a, n_head) for a in parts]
    d = parts[0].reshape(-1, 1).view(np.uint8)
    if qtype == "Q8_0":
        return np.concatenate([d, parts[1].reshape(-1, 32).view(np.uint8)], axis=-1).reshape(out, -1)
    blocks = parts[-1].reshape(-1, 32)
    low = (blocks[:, :16] & 0x0F) | ((blocks[:, 16:] & 0x0F) << 4)
    packed = [d] if qtype in ("Q4_0", "Q5_0") else [d, parts[1].reshape(-1, 1).view(np.uint8)]
    if qtype in ("Q5_0", "Q5_1"):
        packed.append(np.packbits(blocks >> 4, axis=-1, bitorder="little").reshape(-1, 4))
    packed.append(low.astype(np.uint8))
    return np.concatenate(packed, axis=-1).reshape(out, -1)


def _quantize(values: np.ndarray, qtype: str) -> np.ndarray:
    """``values`` float32 ``[out, in]`` -> GGUF bytes of ``qtype`` (gguf's packers; LayerLab's for k-quants)."""
    if qtype in ("F16", "F32"):
        return values.astype(np.float16 if qtype == "F16" else np.float32)
    if qtype.endswith("_K"):
        from engine.export.kquants import quantize_kquant

        return quantize_kquant(values, T[qtype])
    return gguf.quants.quantize(values, T[qtype])


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> str | None:
    """Write a byte-level BPE tokenizer; returns why it was left out, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "no fast tokenizer: the file has no tokenizer (llama.cpp needs one; transformers loads the model)"
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        return ("the tokenizer is not byte-level BPE: the file has no tokenizer "
                "(use llama.cpp's converter on the HF export)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return None


def _hyperparameters(writer: gguf.GGUFWriter, config, n_layers: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 1e4)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def write_gguf(quantized: QuantizedModel, loaded: LoadedModel, folder: str | Path, *, overwrite: bool = False,
               notes: dict | None = None, mode: str = "exact") -> dict:
    """Write ``folder/model.gguf`` (staged, renamed at the end) with types chosen by ``mode``; returns what was written.

    Returns ``{"folder", "file", "files", "bytes", "types": {type: count}, "exact_fraction", "notes": [str]}``.
    """
    model, arch = quantized.model, quantized.architecture
    gguf_arch, permute = check_gguf_family(model)
    config = model.config
    n_layers = len(arch.decoder_layers(model))
    choices = plan_gguf_types(loaded, list(quantized.bits), quantized.spec, mode)
    by_tensor = {(c.layer, c.linear): c for c in choices}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], n_layers)
    heads = {"q": config.num_attention_heads,
             "k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    linear_paths = {f"{path}.weight": where for path, where in arch.linear_paths(n_layers).items()}
    lines = describe_choices(choices)
    types: Counter = Counter()
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as staging:
        writer = gguf.GGUFWriter(str(staging / GGUF_NAME), gguf_arch)
        writer.add_name(f"{loaded.source} (LayerLab mixed-bit)")
        _hyperparameters(writer, config, n_layers)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        missing = _tokenizer_metadata(writer, loaded.tokenizer, int(config.vocab_size)) if loaded.tokenizer else \
            "no tokenizer was loaded: the file has none"
        if missing:
            lines.append(missing)
        seen: set[int] = set()
        # the quantized linears' weights come from their codes, one at a time (a variant holding codes would
        # materialise every one of them at once through its own state_dict)
        for name, tensor in quantized.tensor_source().state_dict().items():
            if tensor.data_ptr() in seen:
                continue  # a tied head: llama.cpp and transformers re-use the embedding
            seen.add(tensor.data_ptr())
            gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"No GGUF name for tensor '{name}' of {config.model_type}.")
            where = linear_paths.get(name)
            choice = by_tensor.get(where) if where else None
            n_head = heads.get(where[1]) if (where and permute) else None
            if choice is not None and choice.exact:
                layer_weights = quantized.weights[where[0]]
                data = _pack_exact(layer_weights[where[1]], choice.qtype, n_head)
                qtype = choice.qtype
            else:
                if where is not None:
                    tensor = quantized.weights[where[0]][where[1]].dequantize(tensor.dtype)
                values = tensor.detach().float().cpu().numpy()
                if n_head is not None and values.ndim >= 1:
                    values = _permute_rows(values, n_head)
                qtype = choice.qtype if choice is not None else ("F16" if values.ndim == 2 else "F32")
                data = _quantize(np.ascontiguousarray(values), qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=T[qtype] if qtype not in ("F16", "F32") else None)
            types[qtype] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (staging / "layerlab_export.json").write_text(json.dumps(
            {**(notes or {}), "types": [asdict(c) for c in choices]}, indent=2, default=str))
    path = folder / GGUF_NAME
    exact = sum(c.exact for c in choices) / len(choices) if choices else 1.0
    return {"folder": str(folder), "file": str(path), "files": sorted(p.name for p in folder.iterdir()),
            "bytes": path.stat().st_size, "remote_code": False, "types": dict(types), "exact_fraction": exact,
            "type_choice": mode, "notes": lines}


def load_gguf(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The file read back by transformers' GGUF loader (dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=dtype).eval()
