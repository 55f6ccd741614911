"""Variants that share what they do not change: a module tree that reuses the base model's tensors.

A compressed variant that only removes or replaces modules (dropping) or
replaces some parameters with new ones needs no second copy of the weights it
keeps.  :func:`shell_copy` gives it its own module tree (so changing modules,
attributes or the config never touches the base) over the base's own
parameter and buffer tensors.  Rule for code that changes such a variant:
replace a parameter (``module.weight = nn.Parameter(new)``), never write into
one in place (``weight.copy_``, ``weight.data = ...``): the tensor is the base
model's, and another session may be using it.
"""

from __future__ import annotations

import copy
import itertools

from torch import nn


def shell_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer (no weight memory).

    Changing the copy's modules (e.g. replacing a layer's ``forward``) leaves
    the original untouched; the weights themselves are the same tensors.  Hooks
    are not copied (another session's scoring hooks may sit on the shared model).
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        for name, value in vars(module).items():
            if name.endswith("hooks") and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo=memo)
