"""The run record: the one schema for what a run stores, written and read through this module.

A run is one evaluated model (dense or compressed).  The store keeps it as a
row with JSON columns; every reader gets a :class:`RunRecord` back.

- ``config``: how the model was made.  Always has ``series`` (the curve a run
  belongs to on trade-off charts, e.g. ``"dynamic SB=0.1"``); previews have
  ``preview: true``.
- ``data``: what it was evaluated on: the :class:`~engine.core.data.DataSpec`
  fields, ``n_windows`` actually used and ``label`` (which names an uploaded
  file by name *and* content hash, so runs on two files never share a label).
- ``metrics``: named keys only (see the ``*_KEY`` helpers below): ``ppl``,
  ``ci_low``, ``ci_high``, ``window_nll``, ``acc.<task>``..., size and time metrics; compressed runs add
  ``ppl_change`` against dense on the same windows with its paired 95% interval ``ppl_change_low`` /
  ``ppl_change_high`` (runs stored before per-window losses were kept have ``ci_overlaps_dense`` instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.core.data import describe_data
from engine.quant.runtimes import grid_label

PPL = "ppl"
CI_LOW, CI_HIGH = "ci_low", "ci_high"
WINDOW_NLL = "window_nll"  # summed NLL per evaluation window (nats): for paired comparisons on the same windows
CHANGE, CHANGE_LOW, CHANGE_HIGH = "ppl_change", "ppl_change_low", "ppl_change_high"  # vs dense, paired 95%
ACC_PREFIX = "acc."


def acc_key(task: str) -> str:
    """Metric key of a task's accuracy (a fraction in [0, 1])."""
    return f"{ACC_PREFIX}{task}"


def acc_stderr_key(task: str) -> str:
    return f"acc_stderr.{task}"


def acc_n_key(task: str) -> str:
    return f"acc_n.{task}"


def acc_metric_key(task: str) -> str:
    return f"acc_metric.{task}"


def accuracy_tasks(metrics: dict) -> list[str]:
    """Tasks with a stored accuracy in ``metrics`` (in key order)."""
    return [k.removeprefix(ACC_PREFIX) for k in metrics if k.startswith(ACC_PREFIX)]


def task_metrics(task: str, value: float, stderr: float | None, n: int, metric: str) -> dict:
    """The four metric entries of one zero-shot task."""
    return {acc_key(task): value, acc_stderr_key(task): stderr, acc_n_key(task): n, acc_metric_key(task): metric}


def data_label(data: dict) -> str:
    """The evaluation-data label of a stored ``data`` dict (its own ``label`` if it has one)."""
    if isinstance(data.get("label"), str):
        return data["label"]
    if not isinstance(data.get("source"), str):
        return "no perplexity data"
    return describe_data(data["source"], data.get("split", "?"), data.get("n_windows"), data.get("seqlen"),
                         data.get("path"), data.get("offset", 0))


@dataclass(frozen=True)
class RunRecord:
    """One stored run.  ``duration_s``: wall seconds of compression plus evaluation."""

    id: int
    created_at: str
    model: str
    model_fingerprint: str
    method: str
    config: dict
    data: dict
    metrics: dict
    duration_s: float
    versions: dict = field(default_factory=dict)

    @property
    def series(self) -> str:
        """The curve this run belongs to on trade-off charts.  A quantization run stored before series named a
        grid that is not its runtime's default gets that name here (``", symmetric"`` before ``" for <runtime>"``),
        so it never shares a curve with runs on another grid."""
        series = self.config.get("series")
        if not isinstance(series, str):
            return self.method
        grid = grid_label(self.config.get("quantizer"), self.config.get("zero_point"),  # quantization runs hold them
                          self.config.get("target_runtime"))
        if not grid or grid in series:
            return series
        label, runs_for, runtime = series.partition(" for ")
        return f"{label}{grid}{runs_for}{runtime}"

    @property
    def data_label(self) -> str:
        return data_label(self.data)

    @property
    def is_preview(self) -> bool:
        return bool(self.config.get("preview"))

    def to_row(self) -> dict:
        """A flat table row: fixed columns, then ``config.*``, ``data.*``, ``metrics.*`` (JSON text for lists)."""
        row = {
            "id": self.id, "when": self.created_at, "model": self.model, "fingerprint": self.model_fingerprint,
            "method": self.method, "series": self.series, "data_label": self.data_label,
            "preview": self.is_preview, "duration_s": round(self.duration_s, 2),
        }
        row.update({f"config.{k}": _cell(v) for k, v in self.config.items()})
        row.update({f"data.{k}": _cell(v) for k, v in self.data.items()})
        row.update({f"metrics.{k}": _cell(v) for k, v in self.metrics.items()})
        return row


def _cell(value):
    """Lists and dicts are shown as JSON text in table cells."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value
