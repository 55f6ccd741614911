"""Scans through the store: cached per action, nothing partial on cancel or error, bad input refused early."""

from __future__ import annotations

import json

import pytest

import engine.sensitivity.cached as cached
from engine.cli import main
from engine.core.data import DataSpec
from engine.runs.cached_scores import compute_scores
from engine.sensitivity.actions import parse_actions
from engine.sensitivity.cached import (
    cached_agreement,
    measure_sensitivity,
    scan_estimate,
    sensitivity_if_cached,
    sensitivity_summary,
)
from engine.sensitivity.errors import SampleTooSmallError, ScanCancelled, SensitivityError
from engine.sensitivity.findings import sensitivity_finding

SPEC = DataSpec(source="wiki-offline", split="calibration", seqlen=32, n_windows=4)


def _entries(store, kind: str) -> int:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(store.path)) as conn:
        return conn.execute("SELECT COUNT(*) FROM cache_entries WHERE kind = ?", (kind,)).fetchone()[0]


def test_each_action_is_cached_and_a_rerun_measures_only_what_is_new(loaded, store, monkeypatch):
    first = measure_sensitivity(store, loaded, SPEC, parse_actions("quant:3,drop"))
    assert first.cached == [False, False] and _entries(store, "sensitivity") == 2
    assert first.damages[0].data_label == "wiki-offline calibration, 4 windows × 32 tokens"
    scanned = []
    original = cached.scan_action
    monkeypatch.setattr(cached, "scan_action", lambda *a, **k: scanned.append(a[3].key) or original(*a, **k))
    estimate = scan_estimate(store, loaded, SPEC, parse_actions("quant:3,drop,drop-mlp"))
    assert list(estimate.per_action) == ["drop-mlp"] and estimate.cached == 2 and estimate.seconds > 0
    second = measure_sensitivity(store, loaded, SPEC, parse_actions("drop,quant:3,drop-mlp"))
    assert scanned == ["drop-mlp"] and second.cached == [True, True, False]
    assert second.damages[1].kl == first.damages[0].kl
    assert sensitivity_if_cached(store, loaded, SPEC, parse_actions("drop-mlp,drop")) is not None
    assert sensitivity_if_cached(store, loaded, SPEC, parse_actions("slice:0.25")) is None


def test_agreement_is_cached_and_the_summary_holds_matrix_table_and_finding(loaded, store):
    actions = parse_actions("quant:3,slice:0.25")
    matrix = measure_sensitivity(store, loaded, SPEC, actions)
    lr, zd, _ = compute_scores(store, loaded, SPEC)
    rows = cached_agreement(store, loaded, matrix, lr, zd)
    assert len(rows) == 7 * 2 and _entries(store, "sensitivity_agreement") == 1
    assert cached_agreement(store, loaded, matrix, lr, zd) == rows
    summary = sensitivity_summary(loaded, matrix, rows, sensitivity_finding(rows, actions))
    assert list(summary["actions"]) == ["rtn3-g128", "slice0.25"] and summary["layers"] == 4
    assert len(summary["actions"]["slice0.25"]["kl"]) == 4 and "ρ = " in summary["finding"]
    json.dumps(summary)


def test_cancel_mid_scan_stores_nothing_of_the_unfinished_action(loaded, store):
    polls = iter(range(1000))
    with pytest.raises(ScanCancelled, match="nothing of it was stored"):
        measure_sensitivity(store, loaded, SPEC, parse_actions("drop,drop-attn"),
                            should_stop=lambda: next(polls) > 6)  # drop: 4 layers × 1 batch, then 2 into drop-attn
    assert _entries(store, "sensitivity") == 1  # the finished action only
    assert sensitivity_if_cached(store, loaded, SPEC, parse_actions("drop")) is not None


def test_an_interrupting_progress_callback_stores_nothing(loaded, store):
    """The dashboard cancels by rerunning: Streamlit raises inside the progress callback."""
    class Rerun(Exception):
        pass

    def progress(stage, done, total):
        if stage.startswith("action"):
            raise Rerun

    with pytest.raises(Rerun):
        measure_sensitivity(store, loaded, SPEC, parse_actions("quant:3"), progress=progress)
    assert _entries(store, "sensitivity") == 0


@pytest.mark.parametrize("spec, actions, error, message", [
    (DataSpec(split="calibration", seqlen=32, n_windows=2), "drop", SampleTooSmallError, "at least 4"),
    (DataSpec(split="evaluation", seqlen=32, n_windows=4), "drop", SensitivityError, "calibration text only"),
    (SPEC, "slice:0.03", SensitivityError, "nothing is removed"),
])
def test_bad_input_is_refused_before_anything_runs(loaded, store, spec, actions, error, message):
    with pytest.raises(error, match=message):
        measure_sensitivity(store, loaded, spec, parse_actions(actions))
    assert _entries(store, "sensitivity") == 0


def test_cli_writes_the_matrix_and_the_agreement_table(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "sensitivity.json"
    argv = ["sensitivity", "--model", tiny_folder, "--store", str(tmp_path / "cli.sqlite"), "--data", "file",
            "--text-file", text_file, "--calib-windows", "4", "--calib-seqlen", "32",
            "--actions", "quant:3,slice:0.25,drop", "--json", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert list(written["actions"]) == ["rtn3-g128", "slice0.25", "drop"]
    assert len(written["actions"]["drop"]["kl"]) == written["layers"] == 4
    assert len(written["agreement"]) == 7 * 3 and written["finding"] == printed["finding"]
    assert printed["cached"] == {"rtn3-g128": False, "slice0.25": False, "drop": False}


def test_cli_refuses_a_bad_action_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", "--actions", "quant:12"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Bit level 12 is out of range" in err and "Traceback" not in err


def test_cli_too_few_windows_exit_2_with_one_error_line(tiny_folder, text_file, tmp_path, capsys):
    argv = ["sensitivity", "--model", tiny_folder, "--store", str(tmp_path / "s.sqlite"), "--data", "file",
            "--text-file", text_file, "--calib-windows", "3", "--calib-seqlen", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "at least 4" in err and "Traceback" not in err
