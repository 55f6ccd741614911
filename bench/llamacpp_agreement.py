"""Does llama.cpp compute what LayerLab computes?  The same model in both, on the same tokens.

    python -m bench.llamacpp_agreement [--models smollm2-135m,gemma3-270m] [--windows 8x256] [--chunks 16]

For each built-in model:

- **same windows**: llama.cpp (the Python binding) runs, on LayerLab's evaluation windows (BOS each window where
  the tokenizer adds one), (a) the GGUF file the model was converted from, (b) an F32 GGUF of the in-app model,
  (c) LayerLab's own export of a 4/3-bit llama.cpp-type mix (k-quants, LIM, half the layers at 3 bits); each
  against the in-app model with the same weights: perplexity of both and KL divergence in-app -> llama.cpp;
- **the floor** of that divergence for (c): llama.cpp against llama.cpp on the same file with one norm weight
  vector one ulp larger (``blk.0.attn_norm.weight``), and the app against the app with its embedding one ulp
  larger.  With activations rounded to 8 bits before every quantized matmul (as llama.cpp does), a last-bit
  difference flips rounding codes and the flips compound through the layers: the same KL divergence as between
  two implementations;
- **llama.cpp's protocol**: ``llama-perplexity -c 256`` on the evaluation text against LayerLab reproducing its
  chunking, BOS per chunk and second-half scoring (engine.llamacpp.protocol).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--windows", default="8x256", help="evaluation windows x tokens")
    parser.add_argument("--chunks", type=int, default=16, help="llama-perplexity chunks of 256 tokens")
    args = parser.parse_args()
    from bench.common import report
    from engine.core.builtins import builtin_gguf_path
    from engine.core.data import DataSpec, split_text, token_windows
    from engine.core.models import load_model
    from engine.export.gguf_llamacpp import write_float_gguf, write_llamacpp_gguf
    from engine.llamacpp.agreement import agreement, compare_sides
    from engine.llamacpp.protocol import inapp_perplexity, llama_perplexity
    from engine.quant.allocation import allocate_fraction, layer_order
    from engine.quant.grid import LLAMACPP, QuantizerSpec
    from engine.quant.quantize_model import quantize_model

    n, seqlen = (int(v) for v in args.windows.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-agreement-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            loaded = load_model(name)
            windows = token_windows(DataSpec(split="evaluation", n_windows=n, seqlen=seqlen), loaded.tokenizer,
                                    loaded.max_seqlen)
            order = layer_order(loaded.num_layers, "importance", list(range(loaded.num_layers)))
            mix = quantize_model(loaded, allocate_fraction(order, 4, 3, 0.5),
                                 spec=QuantizerSpec(method=LLAMACPP, bits=4))
            files = {"source GGUF (as distributed)": (loaded.model, builtin_gguf_path(name)),
                     "F32 GGUF of the in-app model": (loaded.model, write_float_gguf(loaded, Path(tmp) / name / "f32")),
                     "LayerLab 4/3-bit k-quant mix (exported)": (
                         mix.model, Path(write_llamacpp_gguf(mix, loaded, Path(tmp) / name / "mix")["file"]))}
            mix_file = files["LayerLab 4/3-bit k-quant mix (exported)"][1]
            for label, sides in _floors(mix.model, loaded.architecture.embedding, mix_file).items():
                started = time.perf_counter()
                compared = compare_sides(sides, windows)
                found = compared.divergence[tuple(sides)]
                first, second = tuple(sides)
                rows.append({"model": name, "check": f"floor: {label}",
                             "gap": compared.ppl[second] / compared.ppl[first] - 1, "KLD mean": found.mean,
                             "KLD 99%": found.p99, "same top": found.same_top,
                             "seconds": time.perf_counter() - started})
                print(rows[-1], flush=True)
            for label, (model, gguf) in files.items():
                started = time.perf_counter()
                found = agreement(model, gguf, windows)
                rows.append({"model": name, "check": f"same windows: {label}", "MB": gguf.stat().st_size / 1e6,
                             "ppl LayerLab": found.ppl_layerlab, "ppl llama.cpp": found.ppl_llamacpp,
                             "gap": found.ppl_gap, "KLD mean": found.kld_mean, "KLD 99%": found.kld_p99,
                             "same top": found.same_top, "seconds": time.perf_counter() - started})
                print(rows[-1], flush=True)
            text = split_text(DataSpec(split="evaluation"))
            ours = inapp_perplexity(loaded.model, loaded.tokenizer, text, 256, args.chunks)
            theirs = llama_perplexity(builtin_gguf_path(name), text, 256, args.chunks)
            rows.append({"model": name, "check": f"llama-perplexity protocol, {args.chunks} chunks x 256",
                         "ppl LayerLab": ours, "ppl llama.cpp": theirs, "gap": theirs / ours - 1})
            print(rows[-1], flush=True)
    report("llamacpp_agreement", rows, {"windows": args.windows, "chunks": args.chunks,
                                        "command": f"python -m bench.llamacpp_agreement --models {args.models} "
                                                   f"--windows {args.windows} --chunks {args.chunks}"})


def _floors(model, embedding: str, gguf: Path) -> dict[str, dict]:
    """Two pairs of sides that differ by one ulp in one tensor: llama.cpp vs llama.cpp, the app vs the app."""
    import copy

    import torch

    from engine.core.architectures import get_submodule
    from engine.llamacpp.agreement import nudged_copy

    nudged_model = copy.deepcopy(model)
    weight = get_submodule(nudged_model, embedding).weight
    weight.data = torch.nextafter(weight.data, torch.full_like(weight.data, float("inf")))
    return {"llama.cpp vs llama.cpp, blk.0.attn_norm one ulp larger (the mix)": {
                "file": gguf, "nudged": nudged_copy(gguf, gguf.with_name(gguf.stem + "-nudged.gguf"))},
            "LayerLab vs LayerLab, embedding one ulp larger (the mix)": {"model": model, "nudged": nudged_model}}


if __name__ == "__main__":
    main()
