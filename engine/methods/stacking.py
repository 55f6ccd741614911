"""Stacking: a sequence of methods on one model — slice or drop first, then quantize the result.

The second stage sees the first stage's model as its base (its own fingerprint, so quantization caches never
mix); sizes are against the *dense* model at 16 bits.  Every stage's plan is stored in the record.
"""

from __future__ import annotations

from dataclasses import replace

from engine.core.data import DataSpec, token_windows
from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel, model_size
from engine.core.progress import stage_callback
from engine.export.gguf_llamacpp import llamacpp_details
from engine.methods.base import Compressed, Method, RunCost
from engine.methods.dropping import Dropping
from engine.methods.quantization import Quantization, allocation_for
from engine.methods.slicing import Slicing
from engine.quant.grid import LLAMACPP
from engine.quant.quantize_model import quantize_model
from engine.runs.plans import QuantPlan, StackPlan

FIRST_STAGES: dict[type, Method] = {method.plan_type: method for method in (Slicing(), Dropping())}
"""The methods a stack may start with, by plan type."""
STAGE_FIELDS = ("series", "target", "schedule", "dims", "block", "layers")
"""What a first stage's config keeps in the stacked run's record."""


def first_stage(plan: StackPlan) -> Method:
    method = FIRST_STAGES.get(type(plan.first))
    if method is None or not isinstance(plan.then, QuantPlan):
        raise ValueError("The first stage of a stack is slicing or dropping, and the second quantizes its result.")
    return method


class Stacking(Method):
    name = "stacked"
    plan_type = StackPlan
    title = "stacked"
    folder = "stacked"
    series_word = "stack"

    def refusal(self, loaded: LoadedModel, plan: StackPlan, saving: bool = False) -> str | None:
        if saving:
            return "Stacked runs are not saved as a model folder: save each stage's own run."
        return first_stage(plan).refusal(loaded, plan.first) or Quantization().refusal(loaded, plan.then)

    def cost(self, plan: StackPlan) -> RunCost:
        first, then = first_stage(plan).cost(plan.first), Quantization().cost(plan.then)
        return RunCost(first.passes + then.passes, first.fixed_per_hidden + then.fixed_per_hidden)

    def memory_profile(self, plan: StackPlan) -> MemoryProfile:
        return first_stage(plan).memory_profile(plan.first)

    def reads_calibration(self, plan: StackPlan) -> bool:
        return first_stage(plan).reads_calibration(plan.first) or Quantization().reads_calibration(plan.then)

    def code_bits(self, plan: StackPlan, prepared=None) -> int:
        return Quantization().code_bits(plan.then)

    def compress(self, store, loaded, plan: StackPlan, prepared, calibration: DataSpec, progress=None) -> Compressed:
        method = first_stage(plan)
        windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
        stage = method.compress(store, loaded, plan.first,
                                method.prepare(store, loaded, plan.first, calibration, progress), calibration, progress)
        stage_config = {"method": method.name, **{k: stage.config[k] for k in STAGE_FIELDS if k in stage.config}}
        middle = LoadedModel.from_model(stage.model, loaded.tokenizer,
                                        source=f"{loaded.source} ({stage_config['series']})")
        # a model that keeps every layer is ranked by the dense model's scores; a dropped model is scored anew
        ranked_on = loaded if method.keeps_layers else middle
        then = plan.then
        allocation, _ = allocation_for(store, ranked_on, then, calibration, progress)
        spec = then.spec()
        quantized = quantize_model(middle, allocation, windows if spec.needs_calibration else None,  # GPTQ, imatrix
                                   spec=spec, use_cache=False, progress=stage_callback(progress, "quantizing"))
        qsize = quantized.size()
        if then.quantizer == LLAMACPP and method.keeps_layers is False:  # a dropped model: a GGUF file it will be
            file_bytes = llamacpp_details(middle, then.spec(), quantized.bits)["file_bytes"]
            if file_bytes:
                qsize = replace(qsize, file_bytes=file_bytes)
        dense_params = model_size(loaded.model)["params"]
        size = {"params": model_size(middle.model)["params"], "bytes": qsize.total_bytes,
                "bytes_16bit": qsize.total_bytes_16bit, "size_fraction": qsize.total_bytes_16bit / (2 * dense_params),
                "param_fraction": model_size(middle.model)["params"] / dense_params,
                "avg_bits": allocation.average_bits, "bits_per_weight": qsize.bits_per_weight}
        quant_config = {"method": Quantization.name, "series": then.series(), "bits": list(allocation.bits),
                        "quantizer": then.quantizer, "group_size": then.group_size, "ordering": then.ordering,
                        "ranked_on": "dense model" if ranked_on is loaded else "dropped model"}
        config = {"series": plan.series(), "stages": [stage_config, quant_config], "calibration": windows.label()}
        return Compressed(quantized.model, size, config, artifact=quantized)

    def export_formats(self, record, loaded=None) -> dict[str, str | None]:
        reason = "Stacked runs cannot be exported yet: export each stage's own run."
        return {"hf": reason, "gguf": reason, "ct": reason}
