"""Loading causal LMs: Hugging Face ids, local paths and the built-in models (:mod:`engine.core.builtins`).

``load_model`` returns a :class:`LoadedModel` (model, tokenizer, architecture
adapter, and a card of facts for the UI).  Every failure a user can cause is
raised as a :class:`ModelLoadError` subclass with a message that says what to
do; nothing else escapes for ordinary bad input.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from engine.core import memory
from engine.core.architectures import (
    FEATURES,
    Architecture,
    UnsupportedArchitectureError,
    architecture_of,
    get_submodule,
)
from engine.core.builtins import BUILTIN_NAME, BUILTINS, builtin_model_dir
from engine.core.discovery import encoder_decoder_message
from engine.core.model_errors import ModelLoadError, NotCausalLMError, UnsupportedModelError
from engine.core.out_of_memory import is_allocation_failure, release_memory

LAYOUT_SOURCES = {"table": "table: a family LayerLab knows (its architecture table)",
                  "discovered": "discovered: read off the module tree"}
LOCAL_FILES_ROW = "license files (this machine)"
"""Model-card row naming files on this machine: shown in the app, left out of reports sent elsewhere."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for analysis.  Treat ``model`` as read-only: compress a copy."""

    model: PreTrainedModel
    tokenizer: object
    architecture: Architecture
    source: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    note: str = ""
    card: dict = field(default_factory=dict)

    @property
    def max_seqlen(self) -> int:
        """Longest window (tokens) the model's position embeddings allow."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def num_layers(self) -> int:
        return len(self.architecture.decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream: the embedding's output width (whatever the config calls it)."""
        return int(get_submodule(self.model, self.architecture.embedding).weight.shape[1])

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: object = None, source: str = "in-memory") -> LoadedModel:
        """Wrap a model already in memory (tests, notebooks): architecture and fingerprint are computed."""
        return cls(model=model, tokenizer=tokenizer, architecture=architecture_of(model),
                   source=source, device=next(model.parameters()).device, dtype=next(model.parameters()).dtype,
                   fingerprint=weights_fingerprint(model))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; otherwise validate the request."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but no CUDA GPU is available; choose 'cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU and bf16 (fp16 without bf16 support) on GPUs."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'. Choose one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline mode counts as no)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_config(source: str, trust_remote_code: bool, local_only: bool):
    if Path(source).is_dir() and not (Path(source) / "config.json").exists():
        raise ModelLoadError(
            f"The folder '{source}' has no config.json, so it holds no Hugging Face model. "
            f"Point to a model folder, or use the built-in '{BUILTIN_NAME}'."
        )
    try:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"'{source}' needs custom code from its repository. LayerLab does not run "
                "remote code unless you tick 'trust remote code'."
            ) from err
        raise ModelLoadError(f"'{source}' has a config transformers cannot read: {err}") from err
    except OSError as err:
        if Path(source).exists():
            where = "This folder has no config.json."
        elif local_only:
            where = "It is not a local folder, not in the local hub cache, and the Hugging Face hub cannot be reached."
        else:
            where = "It is neither a local folder nor a model id on the Hugging Face hub."
        raise ModelLoadError(
            f"Could not find a model at '{source}'. {where} "
            f"Use a local model folder, or a built-in model ({', '.join(BUILTINS)})."
        ) from err


def _nested_text_model(config) -> str | None:
    """``model_type`` of a nested text model (vision-language / multimodal configs), else ``None``."""
    text = getattr(config, "text_config", None)
    others = [n for n in ("vision_config", "audio_config", "vision_tower_config") if getattr(config, n, None)]
    if text is not None and others:
        return str(getattr(text, "model_type", None) or "?")
    return None


def check_causal_lm(config) -> None:
    """Refuse encoder-decoder, nested multimodal and other non-causal checkpoints from their config.

    Whether the layout itself is usable is decided once the module tree
    exists (:func:`engine.core.architectures.architecture_of`).
    """
    names = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise NotCausalLMError(encoder_decoder_message(config))
    text_type = _nested_text_model(config)
    if text_type is not None:
        raise NotCausalLMError(
            f"This checkpoint is a multimodal model ({', '.join(names) or config.model_type}) whose text part "
            f"(model_type '{text_type}') is nested inside it next to a vision / audio tower. LayerLab analyses "
            "decoder-only causal LMs: load the text model alone (a checkpoint of its language model)."
        )
    causal_suffixes = ("ForCausalLM", "LMHeadModel")
    if names and not any(name.endswith(causal_suffixes) for name in names):
        raise NotCausalLMError(
            f"This checkpoint is a {', '.join(names)}, not a causal (decoder-only) language "
            "model. LayerLab analyses causal LMs such as Llama, Mistral, Qwen, Gemma, Phi, OPT or Granite."
        )


def skeleton_of(config, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model built from ``config`` on the meta device (shapes, no weights); ``None`` when transformers
    cannot instantiate it here (the real load then reports it with its own message)."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the real load reports it with its own message
        return None


def check_layout(skeleton: torch.nn.Module | None) -> None:
    """Discover the layout on the empty model, before any weight is read.

    Raises :class:`UnsupportedModelError` naming what was found when the
    module tree has no usable decoder stack.
    """
    if skeleton is None:
        return
    try:
        architecture_of(skeleton)
    except UnsupportedArchitectureError as err:
        raise UnsupportedModelError(str(err)) from None


LOAD_HEADROOM = 1.05  # the weights must fit with 5% to spare (buffers, allocator slack)


def check_fits(skeleton: torch.nn.Module | None, source: str, dtype: torch.dtype, device: torch.device,
               device_map: str | None = None) -> None:
    """Refuse, before reading any weight, a model whose weights at ``dtype`` exceed the free memory they go to.

    Where: ``device``'s free memory, or with ``device_map="auto"`` every GPU's and the host's together.
    A model too large for the machine would otherwise be killed by the system part-way through loading,
    taking the dashboard (and every session's loaded model) with it.
    """
    if skeleton is None:
        return
    params = {id(p): p for p in skeleton.parameters()}
    need = sum(p.numel() for p in params.values()) * dtype.itemsize
    places = [device] if device_map is None else \
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())] + [torch.device("cpu")]
    free = [memory.free_bytes(place) for place in places]
    if any(f is None for f in free):
        return
    where = " + ".join(str(place) for place in places)
    if need * LOAD_HEADROOM <= sum(free):
        return
    name = str(dtype).removeprefix("torch.")
    advice = (f"load it in bfloat16 or float16 (≈ {memory.size_text(need * 2 / dtype.itemsize)}), "
              if dtype.itemsize > 2 else "")
    raise ModelLoadError(
        f"'{source}' needs ≈ {memory.size_text(need)} for its weights in {name} but only {memory.size_text(sum(free))} "
        f"{'is' if len(places) == 1 else 'are'} free on {where}: {advice}choose a smaller model, or free memory "
        "(close other programs or sessions). No weight was read.")


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Short hash of names, shapes, dtypes and a strided sample of every parameter.

    Cheap for multi-billion-parameter models, and changes whenever weights change
    in any realistic way (compression touches whole tensors).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_size(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count and bytes (``parameters()`` yields tied weights once)."""
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "bytes": sum(p.numel() * p.element_size() for p in params),
    }


def dense_size_metrics(model: torch.nn.Module) -> dict:
    """Size metrics of an uncompressed model, in the form compressed runs report them.

    ``bytes``: as held now; ``bytes_16bit``: every parameter at 16 bits (the
    reference every ``size_fraction`` is taken against).
    """
    size = model_size(model)
    return {**size, "bytes_16bit": 2 * size["params"], "param_fraction": 1.0, "size_fraction": 1.0}


def model_card(loaded: LoadedModel) -> dict:
    """Facts shown on the Model page."""
    config = loaded.model.config
    return {
        "source": loaded.source,
        "architecture": config.model_type,
        "layout": LAYOUT_SOURCES.get(loaded.architecture.source, loaded.architecture.source),
        "layers": loaded.num_layers,
        "hidden size": config.hidden_size,
        "parameters": model_size(loaded.model)["params"],
        "vocabulary": config.vocab_size,
        "max sequence length": loaded.max_seqlen,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "fingerprint": loaded.fingerprint,
        **{f"unavailable: {FEATURES[key]}": reason for key, reason in loaded.architecture.unavailable.items()},
    }


def card_values(card: dict) -> list[str]:
    """The model card's values as shown (page and report): counts with thousands separators."""
    return [f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in card.values()]


def load_model(
    source: str = BUILTIN_NAME,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM by hub id, local path, or a built-in name (:data:`BUILTINS`).

    ``device_map="auto"`` lets accelerate spread a large model over all GPUs
    (and CPU memory); otherwise the whole model goes to ``device``.
    """
    source = (source or "").strip()
    if not source:
        raise ModelLoadError(f"Enter a model id or path, or use the built-in '{BUILTIN_NAME}'.")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    is_builtin = source in BUILTINS
    path = str(builtin_model_dir(source)) if is_builtin else source
    local_only = is_builtin or Path(path).exists() or not hub_reachable()
    config = _load_config(path, trust_remote_code, local_only)
    check_causal_lm(config)
    skeleton = skeleton_of(config, trust_remote_code)
    check_layout(skeleton)
    check_fits(skeleton, source, torch_dtype, torch_device, device_map)
    del skeleton
    failure = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            use_safetensors=True, local_files_only=local_only, device_map=device_map,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"'{source}' has a config but its weights or tokenizer could not be loaded "
            f"(LayerLab reads safetensors only): {err}"
        ) from err
    except (RuntimeError, MemoryError) as err:  # the estimate fitted but the memory went elsewhere meanwhile
        if not is_allocation_failure(err):
            raise
        failure = f"'{source}' ran out of memory while loading: {str(err).splitlines()[0][:200]}"
    if failure:  # raised outside the except block: the half-loaded weights are released first
        release_memory()
        raise ModelLoadError(failure + ". Free memory or load it in a 16-bit dtype.")
    if device_map is None:
        model.to(torch_device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        architecture = architecture_of(model)
    except UnsupportedArchitectureError as err:
        raise UnsupportedModelError(str(err)) from None
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        architecture=architecture,
        source=source,
        device=torch_device,
        dtype=torch_dtype,
        fingerprint=weights_fingerprint(model),
        note=BUILTINS[source].note if is_builtin else "",
    )
    loaded.card = model_card(loaded)
    if is_builtin and BUILTINS[source].license:
        loaded.card["license"] = BUILTINS[source].license
        files = BUILTINS[source].licenses()
        if files:
            loaded.card[LOCAL_FILES_ROW] = ", ".join(str(f) for f in files)
    return loaded
