"""Methods are plug-ins: the registry finds every method by its plan or stored name, a new method is one module
and one ``register`` line (it then runs, estimates, plans memory and stores through the one runner), and the
runner, exports and CLI never branch on a method's name."""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import engine.methods as methods
from engine.core.data import DataSpec
from engine.methods.base import Compressed, Method, RunCost
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan, StackPlan
from engine.runs.runner import default_save_folder, estimate_run_seconds, run, run_memory

ROOT = Path(__file__).resolve().parents[2]
CALIB = DataSpec("wiki-offline", "calibration", 32, 2)
EVAL = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))


@dataclass(frozen=True)
class ZeroPlan:
    """Zero one decoder layer's MLP output projection (a toy method: what a plug-in needs, nothing more)."""

    layer: int = 1

    def series(self) -> str:
        return "zero MLP out"

    def setting(self) -> str:
        return f"layer {self.layer}"

    def name(self) -> str:
        return f"zero-mlp-{self.layer}"


class ZeroMlp(Method):
    name = "zero-mlp"
    plan_type = ZeroPlan
    title = "zero-MLP"
    folder = "zeroed"

    def cost(self, plan: ZeroPlan) -> RunCost:
        return RunCost(passes=0.0, fixed_per_hidden=1.0)

    def memory_profile(self, plan: ZeroPlan) -> str:
        return "dropping"

    def compress(self, store, loaded, plan: ZeroPlan, prepared, calibration, progress=None) -> Compressed:
        model = copy.deepcopy(loaded.model)
        layer = loaded.architecture.decoder_layers(model)[plan.layer]
        linears = loaded.architecture.layer_linears(layer)
        down = linears[[k for k in linears if "down" in k][0]]
        with torch.no_grad():
            down.weight.zero_()
        params = sum(p.numel() for p in model.parameters())
        return Compressed(model, {"params": params, "bytes_16bit": 2 * params, "size_fraction": 1.0},
                          {"series": plan.series(), "layer": plan.layer})


@pytest.fixture
def registered_zero():
    method = methods.register(ZeroMlp())
    yield method
    del methods.METHODS[method.name]
    del methods._BY_PLAN[method.plan_type]


def test_every_plan_finds_its_method_and_every_stored_name_too():
    plans = [SlicingPlan(), QuantPlan(), DropPlan(), StackPlan(DropPlan(), QuantPlan())]
    found = [methods.method_for(plan) for plan in plans]
    assert [m.name for m in found] == ["slicing", "quantization", "dropping", "stacked"]
    assert all(methods.method_named(m.name) is m for m in found)
    assert methods.method_named("dense") is None
    with pytest.raises(ValueError, match="No method runs a EvalPlan"):
        methods.method_for(EVAL)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.METHODS["slicing"])


def test_a_new_method_is_one_class_and_one_register_line(store, tiny_loaded, registered_zero):
    plan = ZeroPlan(layer=1)
    assert estimate_run_seconds(tiny_loaded, plan, CALIB, EVAL, store) > 0
    assert run_memory(tiny_loaded, plan, CALIB, EVAL).method == "dropping"
    assert default_save_folder(tiny_loaded, plan).parent.name == "zeroed"
    outcome = run(store, tiny_loaded, plan, CALIB, EVAL)
    record = outcome.record
    assert record.method == "zero-mlp" and record.config["layer"] == 1
    assert record.metrics["dense_run"] and record.metrics["ppl"] != record.metrics["dense_ppl"]
    assert "kld_mean" in record.metrics and record.metrics["kld_mean"] > 0  # measured against dense, same windows
    with pytest.raises(ValueError, match="cannot be saved"):
        run(store, tiny_loaded, plan, CALIB, EVAL, save_to=store.path.parent / "x")
    from engine.runs.exports import export_formats

    assert all("nothing to export" in why for why in export_formats(record).values())


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


NAMED_ONCE = {"engine/core/architectures.py": "Feature", "engine/core/memory.py": "MemoryProfile"}
"""Where a method's name may appear as a string outside its plug-in: the one definition of an enum of
features a layout may lack and of memory profiles (both keyed by name, as stored in architecture cards)."""


def _outside_the_registry() -> list[str]:
    files = [*(ROOT / "engine").rglob("*.py"), *(ROOT / "pages").glob("*.py"), *(ROOT / "ui").glob("*.py"),
             ROOT / "app.py"]
    return sorted(str(f.relative_to(ROOT)) for f in files
                  if "engine/methods/" not in str(f.relative_to(ROOT)) and "__pycache__" not in str(f))


def _literals_outside_enums(path: Path, enum: str | None) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == enum for n in ast.walk(c)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped}


def test_no_module_outside_the_registry_names_a_method():
    """Engine, pages, UI and router ask engine.methods (``Slicing.name``, ``method_for(plan)``): a method's
    name as a string literal appears nowhere else but in the two enums of :data:`NAMED_ONCE`."""
    names = set(methods.METHODS) | {f"{m}-rtn" for m in methods.METHODS} | {f"{m}-gptq" for m in methods.METHODS}
    offenders = {module: sorted(_literals_outside_enums(ROOT / module, NAMED_ONCE.get(module)) & names)
                 for module in _outside_the_registry()}
    offenders = {module: named for module, named in offenders.items() if named}
    assert len(_outside_the_registry()) > 100 and not offenders, offenders


def test_each_method_says_where_its_models_run():
    from engine.quant.runtimes import RUNTIMES

    slicing, dropping = methods.METHODS["slicing"], methods.METHODS["dropping"]
    assert slicing.deployment(SlicingPlan(), RUNTIMES["research"]) is None
    assert "trust_remote_code" in slicing.deployment(SlicingPlan(), RUNTIMES["transformers"])
    assert "cannot run a sliced model" in slicing.deployment(SlicingPlan(), RUNTIMES["llama.cpp"])
    assert "as it is" in dropping.deployment(DropPlan(), RUNTIMES["vllm"])
    assert "vLLM (compressed-tensors) does not" in dropping.deployment(DropPlan("mlp"), RUNTIMES["vllm"])
    assert methods.METHODS["quantization"].deployment(QuantPlan(), RUNTIMES["vllm"]) is None  # narrows instead
