"""The cost of one Fisher diagnostic record (jobs.diagnostics) with the per-example gradients kept in memory
against recomputed on every pass: the smoke config's MLP on 512 Fashion-MNIST examples, the whole model, one process.
Alternates the two, twice, and prints each time (``python -m benchmarks.fisher_record``)."""

from __future__ import annotations

import time

import torch

import jobs.diagnostics as diagnostics
from jobs.config import load_config
from jobs.datasets import load_dataset
from jobs.models import build_model
from jobs.parallel import SingleContext


def main() -> None:
    torch.manual_seed(0)
    config = load_config("jobs/configs/smoke.toml", ["run.fisher_every=1", "run.fisher_examples=512"])
    data = load_dataset(config.data)
    model = build_model(config.model, data.input_shape, data.classes)
    diagnostics.FACTORS_BYTES = 0  # rows, as this benchmark compares (a Linear-only model now takes factors)
    budget = diagnostics.IN_MEMORY_BYTES
    for kept in (False, True, False, True):
        diagnostics.IN_MEMORY_BYTES = budget if kept else 0
        started = time.perf_counter()
        record, _ = diagnostics.fisher_record(model, data, config, SingleContext(), None)
        seconds = time.perf_counter() - started
        how = "kept in memory      " if kept else "recomputed each pass"
        print(f"{how}: {seconds:.3f} s, fisher_top {record['fisher_top']:.6g} ({record['fisher_method']})")


if __name__ == "__main__":
    main()
