"""Dropping (docs/methods.md §8): remove whole decoder layers, or only their attention or MLP blocks, chosen by a
score ranking, measured sensitivity, or a custom list (:mod:`engine.runs.drop_choice` chooses)."""

from __future__ import annotations

from pathlib import Path

from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel, model_size
from engine.dropping.drop_model import drop_model, save_dropped
from engine.methods.base import NOT_QUANTIZED, REMOTE_CODE, Compressed, Method, RunCost
from engine.quant.grid import LLAMACPP
from engine.quant.runtimes import Runtime
from engine.runs.drop_choice import dropped_layers
from engine.runs.plans import DropPlan
from engine.runs.record import RunRecord


def removed_size(loaded: LoadedModel, model, params: int) -> dict:
    """Size metrics of a model with real parameters removed, against dense (16-bit bytes)."""
    dense = model_size(loaded.model)["params"]
    return {"params": params, "param_fraction": params / dense, "bytes": model_size(model)["bytes"],
            "bytes_16bit": 2 * params, "size_fraction": params / dense}


class Dropping(Method):
    name = "dropping"
    plan_type = DropPlan
    title = "dropping"
    folder = "dropped"
    series_word = "drop"
    measures_latency = True
    keeps_layers = False

    def cost(self, plan: DropPlan) -> RunCost:
        return RunCost(passes=0.0, fixed_per_hidden=2.8)

    def memory_profile(self, plan: DropPlan) -> MemoryProfile:
        return MemoryProfile.DROPPING

    def prepare(self, store, loaded, plan, calibration, progress=None, compute=True) -> list[int]:
        return dropped_layers(store, loaded, plan, calibration, progress, compute=compute)

    def compress(self, store, loaded, plan: DropPlan, prepared: list[int], calibration, progress=None) -> Compressed:
        dropped = drop_model(loaded, plan.block, prepared, plan.protect_ends)
        config = {"series": plan.series(), "block": plan.block, "by": plan.by, "count": len(prepared),
                  "layers": prepared, "protect_ends": plan.protect_ends, "choice": plan.choice(),
                  "iterative": plan.is_iterative,
                  "calibration": calibration.label() if plan.by != "custom" else None}
        return Compressed(dropped.model, removed_size(loaded, dropped.model, dropped.report.params_dropped), config,
                          artifact=dropped)

    def save(self, compressed: Compressed, folder: str | Path, tokenizer=None) -> Path:
        return save_dropped(compressed.artifact, folder, tokenizer=tokenizer)

    def rebuild(self, loaded: LoadedModel, record: RunRecord, progress=None):
        config = record.config
        return drop_model(loaded, config["block"], list(config["layers"]), bool(config.get("protect_ends"))).model

    def runs_in(self, config: dict) -> str:
        if config.get("block", "layer") != "layer":
            return REMOTE_CODE
        return "transformers, vLLM (llama.cpp: through a stack)"

    def deployment(self, plan: DropPlan, runtime: Runtime) -> str | None:
        if not runtime.deployable:
            return None
        if plan.block != "layer":
            return (f"Layers without their {plan.block} block need the modelling file LayerLab writes beside the "
                    "Hugging Face folder (`trust_remote_code=True`): transformers runs it"
                    + ("." if runtime.key == "transformers" else f"; {runtime.label} does not. To ship to "
                       f"{runtime.label}, drop whole layers instead."))
        if runtime.key == LLAMACPP:
            return ("A model without whole layers is the same architecture with fewer layers. For llama.cpp, drop and "
                    "quantize in llama.cpp's types in one stack (Compare methods → Stack, then Results → Export "
                    "as GGUF; Llama, Mistral and Qwen2 families), or convert the exported Hugging Face folder "
                    "with llama.cpp's `convert_hf_to_gguf.py`.")
        return ("A model without whole layers is the same architecture with fewer layers: its Hugging Face folder "
                f"runs in {runtime.label.split(' (')[0]} as it is.")

    def export_formats(self, record, loaded=None) -> dict[str, str | None]:
        return {"hf": None, **NOT_QUANTIZED}
