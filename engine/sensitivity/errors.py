"""Errors a user can cause in a sensitivity scan; every message says what to do instead."""

from __future__ import annotations


class SensitivityError(ValueError):
    """A sensitivity scan cannot run as asked."""


class ActionSpecError(SensitivityError):
    """An action is malformed or out of range (unknown kind, bit level, slicing fraction)."""


class UnsupportedActionError(SensitivityError):
    """The model's architecture cannot do this action."""


class SampleTooSmallError(SensitivityError):
    """Too few calibration windows for a meaningful bootstrap interval."""


class ScanCancelled(SensitivityError):
    """The scan was stopped before an action finished; nothing of that action was stored."""
