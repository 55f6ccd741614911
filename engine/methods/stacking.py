"""Stacking: a sequence of methods on one model — slice or drop first, then quantize the result.

The second stage sees the first stage's model as its base (its own fingerprint, so quantization caches never
mix); sizes are against the *dense* model at 16 bits.  Every stage's plan is stored in the record.
"""

from __future__ import annotations

import time
from dataclasses import replace

from engine.core.data import DataSpec, token_windows
from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel, model_size
from engine.core.progress import stage_callback
from engine.export.ct_folder import CT_ZERO_POINTS, ct_unsupported, ct_weights_bytes
from engine.export.gguf_llamacpp import llamacpp_details
from engine.methods.base import Compressed, Method, RunCost, calibration_of
from engine.methods.dropping import Dropping
from engine.methods.quantization import SCORED_ORDERINGS, Quantization, allocation_for
from engine.methods.slicing import Slicing
from engine.quant.allocation import Allocation
from engine.quant.grid import LLAMACPP, QuantizerSpec
from engine.quant.layer_bits import normalize_all
from engine.quant.quantize_model import quantize_model
from engine.quant.runtimes import runtime_named, runtime_of
from engine.runs.cached_scores import ScoresNotComputed
from engine.runs.plans import QuantPlan, StackPlan

FIRST_STAGES: dict[type, Method] = {method.plan_type: method for method in (Slicing(), Dropping())}
"""The methods a stack may start with, by plan type."""
STAGE_FIELDS = ("series", "target", "schedule", "dims", "block", "layers")
"""What a first stage's config keeps in the stacked run's record."""


def method_of_stage(name: str | None) -> Method | None:
    """The first-stage method stored under ``name`` in a stacked run's record."""
    return next((m for m in FIRST_STAGES.values() if m.name == name), None)


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
        method = first_stage(plan)
        first, then = method.cost(plan.first), Quantization().cost(plan.then)
        # a dropped model's layers are scored anew to order the bits (unless cached: cached_passes)
        rescoring = 1.0 if not method.keeps_layers and plan.then.ordering in SCORED_ORDERINGS else 0.0
        return RunCost(first.passes + then.passes + rescoring, first.fixed_per_hidden + then.fixed_per_hidden)

    def extra_eval_seconds(self, loaded: LoadedModel, plan: StackPlan, seqlen: int, n_windows: int) -> float:
        return Quantization().extra_eval_seconds(loaded, plan.then, seqlen, n_windows)

    def cached_passes(self, store, loaded: LoadedModel, plan: StackPlan, calibration: DataSpec) -> float:
        """The dropped model's rescoring, when the same layers were dropped before on this calibration text (a
        second stack with the same first stage): dropping is cheap, so the smaller model is built to ask."""
        method = first_stage(plan)
        if method.keeps_layers or plan.then.ordering not in SCORED_ORDERINGS:
            return 0.0
        try:
            chosen = method.prepare(store, loaded, plan.first, calibration, compute=False)
            middle = method.compress(store, loaded, plan.first, chosen, calibration).model
            allocation_for(store, LoadedModel.from_model(middle, loaded.tokenizer), plan.then, calibration,
                           compute=False)
        except (ScoresNotComputed, ValueError):
            return 0.0
        return 1.0

    def prepare(self, store, loaded, plan: StackPlan, calibration: DataSpec, progress=None, compute: bool = True):
        """The first stage's choice (slicing schedule or layers to drop); the second stage's comes from its
        result, inside :meth:`compress`."""
        method = first_stage(plan)
        chosen = method.prepare(store, loaded, plan.first, calibration, progress, compute=compute)
        if not compute and method.keeps_layers:  # the bits are then ordered by the dense model's scores
            allocation_for(store, loaded, plan.then, calibration, progress, compute=False)
        return chosen

    def memory_profile(self, plan: StackPlan) -> MemoryProfile:
        return first_stage(plan).memory_profile(plan.first)

    def reads_calibration(self, plan: StackPlan) -> bool:
        return first_stage(plan).reads_calibration(plan.first) or Quantization().reads_calibration(plan.then)

    def code_bits(self, plan: StackPlan, prepared=None) -> int:
        return Quantization().code_bits(plan.then)

    def compress(self, store, loaded, plan: StackPlan, prepared, calibration: DataSpec, progress=None) -> Compressed:
        method = first_stage(plan)
        windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
        if prepared is None:
            prepared = method.prepare(store, loaded, plan.first, calibration, progress)
        stage = method.compress(store, loaded, plan.first, prepared, calibration, progress)
        stage_config = {"method": method.name, **{k: stage.config[k] for k in STAGE_FIELDS if k in stage.config}}
        middle = LoadedModel.from_model(stage.model, loaded.tokenizer,
                                        source=f"{loaded.source} ({stage_config['series']})")
        # a model that keeps every layer is ranked by the dense model's scores; a dropped model is scored anew
        ranked_on = loaded if method.keeps_layers else middle
        then = plan.then
        allocation, _ = allocation_for(store, ranked_on, then, calibration, progress)
        spec = then.spec()
        started = time.perf_counter()
        quantized = quantize_model(middle, allocation, windows if spec.needs_calibration else None,  # GPTQ, imatrix
                                   spec=spec, use_cache=False, progress=stage_callback(progress, "quantizing"))
        quantize_s = time.perf_counter() - started
        whole_layers = drops_whole_layers(stage_config)  # the runtimes' own model code runs it
        in_ct = runtime_named(then.runtime).packs_zero_points and whole_layers  # a compressed-tensors checkpoint
        qsize = quantized.size(packed_zeros=in_ct)  # zero points as the checkpoint packs them
        details = {}
        if then.quantizer == LLAMACPP and whole_layers:  # a GGUF file it will be
            details = llamacpp_details(middle, then.spec(), quantized.bits)
            if details["file_bytes"]:
                qsize = replace(qsize, file_bytes=details["file_bytes"])
        elif in_ct:  # the checkpoint it will be
            details = {"file_bytes": ct_weights_bytes(quantized, middle)}
            qsize = replace(qsize, file_bytes=details["file_bytes"])
        dense_params = model_size(loaded.model)["params"]
        size = {"params": model_size(middle.model)["params"], "bytes": qsize.total_bytes,
                "bytes_16bit": qsize.total_bytes_16bit, "size_fraction": qsize.total_bytes_16bit / (2 * dense_params),
                "param_fraction": model_size(middle.model)["params"] / dense_params,
                "avg_bits": allocation.average_bits, "bits_per_weight": qsize.bits_per_weight}
        quant_config = {"method": Quantization.name, "series": then.series(), "bits": list(allocation.bits),
                        "quantizer": then.quantizer, "group_size": then.group_size, "ordering": then.ordering,
                        "ranked_on": "dense model" if ranked_on is loaded else "dropped model",
                        "quantizer_spec": spec.to_dict(),  # with calibration_spec: the export rebuilds this model
                        "file_bytes": details.get("file_bytes"), "file_note": details.get("file_note"),
                        "quantize_s": quantize_s}  # what an export's rebuild repeats after the first stage
        config = {"series": plan.series(), "stages": [stage_config, quant_config], "calibration": windows.label(),
                  "calibration_spec": calibration.to_dict(), "target_runtime": then.runtime}
        return Compressed(quantized.model, size, config, artifact=quantized)

    # ------------------------------------------- export: drop whole layers, then llama.cpp types or compressed-tensors

    def runs_in(self, config: dict) -> str:
        if export_refusal(config, "gguf") is None:
            return "llama.cpp (GGUF)"
        if export_refusal(config, "ct") is None:  # as a quantization run for the same runtime says
            return runtime_of(config).runs_as
        return "nowhere as one file: export each stage's own run"

    def rebuild_seconds(self, record) -> float:
        """After dropping, only the second stage's quantization is repeated (timed by the run: the scoring and
        choosing in its compression time are not); any other stack, its whole compression time."""
        quant = record.config.get("stages", [{}, {}])[1]
        first = method_of_stage(record.config.get("stages", [{}])[0].get("method"))
        if "quantize_s" in quant and first is not None and not first.keeps_layers:
            return float(quant["quantize_s"])
        return float(record.metrics.get("compress_s", 0.0))

    def quantized_as(self, record) -> tuple[QuantizerSpec, tuple]:
        quant = record.config["stages"][1]
        spec = (QuantizerSpec(**quant["quantizer_spec"]) if quant.get("quantizer_spec")
                else QuantizerSpec(method=quant["quantizer"], group_size=quant["group_size"]))
        return spec, normalize_all(quant["bits"])

    def written_from(self, loaded: LoadedModel, record) -> LoadedModel:
        """The model the stack's second stage quantized: the first stage's result (dropping: no compute)."""
        stage = record.config["stages"][0]
        method = method_of_stage(stage["method"])
        model = method.rebuild(loaded, replace(record, config=stage))
        return LoadedModel.from_model(model, loaded.tokenizer, source=f"{loaded.source} ({stage['series']})")

    def rebuild(self, loaded: LoadedModel, record, progress=None):
        """The stacked model as a :class:`~engine.quant.quantize_model.QuantizedModel` of the first stage's result
        (its file or folder is written from that model: :meth:`written_from`)."""
        middle = self.written_from(loaded, record)
        spec, bits = self.quantized_as(record)
        windows = None
        if spec.needs_calibration:
            windows = token_windows(calibration_of(record), middle.tokenizer, middle.max_seqlen)
        return quantize_model(middle, Allocation(bits, tuple(range(len(bits)))), windows, spec=spec, use_cache=False,
                              progress=stage_callback(progress, "quantizing"))

    def export_formats(self, record, loaded=None) -> dict[str, str | None]:
        formats = {"gguf": export_refusal(record.config, "gguf"), "ct": export_refusal(record.config, "ct")}
        if formats["ct"] is None and loaded is not None:  # the model's widths and the group size still decide
            formats["ct"] = ct_unsupported(loaded, self.quantized_as(record)[0])
        names = {"gguf": "a GGUF file", "ct": "a compressed-tensors folder"}
        exports = [names[fmt] for fmt, reason in formats.items() if reason is None]
        formats["hf"] = (f"a stack's model is quantized: it exports as {' or '.join(exports)} (a Hugging Face folder "
                         "would hold dequantized 16-bit weights)." if exports else
                         "export each stage's own run for a Hugging Face folder.")
        return formats


def drops_whole_layers(stage: dict) -> bool:
    """Whether a stack's first stage (its stored config) dropped whole decoder layers: the only first stage
    whose result the runtimes' own model code runs (the same architecture with fewer layers)."""
    return isinstance(method_of_stage(stage.get("method")), Dropping) and stage.get("block") == "layer"


def export_refusal(config: dict, fmt: str) -> str | None:
    """Why a stacked run stored with ``config`` has no ``fmt`` export (``"gguf"`` or ``"ct"``; ``None``: it has
    one, written from the model without the dropped layers: in llama.cpp's types as a GGUF file, or on the
    symmetric or integer grid as a compressed-tensors folder)."""
    first, quant = config.get("stages", [{}, {}])
    in_llamacpp = quant.get("quantizer") == LLAMACPP
    if not drops_whole_layers(first):
        return ("only a stack that drops whole layers and then quantizes exports (a GGUF file in llama.cpp's "
                "types, or a compressed-tensors folder): this one's first stage changes the "
                "layers' shapes, which the runtimes' model code lacks.")
    if not quant.get("quantizer_spec"):
        return "it was stored before stacks recorded their quantizer: run the same stack again and export that run."
    if fmt == "ct":
        if in_llamacpp:
            return ("its second stage holds llama.cpp's types, which only GGUF stores; re-run the stack with target "
                    "runtime vLLM or transformers for a compressed-tensors folder.")
        if quant["quantizer_spec"].get("zero_point") not in CT_ZERO_POINTS:
            return ("compressed-tensors holds LayerLab's symmetric and integer grids exactly, not the float zero "
                    "point: re-run the stack with target runtime vLLM or transformers to export it this way.")
        if runtime_of(config).export == "ct" and not quant.get("file_bytes"):
            return ("it was stored before stacks were sized as their checkpoint: run the same stack again and export "
                    "that run.")
        return None
    if not in_llamacpp:
        return ("its second stage quantized on LayerLab's grid; re-run the stack with llama.cpp's types "
                "(target runtime llama.cpp) to export it as a GGUF file.")
    if not quant.get("file_bytes"):
        note = quant.get("file_note") or "LayerLab cannot write this model's family as a GGUF file"
        return (note.split(". ")[0] + ": drop the same layers on the Dropping page, export that run's Hugging "
                "Face folder, convert it with llama.cpp's `convert_hf_to_gguf.py` and quantize it with "
                "`llama-quantize`.")
    return None
