"""Pure math of SliceGPT (docs/methods.md §3): norm fusion, PCA, rotations.

Conventions: an ``nn.Linear`` weight is ``[out_features, in_features]`` and
computes ``y = x Wᵀ + b``; hidden states are row vectors ``[..., D]``.  A
*basis* ``Q`` is a ``[D, d]`` matrix with orthonormal columns (the first ``d``
principal directions, ``d ≤ D``); changing a signal ``x`` (width ``D``) into
that basis is ``x Q`` (width ``d``).

- A linear that *reads* the residual stream gets ``W Q`` (its input side).
- A linear that *writes* the residual stream gets ``Qᵀ W`` and ``Qᵀ b``.

PCA (covariance and eigendecomposition) runs in fp64.  Rotations of weights
are computed in at least fp32 (:func:`compute_dtype`: fp32 for bf16 / fp16 /
fp32 weights, fp64 for fp64 ones) and cast back to the weight's dtype: the
final rounding to the weight dtype dominates any fp32 accumulation error, and
fp64 matmuls would double the cost of slicing on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.core.cpu import single_cpu_thread


class NormFusionError(ValueError):
    """A norm cannot be fused into the linears that read it; the message says why."""


class WeightlessRMSNorm(nn.Module):
    """RMSNorm without a scale, dividing by the *original* hidden size.

    ``y = x / sqrt(sum(x²) / mean_dim + eps)`` over the last axis, computed in
    fp32 and cast back to the input dtype.  After slicing, ``x`` keeps only
    ``d ≤ mean_dim`` rotated coordinates; dividing by the original ``D`` (not
    ``d``) keeps the norm equal to the dense model's RMS when the dropped
    coordinates carry no energy (SliceGPT's ``RMSN`` with ``mean_dim = D``).
    """

    def __init__(self, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(mean_square + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


# ---------------------------------------------------------------- weights


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for products with weights of ``dtype``: fp32, or fp64 for fp64 weights."""
    return torch.promote_types(dtype, torch.float32)


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` computed in ``compute_dtype(out_dtype)`` on ``a``'s device, cast to ``out_dtype``."""
    work = compute_dtype(out_dtype)
    return (a.to(work) @ b.to(a.device, work)).to(out_dtype)


def set_linear_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace ``linear``'s weight ``[out, in]`` (and bias ``[out]`` if given), updating its sizes."""
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = int(weight.shape[0]), int(weight.shape[1])


def rotate_linear_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """``W ← W Q``: the linear now reads signals expressed in ``basis`` ``[D, d]``."""
    weight = linear.weight.data
    set_linear_weight(linear, _matmul(weight, basis, weight.dtype))


def rotate_linear_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """``W ← Qᵀ W``, ``b ← Qᵀ b``: the linear now writes in ``basis`` ``[D, d]``."""
    weight = linear.weight.data
    q_t = basis.to(weight.device).T
    bias = None if linear.bias is None else _matmul(q_t, linear.bias.data, linear.bias.dtype)
    set_linear_weight(linear, _matmul(q_t, weight, weight.dtype), bias)


def rotate_embedding(embedding: nn.Embedding, basis: torch.Tensor) -> None:
    """``E ← E Q``: embedding rows ``[V, D]`` become ``[V, d]``."""
    weight = embedding.weight.data
    grad = embedding.weight.requires_grad
    embedding.weight = nn.Parameter(_matmul(weight, basis, weight.dtype).contiguous(), requires_grad=grad)
    embedding.embedding_dim = int(basis.shape[1])


# ---------------------------------------------------------------- norm fusion


def untie_head(model: nn.Module, architecture: Architecture) -> None:
    """Give the head its own copy of the weight if it shares the embedding's.

    Also sets ``config.tie_word_embeddings = False`` so transformers never
    re-ties them (the head and the embedding are rotated differently).
    """
    head = get_submodule(model, architecture.head)
    embedding = get_submodule(model, architecture.embedding)
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def _norm_scale(norm: nn.Module, kind: str) -> torch.Tensor | None:
    """The per-dimension scale ``[D]`` a norm applies: ``w`` (``rms``, ``layer``), ``1 + w`` (``rms_offset``)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    return weight.data.float() + 1.0 if kind == "rms_offset" else weight.data


def _fold_scale_into_readers(norm: nn.Module, readers: list[nn.Linear], kind: str = "rms") -> None:
    """``W ← W diag(g)`` (and ``b ← b + W β`` for a norm with bias ``β``) for every linear reading the norm.

    ``g`` is the norm's scale (:func:`_norm_scale`).  One product per entry:
    computed in fp32 (fp64 for fp64 weights), it is correctly rounded, so
    fp64 would give the same result at twice the cost.  A reader without a
    bias gets one when the norm has a bias.
    """
    scale_ = _norm_scale(norm, kind)
    shift = getattr(norm, "bias", None)
    for linear in readers:
        weight = linear.weight.data
        compute = compute_dtype(weight.dtype)
        bias = None
        if shift is not None:
            old = linear.bias.data.to(compute) if linear.bias is not None else torch.zeros(
                weight.shape[0], dtype=compute, device=weight.device)
            bias = (old + weight.to(compute) @ shift.data.to(weight.device, compute)).to(weight.dtype)
        scaled = weight if scale_ is None else (weight.to(compute) * scale_.to(weight.device, compute)).to(weight.dtype)
        set_linear_weight(linear, scaled, bias)


def _give_bias(linear: nn.Linear) -> None:
    """Add a (zero) bias ``[out]`` to a linear that has none (shape only; weights are loaded later)."""
    if linear.bias is None:
        weight = linear.weight
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)


def _centre_rows(weight: torch.Tensor) -> torch.Tensor:
    """Each row ``[.., D]`` minus its mean over ``D`` (computed in at least fp32)."""
    work = weight.to(compute_dtype(weight.dtype))
    return (work - work.mean(dim=-1, keepdim=True)).to(weight.dtype)


def _bake_mean(linear: nn.Linear) -> None:
    """Make a linear that writes the residual stream write mean-zero vectors: ``W ← C W``, ``b ← C b``.

    ``C = I - 11ᵀ/D`` removes the mean over the ``D`` outputs (docs/methods.md §3 "bake the mean").
    """
    weight = linear.weight.data
    work = weight.to(compute_dtype(weight.dtype))
    bias = None if linear.bias is None else _centre_rows(linear.bias.data)
    set_linear_weight(linear, (work - work.mean(dim=0, keepdim=True)).to(weight.dtype), bias)


def _replace_module(root: nn.Module, dotted_path: str, module: nn.Module) -> None:
    parent_path, _, name = dotted_path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def _weightless_like(norm: nn.Module, architecture: Architecture, hidden_size: int,
                     device: torch.device) -> WeightlessRMSNorm:
    eps = getattr(norm, architecture.norm_eps_attr)
    return WeightlessRMSNorm(hidden_size, eps).to(device)


def _norm_sites(model: nn.Module, architecture: Architecture) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
    """(root, norm path under root, linears reading it) for every norm in the model.

    A layer with parallel blocks (Phi-2) has one norm read by the attention
    and the MLP inputs.
    """
    sites = []
    for layer in architecture.decoder_layers(model):
        attn_readers = [get_submodule(layer, p) for p in architecture.attn_inputs]
        mlp_readers = [get_submodule(layer, p) for p in architecture.mlp_inputs]
        if architecture.parallel_blocks:
            sites.append((layer, architecture.attn_norm, attn_readers + mlp_readers))
        else:
            sites.append((layer, architecture.attn_norm, attn_readers))
            sites.append((layer, architecture.mlp_norm, mlp_readers))
    sites.append((model, architecture.final_norm, [get_submodule(model, architecture.head)]))
    return sites


def _residual_writers(model: nn.Module, architecture: Architecture) -> list[nn.Linear]:
    """Every linear that adds to the residual stream (attention and MLP outputs of every layer)."""
    return [get_submodule(layer, path) for layer in architecture.decoder_layers(model)
            for path in (architecture.attn_output, architecture.mlp_output)]


def _embeddings(model: nn.Module, architecture: Architecture) -> list[nn.Embedding]:
    return [get_submodule(model, p) for p in (architecture.embedding, *architecture.extra_embeddings)]


def _fuse_sites(model: nn.Module, architecture: Architecture, hidden_size: int, fold: bool) -> None:
    """Fold each norm into its readers (``fold``) and replace it by a weightless RMSNorm of width ``D``."""
    for root, path, readers in _norm_sites(model, architecture):
        norm = get_submodule(root, path)
        if fold:
            _fold_scale_into_readers(norm, readers, architecture.norm_kind)
        elif getattr(norm, "bias", None) is not None:
            for linear in readers:
                _give_bias(linear)
        _replace_module(root, path, _weightless_like(norm, architecture, hidden_size, readers[0].weight.device))


def _fuse_layer_norms(model: nn.Module, architecture: Architecture, hidden_size: int, fold: bool) -> None:
    """LayerNorm models (OPT, Phi-2): centre the stream, then fuse as RMSNorm.

    The embeddings' rows are centred and every residual writer bakes the
    mean out of its outputs, so the residual stream is mean-zero everywhere
    and ``LayerNorm(x) = x / rms(x) · g + β``: ``g`` and ``β`` fold into the
    readers, leaving a weightless RMSNorm over ``D`` (docs/methods.md §3 step 1).
    """
    if fold:
        for embedding in _embeddings(model, architecture):  # a new parameter: the base's is never written
            embedding.weight = nn.Parameter(_centre_rows(embedding.weight.data),
                                            requires_grad=embedding.weight.requires_grad)
        for linear in _residual_writers(model, architecture):
            _bake_mean(linear)
    _fuse_sites(model, architecture, hidden_size, fold)


# Norm kind -> fuser(model, architecture, hidden_size, fold).
NORM_FUSERS: dict[str, Callable[[nn.Module, Architecture, int, bool], None]] = {
    "rms": _fuse_sites,
    "rms_offset": _fuse_sites,  # Gemma: x / rms(x) · (1 + w), folded as the scale 1 + w
    "layer": _fuse_layer_norms,
}


def fuse_norms(model: nn.Module, architecture: Architecture, hidden_size: int, fold: bool = True) -> None:
    """Fold every norm's scale into its readers and replace it by a weightless norm.

    ``fold=False`` only swaps the modules (used when rebuilding a saved model,
    whose weights are loaded afterwards).  Mutates ``model`` in place.
    """
    try:
        fuser = NORM_FUSERS[architecture.norm_kind]
    except KeyError:
        raise NormFusionError(
            f"SliceGPT has no norm fusion for norm kind '{architecture.norm_kind}' "
            f"({architecture.model_type}); supported kinds: {', '.join(NORM_FUSERS)}."
        ) from None
    with torch.no_grad():
        fuser(model, architecture, hidden_size, fold)


# ---------------------------------------------------------------- PCA


class Covariance:
    """Running ``H = Σ xᵀx`` over unmasked tokens, in fp64 on ``device``.

    ``add(signal, mask)`` takes ``signal [batch, seq, D]`` (any float dtype)
    and an optional ``mask [batch, seq]`` (1 = real token, 0 = padding).
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, signal: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = signal.to(self.matrix.device, torch.float64).reshape(-1, signal.shape[-1])
        if mask is not None:
            x = x[mask.to(self.matrix.device).reshape(-1).bool()]
        self.matrix += x.T @ x
        self.tokens += int(x.shape[0])


def pca_basis(covariance: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``[D]`` (decreasing) and eigenvectors ``[D, D]`` (columns) of ``H``.

    ``H`` is damped by ``damping * mean(diag H)`` on its diagonal before the
    fp64 eigendecomposition, as SliceGPT does.
    """
    h = covariance.to(torch.float64).clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    with single_cpu_thread(h.device):
        values, vectors = torch.linalg.eigh(h)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``[dim, dim]`` in fp64 (CPU), drawn from ``generator``."""
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
