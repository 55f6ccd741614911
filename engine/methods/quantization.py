"""Layer-wise quantization (docs/methods.md §4): bits per layer (or per linear) from an ordering (LIM, ZD,
random, custom) or the bits optimizer, applied by a quantizer family: round-to-nearest or GPTQ on LayerLab's
grid, or llama.cpp's own types (exact GGUF)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.core.architectures import Feature
from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel, model_size
from engine.core.progress import StageProgress, stage_callback
from engine.export.gguf_llamacpp import llamacpp_details
from engine.methods.base import Compressed, Method, RunCost, calibration_of
from engine.quant.allocation import Allocation, allocate_average, allocate_fraction, layer_order
from engine.quant.grid import GPTQ, LLAMACPP, QuantizerSpec
from engine.quant.layer_bits import normalize_all
from engine.quant.quantize_model import quantize_model
from engine.quant.runtimes import RuntimeMismatch, runtime_named, runtime_of
from engine.quant.save import save_quantized
from engine.runs.cached_scores import scores_for
from engine.runs.plans import QuantPlan
from engine.runs.record import RunRecord
from engine.runs.store import ResultsStore
from engine.scores.ranking import zd_importance

SCORED_ORDERINGS = ("lim", "zd", "reversed-lim")


def allocation_for(store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec,
                   progress: StageProgress | None = None,
                   compute: bool = True) -> tuple[Allocation, list[float] | None]:
    """Bits per layer (the plan's ordering, then its low-bit fraction or target average),
    and the importance scores that ordered them (None for random and custom orders).

    ``compute=False`` (previews): raise :class:`~engine.runs.cached_scores.ScoresNotComputed` instead of scoring.
    """
    n, importance = loaded.num_layers, None
    if plan.ordering in SCORED_ORDERINGS:
        lr, zd = scores_for(store, loaded, calibration, compute, progress)
        importance = zd_importance(zd.zd_layer) if plan.ordering == "zd" else lr.lim
        kind = "reversed" if plan.ordering == "reversed-lim" else "importance"
        order = layer_order(n, kind, importance)
    elif plan.ordering == "random":
        order = layer_order(n, "random", seed=plan.seed)
    elif plan.ordering in ("optimizer", "optimizer-module"):
        raise ValueError("Optimizer allocations come from 'Optimize for budget' (engine.runs.bits_optimizer); "
                         "pass the chosen allocation to the run.")
    else:
        order = layer_order(n, "custom", permutation=plan.custom_order)
    if plan.target_bits is not None:
        return allocate_average(order, [plan.high_bits, plan.low_bits], plan.target_bits), importance
    return allocate_fraction(order, plan.high_bits, plan.low_bits, plan.low_fraction or 0.0), importance


def quantizer_spec_of(record: RunRecord) -> QuantizerSpec:
    """The per-weight quantizer of a quantization run (older runs: from their plan fields)."""
    config = record.config
    if config.get("quantizer_spec"):
        return QuantizerSpec(**config["quantizer_spec"])
    return QuantizerSpec(method=config["quantizer"], group_size=config["group_size"],
                         zero_point=config.get("zero_point", "integer"), act_order=bool(config.get("act_order")))


class Quantization(Method):
    name = "quantization"
    plan_type = QuantPlan
    title = "quantization"
    folder = "quantized"
    rebuild_share = 0.2  # per-layer results come back from the quantization cache

    def refusal(self, loaded: LoadedModel, plan: QuantPlan, saving: bool = False) -> str | None:
        runtime = runtime_named(plan.runtime)
        problems = plan.runtime_problems()
        if problems:
            return runtime.refusal(problems)
        if runtime.export == "ct":  # a run for a compressed-tensors runtime must be exportable to it
            from engine.export.ct_folder import ct_unsupported

            reason = ct_unsupported(loaded, plan.spec())
            if reason:
                return f"{runtime.label} loads this run as a compressed-tensors folder, and {reason}"
        if saving and plan.quantizer == LLAMACPP:
            return ("A run in llama.cpp's types is saved as its GGUF file: run it without saving, then export "
                    "it as GGUF (Export, or `python -m engine export RUN --format gguf`).")
        return loaded.architecture.unavailable_message(Feature.GPTQ if plan.quantizer == GPTQ else Feature.QUANTIZATION)

    def extra_eval_seconds(self, loaded: LoadedModel, plan: QuantPlan, seqlen: int, n_windows: int) -> float:
        if plan.quantizer != LLAMACPP:
            return 0.0  # LayerLab's grids dequantize in torch: as fast as dense, within the estimate's noise
        from engine.quant.ggml_weight import extra_model_forward_seconds

        return n_windows * extra_model_forward_seconds(loaded.model, loaded.architecture, plan.high_bits, seqlen,
                                                       plan.ggml_types)

    def cost(self, plan: QuantPlan) -> RunCost:
        return RunCost(0.63, 16.7) if plan.quantizer == GPTQ else RunCost(0.33, 0.89)

    def memory_profile(self, plan: QuantPlan) -> MemoryProfile:
        return MemoryProfile.GPTQ if plan.quantizer == GPTQ else MemoryProfile.RTN

    def reads_calibration(self, plan: QuantPlan) -> bool:
        return plan.spec().needs_calibration

    def code_bits(self, plan: QuantPlan, prepared: Allocation | None = None) -> int:
        return max(prepared.levels) if prepared is not None else plan.top_bits

    def group_size(self, plan: QuantPlan) -> int | None:
        return plan.group_size

    def prepare(self, store, loaded, plan, calibration, progress=None, compute=True) -> Allocation:
        return allocation_for(store, loaded, plan, calibration, progress, compute)[0]

    def compress(self, store, loaded, plan: QuantPlan, prepared: Allocation, calibration: DataSpec,
                 progress=None) -> Compressed:
        allocation, spec = prepared, plan.spec()
        problems = plan.runtime_problems(list(allocation.bits))
        if problems:
            raise RuntimeMismatch(runtime_named(plan.runtime).refusal(problems))
        windows: TokenWindows | None = None
        if spec.needs_calibration:
            windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
        quantized = quantize_model(loaded, allocation, windows, spec=spec,
                                   progress=stage_callback(progress, "quantizing"))
        in_ct = runtime_named(plan.runtime).packs_zero_points  # sized as its compressed-tensors checkpoint
        size = quantized.size(packed_zeros=in_ct)
        llamacpp = llamacpp_details(loaded, spec, quantized.bits) if spec.method == LLAMACPP else {}
        if llamacpp.get("file_bytes"):
            size = replace(size, file_bytes=llamacpp["file_bytes"])
        elif in_ct:  # the compressed-tensors checkpoint's bytes (16-bit rest)
            from engine.export.ct_folder import ct_weights_bytes

            size = replace(size, file_bytes=ct_weights_bytes(quantized, loaded))
        metrics = {
            "bytes": size.total_bytes, "bytes_16bit": size.total_bytes_16bit,
            "size_fraction": size.compression_16bit, "params": model_size(loaded.model)["params"],
            "param_fraction": 1.0, "bits_per_weight": size.bits_per_weight,
            # per layer as docs/methods.md averages them; per-module allocations by weight (code bits per weight)
            "avg_bits": size.code_bits_per_weight if allocation.per_module else allocation.average_bits,
            "unquantized_bytes": size.unquantized_bytes, "unquantized_fraction": size.unquantized_fraction,
            "cache_computed": quantized.stats.computed,
            "cache_hits": quantized.stats.memory_hits + quantized.stats.disk_hits,
        }
        config = {
            "series": plan.series(), "quantizer": plan.quantizer, "group_size": plan.group_size,
            "high_bits": plan.high_bits, "low_bits": plan.low_bits,
            "low_fraction": None if allocation.per_module else allocation.low_fraction(plan.low_bits),
            "target_bits": plan.target_bits, "ordering": plan.ordering, "bits": list(allocation.bits),
            "target_runtime": plan.runtime,
            "zero_point": plan.zero_point, "act_order": spec.act_order, "warnings": quantized.warnings,
            "calibration": windows.label() if windows is not None else None,
            "quantizer_spec": spec.to_dict(),  # with calibration_spec, lets exports rebuild the same model
            "calibration_spec": calibration.to_dict() if windows is not None else None,
            **llamacpp,
        }
        return Compressed(quantized.model, metrics, config, artifact=quantized)

    def save(self, compressed: Compressed, folder: str | Path, tokenizer=None) -> Path:
        return save_quantized(compressed.artifact, folder, tokenizer=tokenizer)

    def runs_in(self, config: dict) -> str:
        if config.get("quantizer") == LLAMACPP:  # llama.cpp's own types: the GGUF file, where this family has one
            return "llama.cpp (GGUF)" if config.get("file_bytes") else "llama.cpp's types (no GGUF writer here)"
        return runtime_of(config).runs_as

    def quantized_as(self, record: RunRecord) -> tuple[QuantizerSpec, tuple]:
        return quantizer_spec_of(record), normalize_all(record.config["bits"])

    def rebuild(self, loaded: LoadedModel, record: RunRecord, progress=None):
        """A :class:`~engine.quant.quantize_model.QuantizedModel` (GGUF / compressed-tensors pack its codes;
        the per-layer results come back from the quantization cache)."""
        spec = quantizer_spec_of(record)
        windows = None
        if spec.needs_calibration:
            windows = token_windows(calibration_of(record), loaded.tokenizer, loaded.max_seqlen)
        bits = normalize_all(record.config["bits"])
        return quantize_model(loaded, Allocation(bits, tuple(range(len(bits)))), windows, spec=spec,
                              progress=stage_callback(progress, "quantizing"))

    def export_formats(self, record, loaded=None) -> dict[str, str | None]:
        from engine.export.ct_folder import ct_unsupported

        spec = quantizer_spec_of(record)
        ct = gguf = None
        if spec.method != LLAMACPP and loaded is not None:  # LayerLab's grid: GGUF for the families it maps
            from engine.export.gguf_file import check_gguf_family
            from engine.export.hf_folder import ExportError

            try:
                check_gguf_family(loaded.model)
            except ExportError as err:
                gguf = f"{err} (or quantize with llama.cpp's types, which export as GGUF for this model)"
        if spec.method == LLAMACPP:
            ct = ("this run holds llama.cpp's types, which only GGUF stores; quantize with RTN or GPTQ (target "
                  "runtime vLLM or transformers) for a compressed-tensors folder.")
        elif loaded is not None:
            ct = ct_unsupported(loaded, spec)
        formats = {"hf": "Quantized runs export as GGUF or compressed-tensors (a Hugging Face folder would hold "
                         "dequantized 16-bit weights).", "gguf": gguf, "ct": ct}
        runtime = runtime_of(record.config)
        if runtime.export is not None:  # made for one runtime: only its format, the others say what to re-run
            other = {"gguf": "llama.cpp (GGUF)", "ct": "vLLM or transformers (compressed-tensors)"}
            for fmt in ("gguf", "ct"):
                if fmt != runtime.export:
                    formats[fmt] = (f"run {record.id} was made for {runtime.label}; for {other[fmt]} re-run these "
                                    "settings with that target runtime (sidebar; --runtime on the CLI).")
        return formats
