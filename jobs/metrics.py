"""What a run reports: metric records (JSONL, CSV, TensorBoard when installed) and a progress line.

One record per logged step (``kind = "step"``), per epoch (``"epoch"``: means over the epoch, all ranks), per
evaluation (``"eval"``), per Fisher diagnostic (``"fisher"``, ``run.fisher_every``), per saddle instrument reading
(``"dynamics"``, ``run.dynamics_every``) and, at the end of such a run, its ``"phases"``, in ``metrics.jsonl`` and
``metrics.csv`` of the run's folder, written by rank 0 only.
Columns that do not apply to a kind are empty in the CSV and absent from the JSON line.

When a run resumes from the checkpoint taken after step ``N``, records after step ``N`` (written before the
interruption, and about to be written again) are dropped first, so the files read like one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Final, TextIO

from jobs.files import atomic_write_text

__all__ = [
    "CSV_COLUMNS", "METRICS_CSV", "METRICS_JSONL", "MetricsTail", "MetricsWriter", "ProgressLine", "read_metrics",
]  # fmt: skip

METRICS_JSONL: Final = "metrics.jsonl"
METRICS_CSV: Final = "metrics.csv"
CSV_COLUMNS: Final = (
    "kind",
    "step",
    "epoch",
    "loss",
    "accuracy",
    "lr",
    "test_loss",
    "test_accuracy",
    "seconds",
    "examples_per_second",
    "noise_scale",  # B_simple, the gradient noise scale (run.noise_every; jobs/noise_scale.py)
    "noise_trace",  # its tr(Sigma) estimate
    "noise_grad_sq",  # its |G|^2 estimate
    "kl_scale",  # K-FAC: the KL clip's factor nu of the step (1 = not clipped; absent without a clip)
    "kl_clipped",  # K-FAC: nu < 1, the update's size was set by kfac.kl_clip and not by the learning rate
    "kfac_staleness",  # K-FAC: steps between the factors behind the step's decompositions and the step
    "damping",  # K-FAC with kfac.damping_adaptive: lambda after the step (docs/kfac.md, "Adaptive damping")
    "damping_rho",  # and on adaptation steps the reduction ratio rho of the step's update
    # "eval" records of K-FAC (eigen): how far its step is from gradient / damping (diagnostics.curvature_share)
    "curvature_share",  # over all weights: 0 = the damping sets every direction's step (SGD), towards 1 = curvature
    "curvature_led",  # the fraction of eigen-directions whose share is at least 1/2
    "curvature_energy",  # weighted by the gradient's expected energy in each direction, each layer by its weights
    "curvature_layers",  # {layer: {"share", "energy"}}
    # "fisher" records (run.fisher_every; jobs.diagnostics): the empirical Fisher's top eigenvalue, without the top
    # run.fisher_trim of |v1 . g_i| (eigenvector kept, and recomputed), the examples, and the gradient-norm outliers
    "fisher_top",
    "fisher_trimmed_fixed",
    "fisher_trimmed_recomputed",
    "fisher_examples",
    "fisher_method",
    "grad_norm_median",
    "grad_norm_mad",
    "outliers_above",
    "outliers_deviating",
    # "dynamics" records (run.dynamics_every; jobs.dynamics, docs/saddle.md): per Linear layer its singular values and
    # effective rank, those of the product of the weights for a linear network, and for W2 sigma(W1 x) the units'
    # alignment with the top direction of Lemma 1 (median and largest ratio) and that direction's s_1
    "singular_values",
    "ranks",
    "product_singular_values",
    "product_rank",
    "alignment_median",
    "alignment_max",
    "top_singular_value",
    "skipped",  # "step" records of plateau-skipping GD: the step set the units instead of a gradient step
    "phases",  # the "phases" record at the end: [{kind, start, stop}] of the dynamics records' losses
)


def _parse(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # an unfinished last line, from a killed run
            continue
    return records


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` (an unfinished last line, from a killed run, is skipped)."""
    path = Path(out_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    return _parse(path.read_text().splitlines())


class MetricsTail:
    """The records a running run appends to ``out_dir/metrics.jsonl``, each returned once, for a program that
    watches the run (hpo_worker's pruning). A line is read once it is complete. The writer replaces the file when it
    starts or resumes (a new inode): the tail then reads the new file from its beginning."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / METRICS_JSONL
        self._inode: int | None = None
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as stream:
                inode = os.fstat(stream.fileno()).st_ino
                if inode != self._inode:
                    self._inode, self._offset = inode, 0
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return _parse(complete.decode(errors="replace").splitlines())


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _csv_row(record: dict[str, Any]) -> list[Any]:
    return [_csv_cell(record.get(c)) for c in CSV_COLUMNS]


class MetricsWriter:
    """Appends records to the run's JSONL and CSV files (and TensorBoard); does nothing when not ``enabled``."""

    def __init__(
        self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self._jsonl: TextIO | None = None
        self._csv: TextIO | None = None
        self._tb: Any = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(out_dir) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        atomic_write_text(out_dir / METRICS_JSONL, "".join(json.dumps(r) + "\n" for r in kept))
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(r) for r in kept)
        atomic_write_text(out_dir / METRICS_CSV, table.getvalue())
        self._jsonl = (out_dir / METRICS_JSONL).open("a", buffering=1)
        self._csv = (out_dir / METRICS_CSV).open("a", buffering=1, newline="")
        self._csv_writer = csv.writer(self._csv)
        if tensorboard:
            self._tb = _tensorboard_writer(out_dir / "tensorboard", purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (``kind``, ``step`` and any of :data:`CSV_COLUMNS`)."""
        if not self.enabled:
            return
        unknown = set(record) - set(CSV_COLUMNS)
        if unknown:
            raise ValueError(f"metric record has unknown fields {sorted(unknown)}; known: {CSV_COLUMNS}")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({k: v for k, v in clean.items() if v is not None}) + "\n")
        self._csv_writer.writerow(_csv_row(clean))
        if self._tb is not None:
            for key in ("loss", "accuracy", "lr", "test_loss", "test_accuracy", "noise_scale"):
                if clean.get(key) is not None:
                    self._tb.add_scalar(f"{record['kind']}/{key}", clean[key], record["step"])

    def flush(self) -> None:
        """Everything written so far on disk, for :func:`read_metrics` (lines are flushed already; this is explicit)."""
        for stream in (self._jsonl, self._csv):
            if stream is not None:
                stream.flush()

    def close(self) -> None:
        for stream in (self._jsonl, self._csv):
            if stream is not None:
                stream.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl = self._csv = self._tb = None


def _tensorboard_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class ProgressLine:
    """A one-line progress display on stderr, redrawn with a carriage return (at most 10 times a second).

    Silent unless ``enabled`` and the stream is a terminal.
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total = total
        self.start = start
        self.enabled = enabled and self.stream.isatty()
        self._last = 0.0
        self._start = time.perf_counter()
        self._width = 0

    def update(self, step: int, text: str = "", *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1 and step < self.total:
            return
        self._last = now
        rate = (step - self.start) / max(now - self._start, 1e-9)
        line = f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) {rate:.1f} it/s {text}".rstrip()
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
