"""A model of one data-parallel K-FAC training step at scale: step time, bytes per step per rank and per-rank K-FAC
memory for each strategy at P = 8 to 4096, for ResNet-50 and BERT-Large layer sets (issue 22, item 4).

Run from the repository root::

    python -m benchmarks.scale_model                          # both layer sets, P = 8 .. 4096, kernels cached
    python -m benchmarks.scale_model --remeasure --threads 2  # measure the kernel table again
    python -m benchmarks.scale_model --device cuda            # kernel times of a GPU
    python -m benchmarks.scale_model --validate               # against benchmarks.distributed at P = 1, 2, 4

Three inputs, combined per step and rank:

1. **Kernel times measured on the local device** (``--device``): GEMM time against its flops, ``eigh`` and
   Cholesky + ``cholesky_inverse`` against the size ``n``, ``F.unfold`` (im2col) against its output elements, and a
   copy bandwidth for elementwise passes. A handful of sizes are timed and interpolated log-log (monotone); above
   the largest size GEMM and unfold scale linearly, the decompositions as ``n^3``. The table is cached as JSON
   under ``runs/`` (git-ignored); ``--remeasure`` times it again.
2. **An alpha-beta network** (``Network``): NCCL's ring and tree formulas, the cheaper of the two per call.
3. **The project's own plans and byte counters**: ``distkfac.assignment.assign_work`` says who decomposes and
   preconditions what; ``FactorExchange``, ``DecompositionExchange`` and ``GradientExchange`` are constructed with a
   stub communicator and their plans (buckets, owners, broadcast lists) give every collective of a rank; each
   collective's bytes are what ``CommStats.record_allreduce`` / ``record_one_way`` count. tests/test_distributed.py
   checks them against real torchrun runs at P = 2 and 4, tests/test_scale_model.py against a real preconditioner
   with a counting communicator: exactly, rank by rank and purpose by purpose.

The "before and after" stages of the issue, cumulative in this order: (0) today: whole factors, synchronous
decompositions, one reduce per owner and bucket; (3) one reduce-scatter per bucket; (1) asynchronous
decompositions (hidden while the busiest worker group's decompositions and their broadcasts fit in
``inv_update_steps`` steps of the rest of the step; the excess shows; the decompositions are one interval stale);
(2) dense factors larger than ``--split-above`` cut into diagonal blocks. docs/benchmarks.md ("K-FAC at scale: a
model") states every assumption and what the model leaves out.
"""

from benchmarks.scale_model.cli import main, parse_args
from benchmarks.scale_model.configs import (
    NO_TRAFFIC_SETTINGS,
    STRATEGY_CONFIGS,
    Config,
    Schedule,
    assignment_for,
    compute_dtype,
    stages,
)
from benchmarks.scale_model.constants import MIB, PEERS_DIR, ROOT, RUNS, WORLDS
from benchmarks.scale_model.kernels import (
    DECOMPOSITION_SIZES,
    GEMM_SHAPES,
    KERNEL_TABLES,
    UNFOLD_INPUTS,
    Kernels,
    kernels_for,
    measure_kernels,
)
from benchmarks.scale_model.layer_sets import (
    Layer,
    LayerSet,
    bert_large,
    layer_set_from_module,
    resnet50,
    resnet50_positions,
)
from benchmarks.scale_model.network import Network, infiniband_hdr
from benchmarks.scale_model.projection import (
    LayerTimes,
    Projection,
    exposed_factor_s,
    layer_times,
    precondition_s,
    project,
)
from benchmarks.scale_model.rank_traffic import (
    Call,
    PlanComm,
    Traffic,
    busiest_rank,
    bytes_per_step,
    decomposition_calls,
    memory_per_rank,
    run_stats,
    state_numel,
    traffic,
)
from benchmarks.scale_model.speedup import (
    busiest_rank_speedup,
    decomposition_work,
    kaisa_speedup,
    speedup_table,
    speedups,
)
from benchmarks.scale_model.tables import BREAKDOWN, Scenario, breakdown_table, step_table
from benchmarks.scale_model.validation import (
    SHARED_GEMM,
    loopback_worker,
    measure_loopback,
    measure_sharing,
    parse_benchmark,
    validate,
)

__all__ = [
    "BREAKDOWN",
    "DECOMPOSITION_SIZES",
    "GEMM_SHAPES",
    "KERNEL_TABLES",
    "MIB",
    "NO_TRAFFIC_SETTINGS",
    "PEERS_DIR",
    "ROOT",
    "RUNS",
    "SHARED_GEMM",
    "STRATEGY_CONFIGS",
    "UNFOLD_INPUTS",
    "WORLDS",
    "Call",
    "Config",
    "Kernels",
    "Layer",
    "LayerSet",
    "LayerTimes",
    "Network",
    "PlanComm",
    "Projection",
    "Scenario",
    "Schedule",
    "Traffic",
    "assignment_for",
    "bert_large",
    "breakdown_table",
    "busiest_rank",
    "busiest_rank_speedup",
    "bytes_per_step",
    "compute_dtype",
    "decomposition_calls",
    "decomposition_work",
    "exposed_factor_s",
    "infiniband_hdr",
    "kaisa_speedup",
    "kernels_for",
    "layer_set_from_module",
    "layer_times",
    "loopback_worker",
    "main",
    "measure_kernels",
    "measure_loopback",
    "measure_sharing",
    "memory_per_rank",
    "parse_args",
    "parse_benchmark",
    "precondition_s",
    "project",
    "resnet50",
    "resnet50_positions",
    "run_stats",
    "speedup_table",
    "speedups",
    "stages",
    "state_numel",
    "step_table",
    "traffic",
    "validate",
]
