"""Compression methods as plug-ins: one module per method, one line each in :data:`METHODS`.

A new method is a module with a :class:`~engine.methods.base.Method` subclass (its plan type in
:mod:`engine.runs.plans`) and a line here; the runner, the CLI's ``run``, the estimates, the memory plans,
the save folders and the exports find it through :func:`method_for` / :func:`method_named`.
"""

from __future__ import annotations

from engine.methods.base import Compressed, Method, RunCost
from engine.methods.dropping import Dropping
from engine.methods.quantization import Quantization
from engine.methods.slicing import Slicing
from engine.methods.stacking import Stacking

METHODS: dict[str, Method] = {method.name: method for method in (Slicing(), Quantization(), Dropping(), Stacking())}
"""Every method by the name its runs are stored under."""
_BY_PLAN: dict[type, Method] = {method.plan_type: method for method in METHODS.values()}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a plug-in outside this package; the built-in ones are listed above)."""
    if method.name in METHODS or method.name == "dense":
        raise ValueError(f"A method named '{method.name}' is already registered.")
    if method.plan_type in _BY_PLAN:
        raise ValueError(f"{_BY_PLAN[method.plan_type].name} already runs {method.plan_type.__name__} plans.")
    METHODS[method.name] = method
    _BY_PLAN[method.plan_type] = method
    return method


def method_for(plan) -> Method:
    """The method that runs ``plan`` (by its type)."""
    try:
        return _BY_PLAN[type(plan)]
    except KeyError:
        raise ValueError(f"No method runs a {type(plan).__name__}; plans: "
                         f"{', '.join(t.__name__ for t in _BY_PLAN)}.") from None


def method_named(name: str) -> Method | None:
    """The method stored runs call ``name`` (``None`` for ``dense`` and unknown names)."""
    return METHODS.get(name)


__all__ = ["METHODS", "Compressed", "Dropping", "Method", "Quantization", "RunCost", "Slicing", "Stacking",
           "method_for", "method_named", "register"]
