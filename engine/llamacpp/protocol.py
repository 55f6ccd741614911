"""llama.cpp's own perplexity protocol, run by ``llama-perplexity`` and reproduced in-app on the same text.

``llama-perplexity -f text -c n_ctx`` (``tools/perplexity/perplexity.cpp``)
tokenizes the whole text with the model's special tokens (BOS first where the
vocabulary adds one), cuts it into chunks of ``n_ctx`` tokens, replaces each
chunk's first token by BOS (where BOS is added), and scores only the second
half of each chunk: the predictions at positions ``n_ctx/2 .. n_ctx-2``, i.e.
``n_ctx - n_ctx/2 - 1`` tokens per chunk.  :func:`inapp_perplexity` does the
same with an in-app model; :func:`llama_perplexity` runs the tool and reads its
final estimate.  Both give the same text's perplexity by the same rule, so
their difference is the runtimes' arithmetic (llama.cpp multiplies quantized
weights by 8-bit-quantized activations on CPU).
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.core.data import bos_token_id
from engine.llamacpp.runtime import tool

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


@torch.no_grad()
def inapp_perplexity(model: torch.nn.Module, tokenizer, text: str, n_ctx: int, n_chunks: int) -> float:
    """Perplexity of ``model`` on ``text`` by llama-perplexity's rule (see the module docstring)."""
    tokens = tokenizer(text, return_tensors="pt").input_ids[0]
    bos = bos_token_id(tokenizer)
    n_chunks = min(n_chunks, tokens.numel() // n_ctx)
    first = n_ctx // 2
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].clone()
        if bos is not None:
            chunk[0] = bos
        logits = model(input_ids=chunk[None].to(device), use_cache=False).logits[0, first:-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[first + 1:].to(device), reduction="sum"))
        count += n_ctx - first - 1
    return math.exp(nll / count)


def llama_perplexity(gguf: str | Path, text: str, n_ctx: int, n_chunks: int, threads: int = 2) -> float:
    """``llama-perplexity``'s final estimate on ``text`` (written to a temporary file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        done = subprocess.run([str(tool("llama-perplexity")), "-m", str(gguf), "-f", handle.name, "-c", str(n_ctx),
                               "--chunks", str(n_chunks), "-t", str(threads)], capture_output=True, text=True,
                              timeout=3600)
    found = _FINAL.search(done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    return float(found.group(1))
