"""Memory and time of every operation on a synthetic large model (no download): peak over the base model's bytes.

    python -m bench.scale                      # ~1.1B-parameter Llama-like model, fp32, on this CPU
    python -m bench.scale --preset llama3-8b --device cuda --dtype bfloat16 --windows 32 --seqlen 512
    python -m bench.scale --only quant         # the build, then only the operations named (see --only)

The model is built from a config with random weights on the spot.  For each
operation it prints wall seconds and the peak memory while it ran, as a
multiple of the base model's own bytes: on CPU the process's resident set
(sampled every 5 ms) above what it held before the model was built; on CUDA
``torch.cuda.max_memory_allocated``; next to it the run's memory plan
(``engine.core.memory``) and measured / planned.  Targets (issue #18): scores <= 1.1x,
dropping preview <= 1.05x, 4-bit quantization preview <= 1.4x, slicing
<= 2.0x, evaluation of a variant <= its own bytes + 1.1x base.  The windows
are random token ids (memory and time do not depend on the text).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import threading
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.common import report
from engine.core.cpu import trim_freed_heap
from engine.core.data import DataSpec, TokenWindows
from engine.core.memory import ModelShape, evaluation_batch, plan_memory
from engine.core.models import LoadedModel, model_size
from engine.dropping.drop_model import drop_model
from engine.evaluation.perplexity import head_chunk, perplexity
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model
from engine.scores.redundancy import layer_redundancy
from engine.slicing.schedules import schedule_constant
from engine.slicing.slice_model import slice_model

PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B's shape
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),  # a smoke test of this script
}


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
    gc.collect()
    trim_freed_heap()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes while the block runs: CUDA allocator peak, or resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


def used_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


OPERATIONS = ("scores", "ppl", "drop", "slice", "quant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=list(PRESETS), default="1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--only", default=",".join(OPERATIONS),
                        help=f"comma-separated operations to measure after the build: {', '.join(OPERATIONS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(OPERATIONS):
        parser.error(f"unknown operation(s) {', '.join(sorted(only - set(OPERATIONS)))}; "
                     f"choose from {', '.join(OPERATIONS)}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=4096, tie_word_embeddings=False)
    ids = torch.randint(0, config.vocab_size, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    windows = TokenWindows(ids, DataSpec("wiki-offline", "calibration", args.seqlen, args.windows))
    release_freed_memory()
    before_model = used_bytes(device)
    rows: list[dict] = []
    state: dict = {}

    def measure(name: str, operation: Callable[[], object], variant_bytes: Callable[[object], int] | None = None,
                plan: str | None = None, code_bits: int = 8):
        release_freed_memory()
        started = time.perf_counter()
        with PeakMemory(device) as peak:
            result = operation()
        seconds = time.perf_counter() - started
        base = state.get("base_bytes") or max(1, used_bytes(device) - before_model)
        row = {"operation": name, "seconds": seconds, "peak_over_base": (peak.peak - before_model) / base}
        if variant_bytes is not None:
            row["variant_bytes_over_base"] = variant_bytes(result) / base
        if plan is not None:  # what the run's memory plan promised (engine.core.memory), same units
            planned = plan_memory(ModelShape.of(loaded.model, loaded.architecture), plan, device,
                                  calib_tokens=windows.input_ids.numel(), eval_batch=eval_batch,
                                  eval_seqlen=args.seqlen, group_size=128,
                                  code_bits=code_bits,
                                  head_chunk=head_chunk(loaded.model))
            row["planned_over_base"] = planned.peak_over_base
            row["measured_over_planned"] = row["peak_over_base"] / planned.peak_over_base
        rows.append(row)
        print(row, flush=True)
        if variant_bytes is not None:
            del result  # the variant is measured; free it before the next operation
            return None
        return result

    def build() -> LoadedModel:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        return LoadedModel.from_model(model, source=f"synthetic {args.preset}")

    loaded = measure("build (load)", build)
    state["base_bytes"] = model_size(loaded.model)["bytes"]
    n = loaded.num_layers
    if "scores" in only:
        measure(f"LR scores on {args.windows} x {args.seqlen}",
                lambda: layer_redundancy(loaded.model, loaded.architecture, windows))
    eval_batch = evaluation_batch(ModelShape.of(loaded.model, loaded.architecture), args.seqlen)  # as runs do
    if "ppl" in only:
        measure(f"perplexity (dense) on {args.windows} x {args.seqlen}",
                lambda: perplexity(loaded.model, windows, batch_size=eval_batch))

    def dropping_preview():
        dropped = drop_model(loaded, "layer", list(range(1, n - 1))[-8:])
        perplexity(dropped.model, windows, batch_size=eval_batch)
        return dropped.model

    if "drop" in only:
        measure(f"dropping {min(8, n - 2)} layers + perplexity", dropping_preview,
                lambda m: _own_bytes(m, loaded.model), plan="dropping")

    def slicing_run():
        sliced = slice_model(loaded, schedule_constant(0.25, n), windows).model
        perplexity(sliced, windows, batch_size=eval_batch)
        return sliced

    if "slice" in only:
        measure("slicing 25% (constant) + perplexity", slicing_run, lambda m: _own_bytes(m, loaded.model),
                plan="slicing")

    def quant_preview(bits: list[int]):
        def run():
            quantized = quantize_model(loaded, bits, spec=QuantizerSpec(bits=4, group_size=128), use_cache=False)
            perplexity(quantized.model, windows, batch_size=eval_batch)
            return quantized.model
        return run

    if "quant" in only:
        measure("4-bit RTN preview + perplexity", quant_preview([4] * n), lambda m: _own_bytes(m, loaded.model),
                plan="quantization-rtn", code_bits=4)
        measure("3/4-bit RTN preview + perplexity", quant_preview([3, 4] * (n // 2) + [4] * (n % 2)),
                lambda m: _own_bytes(m, loaded.model), plan="quantization-rtn", code_bits=4)
    name = f"scale-{args.preset}" if only == set(OPERATIONS) else f"scale-{args.preset}-{'-'.join(sorted(only))}"
    report(name, rows, {
        "preset": args.preset, "params": model_size(loaded.model)["params"], "dtype": args.dtype,
        "device": str(device), "base_bytes": state["base_bytes"], "windows": f"{args.windows} x {args.seqlen}",
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else "resident set (RSS) above the process "
        "before the model was built"})


def _own_bytes(variant: torch.nn.Module, base: torch.nn.Module) -> int:
    """Bytes of ``variant``'s parameters and buffers (a quantized variant's codes) that are not the base
    model's own: what the variant adds."""
    shared = {t.data_ptr() for t in itertools.chain(base.parameters(), base.buffers())}
    own = {t.data_ptr(): t.numel() * t.element_size() for t in itertools.chain(variant.parameters(), variant.buffers())
           if t.data_ptr() not in shared}
    return sum(own.values())


if __name__ == "__main__":
    main()
