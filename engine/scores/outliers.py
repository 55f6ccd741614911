"""Weight outliers (docs/methods.md §1): ZD fractions and |z| > k counts, from weights only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from engine.core.architectures import Architecture, Feature


@dataclass
class WeightOutliers:
    """ZD statistics of every layer's linear weights.

    ``zd[l][m]``: fraction of module m's weights with z > 1 (module's own mean
    and std); ``outliers[l][m]``: count with |z| > k.  ``zd_layer`` and
    ``outliers_layer`` pool all linear weights of a layer (pooled mean/std).
    """

    modules: list[str]
    zd: list[list[float]]
    outliers: list[list[int]]
    zd_layer: list[float]
    outliers_layer: list[int]
    k: float
    sizes: list[list[int]] | None = None  # weights per layer × module

    def fractions(self) -> list[list[float]]:
        """Fraction of each module's weights with |z| > k, ``[L][modules]``."""
        if self.sizes is None:
            raise ValueError("These outlier statistics carry no module sizes; recompute them.")
        return [[c / n for c, n in zip(counts, sizes)] for counts, sizes in zip(self.outliers, self.sizes)]

    def to_dict(self) -> dict:
        return asdict(self)


def _z_counts(weight: torch.Tensor, mean: float, std: float, k: float) -> tuple[int, int]:
    """(count z > 1, count |z| > k) of ``weight`` under the given mean and std."""
    z = (weight.float() - mean) / std
    return int((z > 1).sum()), int((z.abs() > k).sum())


@torch.no_grad()
def weight_outliers(model: torch.nn.Module, arch: Architecture, k: float = 3.0) -> WeightOutliers:
    """ZD fractions and |z| > k outlier counts per layer × module and per layer."""
    if arch.reason(Feature.QUANTIZATION) and not arch.linears:
        raise ValueError(f"ZD needs the layers' linear weights: {arch.reason(Feature.QUANTIZATION)}")
    zd, outliers, zd_layer, outliers_layer, sizes = [], [], [], [], []
    for layer in arch.decoder_layers(model):
        weights = [m.weight.detach() for m in arch.layer_linears(layer).values()]
        row_zd, row_out = [], []
        for w in weights:
            above, extreme = _z_counts(w, float(w.float().mean()), float(w.float().std()), k)
            row_zd.append(above / w.numel())
            row_out.append(extreme)
        count = sum(w.numel() for w in weights)
        total = sum(float(w.double().sum()) for w in weights)
        square = sum(float(w.double().pow(2).sum()) for w in weights)
        mean = total / count
        std = ((square - count * mean**2) / (count - 1)) ** 0.5
        pooled = [_z_counts(w, mean, std, k) for w in weights]
        sizes.append([w.numel() for w in weights])
        zd.append(row_zd)
        outliers.append(row_out)
        zd_layer.append(sum(p[0] for p in pooled) / count)
        outliers_layer.append(sum(p[1] for p in pooled))
    return WeightOutliers(arch.linear_names, zd, outliers, zd_layer, outliers_layer, k, sizes)
