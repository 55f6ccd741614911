"""Running out of memory part-way through a run: a message (engine, CLI, UI), nothing stored, the model intact.

The allocation failure is injected where a run evaluates its variant (after the
variant was built: the worst moment), as CUDA's ``torch.OutOfMemoryError`` and
as the CPU allocator's ``RuntimeError``.
"""

from __future__ import annotations

import pytest
import torch

from engine.core.data import DataSpec
from engine.core.out_of_memory import RunOutOfMemory, explain_out_of_memory, is_allocation_failure
from engine.runs.plans import EvalPlan, QuantPlan, SlicingPlan
from engine.runs.runner import run_quantization, run_slicing
from tests.apptest import click, open_app, use_small_data

CALIBRATION = DataSpec(split="calibration", seqlen=32, n_windows=2)
EVALUATION = EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)"
HOST_OOM = ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
            "8589934592 bytes. Error code 12 (Cannot allocate memory)")


def _error(text: str) -> BaseException:
    """A fresh allocation failure as torch raises it (an instance raised twice would keep its first traceback)."""
    return torch.OutOfMemoryError(text) if text.startswith("CUDA") else RuntimeError(text)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _fail_evaluation(monkeypatch, error: str, dense: bool = False) -> list:
    """Evaluating a variant (or with ``dense``, the loaded model itself) fails with ``error``; returns a list
    that receives a weak reference to each model that failed."""
    import weakref

    from engine.runs import runner

    evaluate_model, failed = runner.evaluate_model, []

    def evaluate(loaded, model, *args, **kwargs):
        if (model is loaded.model) == dense:
            failed.append(weakref.ref(model))
            raise _error(error)
        return evaluate_model(loaded, model, *args, **kwargs)
    monkeypatch.setattr(runner, "evaluate_model", evaluate)
    return failed


@pytest.mark.parametrize("error, device", [(CUDA_OOM, "the GPU"), (HOST_OOM, "the CPU")])
def test_a_run_that_runs_out_of_memory_says_so_and_loses_nothing(error, device, store, tiny_loaded, monkeypatch):
    from engine.runs.runner import ensure_dense

    ensure_dense(store, tiny_loaded, EVALUATION)
    before, weights = [r.id for r in store.runs()], _weights(tiny_loaded.model)
    failed = _fail_evaluation(monkeypatch, error)
    with pytest.raises(RunOutOfMemory) as raised:
        run_quantization(store, tiny_loaded, QuantPlan(low_bits=2, low_fraction=0.5), CALIBRATION, EVALUATION)
    assert len(failed) == 1 and failed[0]() is None  # the variant is gone by the time the message is raised
    message = str(raised.value)
    assert message.startswith(f"The quantization run ran out of memory on {device} part-way")
    assert "Nothing was stored and the loaded model is unchanged" in message and "fewer or shorter" in message
    assert raised.value.__cause__ is None and raised.value.__context__ is None  # the run's frames are released
    assert [r.id for r in store.runs()] == before
    assert all(torch.equal(weights[name], tensor) for name, tensor in tiny_loaded.model.state_dict().items())
    monkeypatch.undo()  # memory is back: the same run now works and is stored
    outcome = run_quantization(store, tiny_loaded, QuantPlan(low_bits=2, low_fraction=0.5), CALIBRATION, EVALUATION)
    assert [r.id for r in store.runs()] == [outcome.run_id, *before]


def test_other_errors_pass_through_unchanged():
    assert is_allocation_failure(_error(CUDA_OOM)) and is_allocation_failure(_error(HOST_OOM))
    assert is_allocation_failure(MemoryError())
    assert not is_allocation_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))

    @explain_out_of_memory("The test")
    def broken() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        broken()


def test_cli_prints_the_message_and_exits_2(tiny_folder, tmp_path, monkeypatch, capsys):
    from engine.cli import main
    from engine.runs.store import ResultsStore

    path = tmp_path / "runs.sqlite"
    _fail_evaluation(monkeypatch, CUDA_OOM)
    code = main(["slice", "--model", tiny_folder, "--target", "0.1", "--store", str(path),
                 "--calib-windows", "2", "--calib-seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "error: The slicing run ran out of memory on the GPU" in err and "Traceback" not in err
    assert not [r for r in ResultsStore(path).runs() if r.method == "slicing"]


def test_the_page_shows_the_message_and_keeps_the_model(tiny_app, monkeypatch):
    from engine.runs.store import ResultsStore

    at = open_app("slicing")
    next(s for s in at.sidebar.selectbox if s.label == "Device").set_value("cpu")  # the message names the device
    at.sidebar.button[0].click().run()
    at = use_small_data(at)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    def compressed() -> list[int]:  # the test session's store holds other tests' runs; dense may be stored
        return [r.id for r in ResultsStore().runs() if r.method != "dense"]

    before = compressed()
    _fail_evaluation(monkeypatch, HOST_OOM)
    click(at, "Run slicing")
    assert not at.exception
    assert any("The slicing run ran out of memory on the CPU" in e.value for e in at.error), [e.value for e in at.error]
    assert compressed() == before
    assert "tiny" in at.sidebar.text_input[0].value  # still loaded: the sidebar keeps the model


def test_slicing_through_the_engine_too(store, tiny_loaded, monkeypatch):
    """Slicing builds a new model (not a view of the base): the same guarantee holds."""
    weights = _weights(tiny_loaded.model)
    _fail_evaluation(monkeypatch, CUDA_OOM)
    with pytest.raises(RunOutOfMemory, match="The slicing run ran out of memory on the GPU"):
        run_slicing(store, tiny_loaded, SlicingPlan("constant", 0.1), CALIBRATION, EVALUATION)
    assert not store.runs(method="slicing")
    assert all(torch.equal(weights[name], tensor) for name, tensor in tiny_loaded.model.state_dict().items())


def test_a_failure_inside_a_nested_step_names_what_the_user_started(store, tiny_loaded, monkeypatch):
    """A run measures dense first when it is not stored yet (itself a guarded step): the message names the run,
    and the sweep that ran it stops there instead of failing point after point."""
    from engine.runs.sweeps import run_sweep

    _fail_evaluation(monkeypatch, HOST_OOM, dense=True)
    with pytest.raises(RunOutOfMemory, match="^The quantization run ran out of memory on the CPU"):
        run_quantization(store, tiny_loaded, QuantPlan(low_bits=2, low_fraction=0.5), CALIBRATION, EVALUATION)
    plans = [QuantPlan(low_bits=2, low_fraction=f) for f in (0.25, 0.5, 0.75)]
    result = run_sweep(plans, lambda p: run_quantization(store, tiny_loaded, p, CALIBRATION, EVALUATION))
    assert not result.outcomes and len(result.errors) == 1
    assert "The sweep stopped here (0 of 3 points run; 0 stored)" in result.errors[0][1]
    assert not store.runs()
