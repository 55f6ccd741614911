"""What can go wrong loading a model: every failure a user can cause is a :class:`ModelLoadError` (a
``ValueError``) whose message says what to do."""

from __future__ import annotations

from engine.core.architectures import UnsupportedArchitectureError


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to try."""


class NotCausalLMError(ModelLoadError):
    """The checkpoint is not a decoder-only causal language model."""


class UnsupportedModelError(ModelLoadError, UnsupportedArchitectureError):
    """The checkpoint's module tree has no layout LayerLab can use (no single decoder stack, no head, ...)."""
