"""The K-FAC preconditioner: it orchestrates layer helpers, a compute method and a communicator.

Contract (tested against a dense float64 reference in ``tests/test_contract.py`` and ``tests/test_conventions.py``)
-------------------------------------------------------------------------------------------------------------------
For ``nn.Linear`` with weight ``W`` (out x in) and bias ``b``, and a mean-reduced loss ``L = (1/N) sum_i l_i`` over
the N examples of a batch:

- ``a_i = [x_i; 1]`` (the 1 only with a bias); ``g_i = dl_i/ds_i``, the per-example gradient at the layer's output,
  which is N times autograd's ``grad_output`` (``g_scale="example"``, the default). ``g_scale="batch"`` takes
  ``g_i = grad_output`` as it is (the gradient of the mean loss, as kfac-pytorch does), so G is N^2 times
  smaller and damping and lr become batch-size dependent. Inputs with extra leading dimensions give one row per
  position (whatever ``conv_factors`` says).
- ``A_b = (1/N) sum a_i a_i^T``, ``G_b = (1/N) sum g_i g_i^T``. The running factors follow
  ``F <- factor_decay * F + (1 - factor_decay) * F_b`` on factor-update steps; the first update sets ``F = F_b``.
  Several forward/backward passes between two ``step()`` calls (gradient accumulation) contribute the mean of their
  batch factors.
- ``grad = [dL/dW, dL/db]``, shape ``out x (in+1)``.
- ``damping_form`` (``s = sqrt(damping)``; None: ``"tikhonov"`` for eigen, ``"factored"`` for inverse):
  ``"tikhonov"``: ``V = (A (x) G + damping I)^-1 grad``, i.e. ``G V A + damping V = grad``, exactly (eigen only:
  it is no product of two factor inverses, so inverse + tikhonov is a ValueError).
  ``"factored"``: ``V = (G + s I)^-1 grad (A + s I)^-1``.
  ``"factored-pi"`` (Martens & Grosse 2015, 6.3): ``V = (G + s/pi I)^-1 grad (A + pi s I)^-1`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, and ``pi = 1`` when either trace is 0 (a dead layer).
- ``compute_method="eigen"``: ``V = Q_G [(Q_G^T grad Q_A) / D] Q_A^T``, ``D = d_G d_A^T + damping``,
  ``(d_G + s)(d_A + s)^T`` or ``(d_G + s/pi)(d_A + pi s)^T``; eigenvalues are clamped at 0 and pi's traces are
  their sums. Damping is read every step. ``compute_method="inverse"``: Cholesky inverses of the shifted factors,
  made (with that step's damping) at decomposition steps; for factored-pi each factor's shift needs the other
  factor's trace, shared between ranks in one small allreduce when they sit on different ranks.
- ``nn.Embedding`` (A diagonal, kept as a vector; padding positions add nothing), ``nn.LayerNorm`` and
  ``nn.BatchNorm*d`` (the unit-wise Fisher: one ``2 x 2`` block per unit, no A, the whole damping) and a Linear over
  a sequence with ``weight_sharing="expand"`` or ``"reduce"``: docs/kfac.md, "Layers" (tests/test_layers.py).
- ``nn.Conv2d`` (groups=1): the same over the T output positions of each example (im2col rows).
  ``conv_factors="mean"`` averages both over N*T: ``A_b = (1/NT) sum_{i,t} a_it a_it^T``,
  ``G_b = (1/NT) sum_{i,t} g_it g_it^T`` with ``g_it = N dL/ds_it``. ``"kfc"`` (Grosse & Martens 2016):
  ``A_b = (1/N) sum_{i,t} a_it a_it^T`` (T times "mean"'s), G as "mean". With "mean", a conv layer takes T times
  KFC's step at small damping and sees T times its effective damping.
- ``kl_clip``: ``nu = min(1, sqrt(kl_clip / (lr^2 * sum over layers of <V, grad>)))``; gradients become ``nu V``.
  ``kl_clip=None`` leaves ``V``. ``precond.kl_scale`` reports the last step's nu. While the clip is active the
  update ``lr * nu * V = sqrt(kl_clip / <V, grad>) * V`` does not depend on lr.
- ``fisher="mc"``: G comes from a backward pass with labels sampled from the model's own predictive distribution
  (``mc_backward(logits)``), on factor-update steps only; ``"empirical"`` uses the training loss's backward.
- Step counting: ``step()`` number ``k`` (from 0) updates the factors when ``k % factor_update_steps == 0`` and the
  decompositions when ``k % inv_update_steps == 0``; every step preconditions. Hyperparameters given as callables
  are evaluated with ``k``.
- Decompositions run in ``inv_dtype`` (default float32, float64 for float64 models). Factors are computed and stored
  in ``factor_dtype`` (default: the layer's dtype); bf16/fp16 make the factor products several times faster where the
  hardware has bf16/fp16 matrix units, at those types' precision; the running average is formed in float32. Pair
  low-precision factors with ``eigen`` (it clamps the small negative eigenvalues rounding creates) or more damping.
- Before each decomposition every factor is checked (one host synchronisation for all layers): a NaN or Inf raises
  ``FloatingPointError`` naming the layers. An ``eigh`` that fails in float32 is retried in float64; if that fails
  too, ``DecompositionError`` names the layers.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from distkfac.assignment import Strategy, WorkAssignment, assign_work, grad_workers_for
from distkfac.background import Background, InFlight
from distkfac.comm import Communicator, Pending, average_gradients, resolve_communicator
from distkfac.damping import LevenbergMarquardt
from distkfac.exchange import DecompositionExchange, FactorExchange, GradientExchange, Shipment
from distkfac.factors import FACTOR_KINDS, FactorBlock, FactorKey, FactorKind, FactorShape, Structure, of_kind
from distkfac.layers import ConvFactors, GScale, LayerHelper, WeightSharing, helper_for
from distkfac.methods import METHODS, ComputeMethod, DampingForm, DecompositionError, pi_correction
from distkfac.settings import (
    FACTOR_REDUCTIONS,
    FISHER_TYPES,
    Hyperparameter,
    KFACSettings,
    check_decay,
    hyperparameter_at,
)

__all__ = ["FACTOR_REDUCTIONS", "FISHER_TYPES", "KFACPreconditioner"]

# A decomposition started in the background: the layers it covers, and its finiteness verdict (still to be given).
_Started = tuple[set[int], Callable[[], None]]
_Shipping = tuple[InFlight[_Started], dict[FactorBlock, list[torch.Tensor]], Shipment]  # job, results, broadcasts
BlocksBySize = dict[tuple[Any, ...], list[FactorBlock]]  # (FactorShape, device, dtype) -> blocks decomposed together
Shifts = dict[Any, torch.Tensor]  # per stack of BlocksBySize: each block's diagonal shift (inverse method)


@dataclass(eq=False)
class _Layer:
    """One preconditioned layer: its helper, running factors and what the current step has captured."""

    name: str
    helper: LayerHelper
    index: int = 0  # position in the model's list of preconditioned layers (the same on every rank)
    group: int = -1  # index of its _Group in the preconditioner; -1 where another rank preconditions it
    slot: int = 0  # its position in that group's stacks
    a_factor: torch.Tensor | None = None
    g_factor: torch.Tensor | None = None
    a_batch: torch.Tensor | None = None
    g_batch: torch.Tensor | None = None
    a_passes: int = 0
    g_passes: int = 0
    has_factors: bool = False  # its factors have been updated at least once (known on every rank)
    decomposed: bool = False

    def factor(self, kind: FactorKind) -> torch.Tensor | None:
        return self.a_factor if kind is FactorKind.A else self.g_factor

    def set_factor(self, kind: FactorKind, value: torch.Tensor) -> None:
        if kind is FactorKind.A:
            self.a_factor = value
        else:
            self.g_factor = value


@dataclass(eq=False)
class _Group:
    """Layers of one gradient shape and device: their gradients and decompositions are stacked, one batch."""

    layers: list[_Layer]
    grads: torch.Tensor
    a_state: list[torch.Tensor]
    g_state: list[torch.Tensor]
    structures: tuple[Structure, Structure]  # A's and G's

    def state(self, kind: FactorKind) -> list[torch.Tensor]:
        """The stacked decompositions of the layers' ``kind`` factors (one tensor per part, e.g. Q and d)."""
        return self.a_state if kind is FactorKind.A else self.g_state


class KFACPreconditioner:
    """Turns each supported layer's gradient into its K-FAC natural-gradient direction, in place.

    Use it between ``loss.backward()`` and ``optimizer.step()``::

        precond = KFACPreconditioner(model, lr=0.1)
        loss.backward(); precond.step(); optimizer.step()

    ``damping_form``, ``conv_factors`` and ``g_scale`` select the K-FAC conventions (module docstring; docs/kfac.md,
    "Conventions"); their defaults keep the historical behaviour. ``kl_scale`` reports the last step's KL clip.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Hyperparameter = 1e-3,
        factor_decay: Hyperparameter = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        kl_clip: Hyperparameter | None = 1e-3,
        lr: Hyperparameter = 0.1,
        compute_method: Literal["eigen", "inverse"] = "eigen",
        damping_form: DampingForm | None = None,
        conv_factors: ConvFactors = "mean",
        g_scale: GScale = "example",
        weight_sharing: WeightSharing = "expand",
        fisher: Literal["empirical", "mc"] = "empirical",
        skip_layers: Iterable[str | type[nn.Module]] = (),
        factor_dtype: torch.dtype | None = None,
        inv_dtype: torch.dtype | None = None,
        strategy: Strategy = "comm-opt",
        grad_worker_fraction: float | None = None,
        comm: Communicator | Literal["single", "torch", "horovod", "mpi"] | None = None,
        comm_dtype: torch.dtype | None = None,
        bucket_cap_mb: float = 8.0,
        overlap_comm: bool = True,
        allreduce_grads: bool | None = None,
        factor_reduction: Literal["owner", "allreduce"] = "owner",
        pack_factors: bool = True,
        split_factors_above: int | None = None,
        async_decompositions: bool = False,
    ) -> None:
        # Every keyword argument, by name: KFACSettings has one field for each (tests/test_errors.py checks).
        settings = KFACSettings.checked(**{k: v for k, v in locals().items() if k not in ("self", "model")})
        self._adopt(settings)
        self.comm: Communicator = resolve_communicator(comm)
        self._method: ComputeMethod = METHODS[compute_method](self.damping_form)
        self._steps = 0
        self._kl_scale: torch.Tensor | None = None  # the last step's nu, kept on the device (no host sync in step)
        self._sampling = False
        self._paused = False
        self._background = Background()
        self._in_flight: InFlight[_Started] | None = None  # asynchronous mode: the decompositions being computed
        self._shipping: _Shipping | None = None  # and, from a decomposition step's first forward, being sent
        self._decomposed_at: int | None = None  # the step whose factors made the decompositions in use
        self._staleness: int | None = None

        self._layers = self._find_layers(model, settings.skip_layers, conv_factors, g_scale, weight_sharing)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.overlap_comm = overlap_comm and self.comm.world_size > 1
        self.allreduce_grads = (
            not isinstance(model, nn.parallel.DistributedDataParallel) if allreduce_grads is None else allreduce_grads
        )
        shapes = [(layer.helper.a_shape, layer.helper.g_shape) for layer in self._layers]
        self.assignment = self._assign(settings, shapes)
        self._make_exchanges(settings, shapes)
        self._groups = self._make_groups()
        self._hooks: list[RemovableHandle] = [
            layer.helper.module.register_forward_hook(self._make_forward_hook(layer)) for layer in self._layers
        ]

    # ------------------------------------------------------------------ set-up

    def _adopt(self, settings: KFACSettings) -> None:
        """The settings as public attributes; ``step()`` reads the hyperparameters from them each time."""
        self.damping_form = settings.damping_form
        self.conv_factors = settings.conv_factors
        self.g_scale = settings.g_scale
        self.weight_sharing = settings.weight_sharing
        self.damping = settings.damping
        self.factor_decay = settings.factor_decay
        self.kl_clip = settings.kl_clip
        self.lr = settings.lr
        self.factor_update_steps = settings.factor_update_steps
        self.inv_update_steps = settings.inv_update_steps
        self.compute_method = settings.compute_method
        self.fisher = settings.fisher
        self.factor_dtype = settings.factor_dtype
        self.inv_dtype = settings.inv_dtype
        self.strategy = settings.strategy
        self.split_factors_above = settings.split_factors_above
        self.async_decompositions = settings.async_decompositions

    def _assign(self, settings: KFACSettings, dims: list[tuple[FactorShape, FactorShape]]) -> WorkAssignment:
        """Who decomposes and preconditions what; in a distributed run, checked against the other ranks."""
        grad_workers = grad_workers_for(settings.strategy, settings.grad_worker_fraction, self.comm.world_size)
        assignment = assign_work(dims, self.comm.world_size, grad_workers, settings.split_factors_above)
        if self.comm.world_size > 1:
            self._check_same_everywhere(
                settings.strategy,
                grad_workers,
                settings.factor_reduction,
                settings.pack_factors,
                settings.comm_dtype,
                settings.bucket_cap_mb,
                self.overlap_comm,
                self.allreduce_grads,
                settings.split_factors_above,
                settings.async_decompositions,
            )
            self.comm.prepare_groups([*assignment.worker_groups, *assignment.receiver_groups])
        return assignment

    def _make_exchanges(self, settings: KFACSettings, dims: list[tuple[FactorShape, FactorShape]]) -> None:
        self._factor_exchange = FactorExchange(
            self.comm,
            self.assignment,
            dims,
            comm_dtype=settings.comm_dtype,
            bucket_bytes=settings.bucket_bytes,
            reduction=settings.factor_reduction,
            pack=settings.pack_factors,
        )
        self._decomposition_exchange = DecompositionExchange(
            self.comm, self.assignment, dims, self._method.state_shapes
        )
        self._gradient_exchange = GradientExchange(self.comm, self.assignment, dims)

    @staticmethod
    def _find_layers(
        model: nn.Module,
        skip: tuple[str | type[nn.Module], ...],
        conv_factors: ConvFactors,
        g_scale: GScale,
        weight_sharing: WeightSharing,
    ) -> list[_Layer]:
        named = dict(model.named_modules())
        class_names = {type(m).__name__ for m in named.values()}
        for entry in skip:
            if isinstance(entry, str) and entry not in named and entry not in class_names:
                raise ValueError(
                    f"distkfac: skip_layers entry {entry!r} names no module or module type of the model; "
                    f"module names are e.g. {list(named)[1:6]}"
                )
            if not isinstance(entry, str | type):
                raise TypeError(f"distkfac: skip_layers takes module names or types, got {entry!r}")

        def skipped(name: str, module: nn.Module) -> bool:
            for entry in skip:
                if isinstance(entry, str) and entry in (name, type(module).__name__):
                    return True
                if isinstance(entry, type) and isinstance(module, entry):
                    return True
            return False

        layers: list[_Layer] = []
        for name, module in named.items():
            if skipped(name, module):
                continue
            try:
                helper = helper_for(module, conv_factors=conv_factors, g_scale=g_scale, weight_sharing=weight_sharing)
            except ValueError as error:
                raise ValueError(f"distkfac: layer {name!r}: {error}") from None
            if helper is not None and helper.weight.requires_grad:
                layers.append(_Layer(name=name, helper=helper, index=len(layers)))
        if not layers:
            raise ValueError(
                "distkfac: the model has no layer K-FAC can precondition (nn.Linear, nn.Conv2d with groups=1, "
                "nn.Embedding, or LayerNorm/BatchNorm with weight and bias, with trainable weights and not in "
                "skip_layers); use a plain optimizer for this model"
            )
        return layers

    def _check_same_everywhere(self, *settings: object) -> None:
        """Every rank must build the same layers and settings; a mismatch would pair up the wrong buffers."""
        layers = [(layer.name, *layer.helper.a_shape, *layer.helper.g_shape) for layer in self._layers]
        devices = {(layer.helper.weight.device, self._compute_dtype(layer.helper)) for layer in self._layers}
        conventions = (self.damping_form, self.conv_factors, self.g_scale, self.weight_sharing)
        steps = (self.factor_update_steps, self.inv_update_steps)
        description = repr((layers, self.compute_method, conventions, steps, self.fisher, settings))
        digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "little", signed=True)
        # Gathered before anything is raised, so that every rank raises rather than one raising and the rest waiting.
        everyone = self.comm.allgather_ints([digest, len(layers), len(devices)])
        mixed = [rank for rank, (_, _, kinds) in enumerate(everyone) if kinds > 1]
        if mixed:
            raise ValueError(
                f"distkfac: distributed K-FAC needs every preconditioned layer on one device and dtype per rank; "
                f"ranks {mixed} have several (this rank: {sorted(map(str, devices))}). Move the model with "
                "model.to(device, dtype)"
            )
        different = [rank for rank, (other, _, _) in enumerate(everyone) if other != everyone[0][0]]
        if different:
            summary = ", ".join(f"{name} ({g}x{a})" for name, _, a, _, g in layers[:8])
            summary += ", ..." if len(layers) > 8 else ""
            raise ValueError(
                f"distkfac: the ranks disagree on the model or the K-FAC settings: ranks {different} differ from "
                f"rank 0 (layer counts by rank: {[count for _, count, _ in everyone]}). This rank "
                f"(rank {self.comm.rank}) has {len(layers)} layers: {summary}. Build the same model with the same "
                "KFACPreconditioner settings on every rank"
            )

    def _compute_dtype(self, helper: LayerHelper) -> torch.dtype:
        if self.inv_dtype is not None:
            return self.inv_dtype
        return torch.float64 if helper.weight.dtype == torch.float64 else torch.float32

    def _make_groups(self) -> list[_Group]:
        """Stacks for the layers this rank preconditions (and keeps the decompositions of): its worker groups'."""
        rank = self.comm.rank
        layers = [layer for layer in self._layers if rank in self.assignment.layers[layer.index].grad_workers]
        by_shape: dict[tuple[Any, ...], list[_Layer]] = defaultdict(list)
        for layer in layers:
            h = layer.helper
            by_shape[(h.a_shape, h.g_shape, h.weight.device, self._compute_dtype(h))].append(layer)
        groups = []
        for index, ((a_shape, g_shape, device, dtype), members) in enumerate(by_shape.items()):
            for slot, layer in enumerate(members):
                layer.group, layer.slot = index, slot
            k = len(members)
            a_state, g_state = (
                [torch.zeros((k, *s), dtype=dtype, device=device) for s in self._method.state_shapes(shape)]
                for shape in (a_shape, g_shape)
            )
            groups.append(
                _Group(
                    layers=members,
                    grads=torch.zeros(k, g_shape.dim, a_shape.dim, dtype=dtype, device=device),
                    a_state=a_state,
                    g_state=g_state,
                    structures=(a_shape.structure, g_shape.structure),
                )
            )
        return groups

    # ------------------------------------------------------------------ capture

    def _is_factor_step(self) -> bool:
        return self._steps % self.factor_update_steps == 0

    def _make_forward_hook(self, layer: _Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if self._paused or not (module.training and torch.is_grad_enabled()):
                return
            if self._in_flight is not None and self._shipping is None and self._steps % self.inv_update_steps == 0:
                self._shipping = self._ship()  # a decomposition step: send the finished ones during this pass
            if not self._is_factor_step():
                return
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise TypeError(f"distkfac: layer {layer.name!r} must be called with its input tensor positionally")
            x = inputs[0].detach()
            a_batch = layer.helper.a_factor(x, self.factor_dtype)
            if a_batch is not None:
                layer.a_batch = a_batch if layer.a_batch is None else layer.a_batch.add_(a_batch)
            layer.a_passes += 1
            if isinstance(output, torch.Tensor) and output.requires_grad:
                # A tensor hook registered before any in-place op on the output (ReLU(inplace=True)) receives the
                # gradient at the layer's own output, which is what G needs.
                batch_size, kept = x.shape[0], x if layer.helper.needs_input else None
                output.register_hook(lambda grad: self._capture_g(layer, grad, batch_size, kept))

        return hook

    def _capture_g(self, layer: _Layer, grad_output: torch.Tensor, batch_size: int, x: torch.Tensor | None) -> None:
        if self.fisher == "mc" and not self._sampling:
            return  # the training loss's backward: with fisher="mc", G comes from mc_backward() only
        g_batch = layer.helper.g_factor(grad_output.detach(), batch_size, x, self.factor_dtype)
        layer.g_batch = g_batch if layer.g_batch is None else layer.g_batch.add_(g_batch)
        layer.g_passes += 1
        if self.overlap_comm and layer.g_passes == layer.a_passes:
            # Every call of the layer in this pass has its G: start reducing while backward goes on.
            self._hand_off(layer, launch=True)

    def mc_backward(self, logits: torch.Tensor, likelihood: Literal["categorical", "gaussian"] = "categorical") -> None:
        """For ``fisher="mc"``: capture G from a backward pass with targets sampled from the model's prediction.

        Call it after the forward pass and before ``loss.backward()``; it keeps the graph and leaves ``.grad``
        untouched. ``categorical`` samples labels from ``softmax(logits)`` (cross-entropy models); ``gaussian``
        samples ``y ~ N(logits, I)`` (squared-error models). On steps that update no factors it does nothing.
        Sampling uses torch's global random generator.
        """
        if self.fisher != "mc":
            raise RuntimeError("distkfac: mc_backward() is for fisher='mc'; this preconditioner uses the empirical one")
        if not self._is_factor_step():
            return
        if not any(layer.a_passes for layer in self._layers):
            raise RuntimeError(
                "distkfac: mc_backward() found no forward pass to sample from: run the model in training mode, "
                "with gradients enabled, before calling it"
            )
        if likelihood == "categorical":
            flat = logits.reshape(-1, logits.shape[-1])
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(flat.detach().float(), dim=-1), 1).view(-1)
            sample_loss = F.cross_entropy(flat, sampled)
        elif likelihood == "gaussian":
            with torch.no_grad():
                target = logits.detach() + torch.randn_like(logits)
            sample_loss = 0.5 * (logits - target).pow(2).sum(-1).mean()
        else:
            raise ValueError(f"distkfac: likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
        # Asking for the weights' gradients walks the whole graph, so every layer's output hook fires; the
        # returned gradients are dropped and .grad stays untouched.
        self._sampling = True
        try:
            torch.autograd.grad(
                sample_loss, [layer.helper.weight for layer in self._layers], retain_graph=True, allow_unused=True
            )
        finally:
            self._sampling = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forward (and so backward) passes inside the block capture no factors.

        For extra passes between training steps that must not count as K-FAC statistics, e.g. measuring the
        gradient noise scale or a look at the training loss: without it, their activations and output gradients
        would be averaged into the next ``step()``'s factors. Nesting is allowed.
        """
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

    # ------------------------------------------------------------------ the step

    @property
    def steps(self) -> int:
        """How many times ``step()`` has run."""
        return self._steps

    @property
    def kl_scale(self) -> float | None:
        """The KL clip's factor ``nu`` of the last ``step()``: 1.0 = not clipped, < 1 = clipped.

        None with ``kl_clip=None``, and before this object's first step. ``nu = min(1, sqrt(kl_clip / (lr^2
        <V, grad>)))``, so a clipped update is ``lr * nu * V = sqrt(kl_clip / <V, grad>) * V``: while the clip is
        active the learning rate has no effect on the step. Reading it synchronises with the device (``.item()``);
        ``step()`` itself does not.
        """
        if self.kl_clip is None or self._kl_scale is None:
            return None
        return float(self._kl_scale.item())

    @property
    def decomposition_staleness(self) -> int | None:
        """How many steps old the factors behind the last step's decompositions were.

        Synchronous: ``0 .. inv_update_steps - 1``. Asynchronous: one interval more, ``inv_update_steps ..
        2 inv_update_steps - 1`` (0 until the second decomposition step). None before the first step.
        """
        return self._staleness

    def step(self) -> None:
        """Precondition the gradients of every supported layer in place (after backward, before the optimizer).

        In a distributed run every rank must call it at the same point: it runs collectives.
        """
        step = self._steps
        if not any(layer.helper.has_grad() for layer in self._layers):
            raise RuntimeError(
                "distkfac: step() found no gradients: call loss.backward() before precond.step() "
                "(and precond.step() before optimizer.step())"
            )
        if self.allreduce_grads and self.comm.world_size > 1:
            self._average_gradients()
        if self._is_factor_step():
            self._update_factors(step)
        if step % self.inv_update_steps == 0 or not any(layer.decomposed for layer in self._layers):
            self._update_decompositions(step)
        self._precondition(step)
        self._staleness = None if self._decomposed_at is None else step - self._decomposed_at
        self._steps += 1

    def _average_gradients(self) -> None:
        """For a model without DDP: average every parameter's gradient over the ranks, one buffer per dtype."""
        average_gradients(self._params, self.comm)

    def _hand_off(self, layer: _Layer, launch: bool) -> None:
        """Give the exchange this pass's batch factors of ``layer`` (the mean over its calls in the pass)."""
        assert layer.g_batch is not None and (layer.a_batch is not None or not layer.helper.a_shape.present)
        if layer.a_passes > 1 and layer.a_batch is not None:
            layer.a_batch.div_(layer.a_passes)
        if layer.g_passes > 1:
            layer.g_batch.div_(layer.g_passes)
        self._factor_exchange.hand_off(layer.index, layer.a_batch, layer.g_batch, launch=launch)
        layer.a_batch = layer.g_batch = None
        layer.a_passes = layer.g_passes = 0

    def _update_factors(self, step: int) -> None:
        for layer in self._layers:
            if layer.g_batch is not None and (layer.a_batch is not None or not layer.helper.a_shape.present):
                self._hand_off(layer, launch=False)
        handed = self._factor_exchange.handed_off
        if not handed:
            if self.fisher == "mc" and any(layer.a_passes for layer in self._layers):
                raise RuntimeError(
                    "distkfac: fisher='mc' needs precond.mc_backward(logits) after the forward pass and before "
                    f"loss.backward() on factor-update steps (step {step})"
                )
            raise RuntimeError(
                "distkfac: step() found no factor statistics: run the forward and backward pass in training mode "
                "(model.train(), gradients enabled) through the model given to KFACPreconditioner before step()"
            )
        batches = self._factor_exchange.finish()  # this rank's factors, averaged over ranks and passes
        self._average_into_factors(batches, hyperparameter_at(self.factor_decay, "factor_decay", step, check_decay))
        for layer in self._layers:
            layer.has_factors = layer.has_factors or layer.index in handed
            layer.a_batch = layer.g_batch = None
            layer.a_passes = layer.g_passes = 0

    def _average_into_factors(self, batches: Mapping[FactorKey, torch.Tensor], decay: float) -> None:
        """``F <- decay F + (1 - decay) F_b`` for each factor with a new batch ``F_b``; the first batch sets ``F``."""
        running: list[torch.Tensor] = []
        updates: list[torch.Tensor] = []
        for (index, kind), new in batches.items():
            layer = self._layers[index]
            factor = layer.factor(kind)
            if factor is None:
                layer.set_factor(kind, new.to(self.factor_dtype or layer.helper.weight.dtype))
            elif factor.dtype in (torch.float32, torch.float64) and factor.dtype == new.dtype:
                running.append(factor)
                updates.append(new)
            else:
                # bf16/fp16 storage: averaging in that precision compounds rounding step after step until the
                # factor is indefinite; average in float32 and round only what is stored. Also the path for a batch
                # in another dtype than its factor (a float32 layer fed bf16 under autocast).
                factor.copy_(factor.float().lerp_(new.float(), 1.0 - decay))
        if running:
            # One multi-tensor kernel for every factor: F <- F + (1 - decay) (F_b - F).
            torch._foreach_lerp_(running, updates, 1.0 - decay)

    def _update_decompositions(self, step: int) -> None:
        """Decompose this rank's factors (or blocks), share the results and store them where they precondition.

        Asynchronously (after the first decomposition): the factors as they are now are decomposed in the background,
        and the decompositions started at the previous decomposition step are installed instead, their broadcasts
        launched by this step's first forward pass (``_ship``) so that they travel during forward and backward.
        """
        background = self.async_decompositions and self._decomposed_at is not None
        ready, by_size, stacks, shifts, verdict = self._prepare_decompositions(step, defer_check=background)
        if not background:
            mine = self._decompose(step, by_size, stacks, shifts)
            self._install(step, ready, mine, self._share(mine, ready).finish())
            return
        shipping = self._shipping or self._ship()
        self._shipping = None
        inputs = [*stacks.values(), *shifts.values()]
        device = self._layers[0].helper.weight.device
        self._in_flight = self._background.submit(
            step, (ready, verdict), lambda: self._decompose(step, by_size, stacks, shifts), inputs, device
        )
        if shipping is not None:
            job, mine, shipment = shipping
            self._install(job.step, job.context[0], mine, shipment.finish())

    def _ship(self) -> _Shipping | None:
        """Collect the decompositions in flight (waiting if they are not done) and launch their broadcasts."""
        job, self._in_flight = self._in_flight, None
        if job is None:
            return None
        ready, verdict = job.context
        verdict()  # NaN or Inf in the factors it started from: raised before a decomposition error they may cause
        mine = {block: list(states) for block, states in self._background.collect(job).items()}
        return job, mine, self._share(mine, ready)

    def _share(self, mine: dict[FactorBlock, list[torch.Tensor]], ready: set[int]) -> Shipment:
        """Launch the broadcasts of this rank's decompositions to the other gradient workers (none in one process)."""
        first = self._layers[0].helper
        if self.comm.world_size == 1:
            return Shipment([], lambda block: [])
        return self._decomposition_exchange.start(mine, ready, self._compute_dtype(first), first.weight.device)

    def _prepare_decompositions(
        self, step: int, defer_check: bool
    ) -> tuple[set[int], BlocksBySize, dict[Any, torch.Tensor], Shifts, Callable[[], None]]:
        """What to decompose, with its collectives done: the ready layers, this rank's blocks by size, copies of
        them stacked, their shifts (inverse method), and the finiteness check's verdict: already given, or with
        ``defer_check`` still to be waited for (asynchronous mode: at the installation, off this step's path)."""
        damping = hyperparameter_at(self.damping, "damping", step)
        ready = {layer.index for layer in self._layers if layer.has_factors}
        by_size = self._owned_blocks_by_size(ready)
        stacks = {
            key: torch.stack([self._block(member).to(key[2]) for member in members]) for key, members in by_size.items()
        }
        # A sum is one pass where isfinite().all() is several; NaN and Inf survive it, and float64 cannot overflow
        # on float32 entries.
        finite = [torch.isfinite(stack.flatten(1).sum(1, dtype=torch.float64)) for stack in stacks.values()]
        verdict = self._check_finite(step, list(by_size.values()), finite)
        if not defer_check:
            verdict()
        shifts = self._shifts(damping, by_size, stacks) if self._method.shifts_at_decomposition else {}
        return ready, by_size, stacks, shifts, verdict

    def _install(
        self,
        made_at: int,
        ready: set[int],
        mine: dict[FactorBlock, list[torch.Tensor]],
        received: dict[FactorBlock, list[torch.Tensor]],
    ) -> None:
        """Store this rank's and the received decompositions of the factors of step ``made_at``."""
        self._store_decompositions({**mine, **received})
        for layer in self._layers:
            layer.decomposed = layer.decomposed or layer.index in ready
        self._decomposed_at = made_at

    def _owned_blocks_by_size(self, ready: set[int]) -> BlocksBySize:
        """This rank's blocks of ``ready`` layers' factors, by (FactorShape, device, compute dtype): one batched
        call each. A factor that is not split is one block."""
        by_size: BlocksBySize = defaultdict(list)
        for block, owner in self.assignment.blocks:
            layer = self._layers[block.key.layer]
            if owner != self.comm.rank or block.key.layer not in ready or layer.factor(block.key.kind) is None:
                continue
            shape = block.shape(of_kind(block.key.kind, (layer.helper.a_shape, layer.helper.g_shape)))
            by_size[(shape, layer.helper.weight.device, self._compute_dtype(layer.helper))].append(block)
        return by_size

    def _block(self, block: FactorBlock) -> torch.Tensor:
        """The running factor's diagonal block (the whole factor when it is not split), where this rank keeps it."""
        factor = self._factor(block.key)
        if block.size == self._side(block.key):
            return factor
        at = self._factor_exchange.stored_at(block)
        return factor[at : at + block.size, at : at + block.size]

    def _decompose(
        self,
        step: int,
        by_size: BlocksBySize,
        stacks: Mapping[Any, torch.Tensor],
        shifts: Shifts,
    ) -> dict[FactorBlock, list[torch.Tensor]]:
        """Each stack's decompositions, one batched call per stack, split back into one entry per block."""
        mine: dict[FactorBlock, list[torch.Tensor]] = {}
        for key, members in by_size.items():
            try:
                decomposed = self._method.decompose(stacks[key], shifts.get(key), key[0].structure)
            except torch.linalg.LinAlgError as error:
                names = ", ".join(self._block_name(member) for member in members)
                raise DecompositionError(
                    f"distkfac: the {self.compute_method} decomposition failed at step {step} for {names} even in "
                    f"float64 ({error}); raise damping or check the factors for extreme values"
                ) from error
            for position, member in enumerate(members):
                mine[member] = [state[position] for state in decomposed]
        return mine

    def _store_decompositions(self, decompositions: Mapping[FactorBlock, list[torch.Tensor]]) -> None:
        """Copy each decomposition into its layer's slot of its group's stacks, where this rank preconditions it.

        A block of a split factor fills its diagonal block of the basis or inverse (``n x n``; the rest stays 0, so
        the stored state is the block-diagonal factor's) and its slice of the eigenvalues.
        """
        for block, states in decompositions.items():
            layer = self._layers[block.key.layer]
            if layer.group < 0:
                continue  # factor reduction "allreduce" keeps every factor, but this rank does not precondition it
            for dst, src in zip(self._groups[layer.group].state(block.key.kind), states, strict=True):
                slot = dst[layer.slot]
                if slot.shape[0] == block.stop - block.start:
                    slot.copy_(src)
                elif slot.dim() == 2:
                    slot[block.start : block.stop, block.start : block.stop].copy_(src)
                else:
                    slot[block.start : block.stop].copy_(src)

    def _shifts(self, damping: float, by_size: BlocksBySize, stacks: Mapping[Any, torch.Tensor]) -> Shifts:
        """Each stacked factor's diagonal shift: ``s = sqrt(damping)``, or ``pi s`` for A and ``s / pi`` for G.

        Unit-wise blocks have no Kronecker partner and take the whole damping.
        """
        shift = math.sqrt(damping)
        out = {}
        for key, members in by_size.items():
            value = damping if key[0].structure is Structure.BLOCKS else shift
            out[key] = torch.full((len(members),), value, dtype=torch.float64, device=key[1])
        if self.damping_form != "factored-pi":
            return out
        means = self._factor_means(by_size, stacks)
        pi = pi_correction(means[0::2], means[1::2])  # per layer
        for key, members in by_size.items():
            if key[0].structure is Structure.BLOCKS:
                continue
            layers = torch.tensor([block.key.layer for block in members], device=pi.device)
            is_a = torch.tensor([block.key.kind is FactorKind.A for block in members], device=pi.device)
            chosen = pi[layers]
            out[key] = torch.where(is_a, shift * chosen, shift / chosen).to(key[1])
        return out

    def _factor_means(self, by_size: BlocksBySize, stacks: Mapping[Any, torch.Tensor]) -> torch.Tensor:
        """``tr F / dim F`` of every factor, at its ``FactorKey.position`` (2 * layer, + 1 for G), on every rank.

        A layer's A and G may be decomposed by different ranks, and factored-pi shifts each by the other's trace.
        Each block has exactly one owner, which adds its share (its trace over the factor's whole side); one
        allreduce of the 2 x layers vector (through the communicator, like the finiteness check) gives every rank
        all of them, with no host synchronisation. The trace of a block-diagonal factor is the trace of the factor.
        """
        device = self._layers[0].helper.weight.device  # NCCL needs the values on the GPU
        means = torch.zeros(2 * len(self._layers), dtype=torch.float64, device=device)
        for key, members in by_size.items():
            positions = torch.tensor([member.key.position for member in members], device=device)
            stack = stacks[key]
            diagonal = stack.diagonal(dim1=1, dim2=2) if key[0].structure is Structure.DENSE else stack.flatten(1)
            sides = [self._side(member.key) for member in members]
            if all(side == key[0].dim for side in sides):
                share = diagonal.to(torch.float64).mean(1)
            else:
                share = diagonal.to(torch.float64).sum(1) / torch.tensor(sides, dtype=torch.float64)
            means.index_add_(0, positions, share.to(device))
        if self.comm.world_size > 1:
            self.comm.allreduce_sum(means, "factor traces").wait()
        return means

    def _check_finite(
        self, step: int, members: list[list[FactorBlock]], finite: list[torch.Tensor]
    ) -> Callable[[], None]:
        """Start checking whether any rank's factors hold NaN or Inf (one small allreduce); the returned verdict
        waits for it (one host sync) and raises on every rank if so."""
        device = self._layers[0].helper.weight.device  # NCCL needs the flags on the GPU
        bad = torch.zeros(2 * len(self._layers), dtype=torch.int32, device=device)
        for blocks, ok in zip(members, finite, strict=True):
            positions = torch.tensor([block.key.position for block in blocks], device=device)
            bad.index_add_(0, positions, (~ok).to(device=device, dtype=torch.int32))
        pending = self.comm.allreduce_sum(bad, "finiteness check") if self.comm.world_size > 1 else None
        return functools.cache(lambda: self._finite_verdict(step, bad, pending))  # given once, however often asked

    def _finite_verdict(self, step: int, bad: torch.Tensor, pending: Pending | None) -> None:
        if pending is not None:
            pending.wait()
        if bool(bad.any()):
            names = [self._factor_name(FactorKey.at(p)) for p in bad.nonzero().view(-1).tolist()]
            raise FloatingPointError(
                f"distkfac: Kronecker factors contain NaN or Inf at step {step}: {', '.join(names)}. The activations "
                "or gradients diverged: lower the learning rate, raise damping, or check the inputs and the loss"
            )

    def _factor(self, key: FactorKey) -> torch.Tensor:
        factor = self._layers[key.layer].factor(key.kind)
        assert factor is not None
        return factor

    def _factor_name(self, key: FactorKey) -> str:
        """``layer.A`` or ``layer.G``, as messages name a factor."""
        return f"{self._layers[key.layer].name}.{key.kind}"

    def _side(self, key: FactorKey) -> int:
        """The factor's side ``n``."""
        layer = self._layers[key.layer]
        return of_kind(key.kind, (layer.helper.a_shape, layer.helper.g_shape)).dim

    def _block_name(self, block: FactorBlock) -> str:
        """``layer.A``, or ``layer.A[0:922]`` for a block of a split factor."""
        layer = self._layers[block.key.layer]
        factor = of_kind(block.key.kind, (layer.helper.a_shape, layer.helper.g_shape))
        return self._factor_name(block.key) + block.name(factor)

    def _precondition(self, step: int) -> None:
        damping = hyperparameter_at(self.damping, "damping", step)
        active = {layer.index for layer in self._layers if layer.decomposed and layer.helper.has_grad()}
        first = self._layers[0].helper
        vg = torch.zeros(len(self._layers), dtype=self._compute_dtype(first), device=first.weight.device)
        directions: dict[int, torch.Tensor] = {}
        for group in self._groups:
            members = [layer for layer in group.layers if layer.index in active]
            if not members:
                continue
            if len(members) < len(group.layers):
                group.grads.zero_()  # absent layers then contribute V = 0 and nothing to the KL sum
            for layer in members:
                layer.helper.read_grad(group.grads[layer.slot])
            preconditioned = self._method.precondition(
                group.grads, group.a_state, group.g_state, damping, group.structures
            )
            slots = torch.tensor([layer.slot for layer in members], device=vg.device)
            indices = torch.tensor([layer.index for layer in members], device=vg.device)
            per_layer = (preconditioned * group.grads).flatten(1).sum(1)
            vg[indices] = per_layer[slots].to(vg.dtype)
            for layer in members:
                directions[layer.index] = preconditioned[layer.slot]
        if self.comm.world_size > 1:
            directions.update(self._gradient_exchange.share(directions, vg, active))

        scale: torch.Tensor | None = None
        if self.kl_clip is not None and directions:
            kl_clip = hyperparameter_at(self.kl_clip, "kl_clip", step)
            lr = hyperparameter_at(self.lr, "lr", step)
            # No host synchronisation: nu stays a tensor. <V, grad> >= 0 up to rounding; 0 means nu = 1. Summed in
            # layer order, so every rank computes the same nu from the same values.
            scale = torch.sqrt(kl_clip / (lr * lr * vg.sum().clamp(min=0.0))).clamp(max=1.0)
        self._kl_scale = scale
        for index in sorted(directions):
            self._layers[index].helper.write_grad(directions[index], scale)

    def decompositions(self) -> dict[str, Any]:
        """The parts of :meth:`state_dict` that describe the preconditioner now, not copied (read them; never change
        them): compute method, conventions, adaptive damping and each layer's decompositions ("a_state", "g_state";
        None where another rank holds them). What distkfac.diagnostics.curvature_share reads, at no copy's cost."""
        layers = {}
        for layer in self._layers:
            group = self._groups[layer.group] if layer.group >= 0 and layer.decomposed else None
            layers[layer.name] = {
                "a_state": [t[layer.slot] for t in group.a_state] if group is not None else None,
                "g_state": [t[layer.slot] for t in group.g_state] if group is not None else None,
            }
        return {
            "compute_method": self.compute_method,
            "conventions": self._conventions(),
            "damping": self.damping.state_dict() if isinstance(self.damping, LevenbergMarquardt) else None,
            "layers": layers,
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Step count, running factors and current decompositions: enough to resume bit for bit.

        In a distributed run it holds this rank's part only (the factors it owns, the decompositions it keeps):
        save one file per rank and load each into the same rank of a run with the same world size and strategy.
        Hyperparameters are not included: they come from the constructor, so schedules keep working; but with
        ``damping=LevenbergMarquardt(...)`` the controller's state (lambda, last rho, counts) is, under ``"damping"``.
        """
        layers: dict[str, Any] = {}
        for layer in self._layers:
            local = layer.group >= 0 and layer.decomposed
            group = self._groups[layer.group] if local else None
            layers[layer.name] = {
                "has_factors": layer.has_factors,
                "decomposed": layer.decomposed,
                "A": None if layer.a_factor is None else layer.a_factor.clone(),
                "G": None if layer.g_factor is None else layer.g_factor.clone(),
                "a_state": [t[layer.slot].clone() for t in group.a_state] if group is not None else None,
                "g_state": [t[layer.slot].clone() for t in group.g_state] if group is not None else None,
            }
        return {
            "steps": self._steps,
            "compute_method": self.compute_method,
            "conventions": self._conventions(),
            "rank": self.comm.rank,
            "world_size": self.comm.world_size,
            "grad_workers": len(self.assignment.worker_groups[0]),
            "layers": layers,
            "damping": self.damping.state_dict() if isinstance(self.damping, LevenbergMarquardt) else None,
            "decomposed_at": self._decomposed_at,
            "in_flight": self._in_flight_state(),
        }

    def _in_flight_state(self) -> dict[str, Any] | None:
        """Asynchronous mode: this rank's decompositions still to be installed, waited for (finished) and saved with
        the step that started them, so that a resumed run installs exactly what the uninterrupted one would."""
        job = self._shipping[0] if self._shipping is not None else self._in_flight
        if job is None:
            return None
        job.context[1]()  # the finiteness verdict, as installing would
        result = self._background.collect(job)
        blocks = [
            {
                "layer": self._layers[block.key.layer].name,
                "kind": str(block.key.kind),
                "start": block.start,
                "stop": block.stop,
                "state": [t.clone() for t in states],
            }
            for block, states in result.items()
        ]
        ready = sorted(self._layers[index].name for index in job.context[0])
        return {"step": job.step, "ready": ready, "blocks": blocks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` returned, checking that it belongs to the same model, method and rank.

        An adaptive damping controller takes the checkpoint's state when it has one (and keeps its own otherwise);
        a fixed damping or schedule ignores a saved controller state.
        """
        self._check_checkpoint(state)
        saved = state["layers"]
        for layer in self._layers:
            self._check_checkpoint_factors(layer, saved[layer.name])
            self._restore_layer(layer, saved[layer.name])
        self._steps = int(state["steps"])
        self._kl_scale = None
        self._restore_in_flight(state)
        if isinstance(self.damping, LevenbergMarquardt) and state.get("damping") is not None:
            self.damping.load_state_dict(state["damping"])

    def _restore_in_flight(self, state: Mapping[str, Any]) -> None:
        """The step behind the decompositions in use, and (asynchronous mode) the saved decompositions in flight.

        Checkpoints from before asynchronous decompositions existed say neither: the last decomposition step is
        taken. A synchronous run ignores a saved in-flight part (it decomposes afresh at its next interval).
        """
        steps, interval = self._steps, self.inv_update_steps
        decomposed = any(layer.decomposed for layer in self._layers)
        fallback = (steps - 1) // interval * interval if decomposed and steps > 0 else None
        self._decomposed_at = state.get("decomposed_at", fallback)
        saved = state.get("in_flight")
        self._in_flight = self._shipping = None
        if saved is None or not self.async_decompositions:
            return
        index = {layer.name: layer.index for layer in self._layers}
        mine = {block for block, owner in self.assignment.blocks if owner == self.comm.rank}
        result: dict[FactorBlock, list[torch.Tensor]] = {}
        device = self._layers[0].helper.weight.device
        for entry in saved["blocks"]:
            block = FactorBlock(
                FactorKey(index[entry["layer"]], FactorKind(entry["kind"])), entry["start"], entry["stop"]
            )
            if block not in mine:
                raise ValueError(
                    f"distkfac: the checkpoint's decomposition in flight of {self._block_name(block)} is not this "
                    "rank's to make: it was saved with another split_factors_above or layout; resume with the "
                    "checkpoint's settings"
                )
            result[block] = [t.to(device) for t in entry["state"]]
        ready = {index[name] for name in saved["ready"]}
        self._in_flight = InFlight.finished(int(saved["step"]), (ready, lambda: None), result)

    def _check_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of another method, other conventions, another rank layout or other layers."""
        if not isinstance(state, Mapping) or not {"steps", "compute_method", "layers"} <= set(state):
            raise ValueError("distkfac: not a KFACPreconditioner state_dict (needs steps, compute_method, layers)")
        if state["compute_method"] != self.compute_method:
            raise ValueError(
                f"distkfac: the checkpoint was made with compute_method={state['compute_method']!r}, this "
                f"preconditioner uses {self.compute_method!r}; construct it with the checkpoint's method"
            )
        # Checkpoints from before the conventions were selectable were made with the defaults.
        historic = {
            "damping_form": self._method.default_form,
            "conv_factors": "mean",
            "g_scale": "example",
            "weight_sharing": "expand",
        }
        saved_conventions = state.get("conventions", historic)
        # The factors are made under conv_factors and g_scale; the inverse method's decompositions also under
        # damping_form (its shifts are baked in), while eigen's do not depend on it, so eigen may change it.
        relevant = [k for k in historic if k != "damping_form" or self._method.shifts_at_decomposition]
        if any(saved_conventions.get(k, historic[k]) != self._conventions()[k] for k in relevant):
            raise ValueError(
                f"distkfac: the checkpoint was made with {saved_conventions}, this preconditioner uses "
                f"{self._conventions()}; construct it with the checkpoint's settings"
            )
        layout = (state.get("rank", 0), state.get("world_size", 1), state.get("grad_workers", 1))
        ours = (self.comm.rank, self.comm.world_size, len(self.assignment.worker_groups[0]))
        if layout[1:] != ours[1:] or (layout[1] > 1 and layout[0] != ours[0]):
            raise ValueError(
                f"distkfac: the checkpoint holds rank {layout[0]}'s part of a run with {layout[1]} ranks and "
                f"{layout[2]} gradient workers per layer; this is rank {ours[0]} of {ours[1]} with {ours[2]}. Resume "
                "with the same world size and strategy, each rank loading its own file"
            )
        saved, names = state["layers"], {layer.name for layer in self._layers}
        if set(saved) != names:
            raise ValueError(
                "distkfac: the checkpoint's layers do not match this model's: missing "
                f"{sorted(names - set(saved))}, unexpected {sorted(set(saved) - names)}"
            )

    def _check_checkpoint_factors(self, layer: _Layer, entry: Mapping[str, Any]) -> None:
        for kind in FACTOR_KINDS:  # stored under "A" and "G"
            factor = of_kind(kind, (layer.helper.a_shape, layer.helper.g_shape))
            value, shape = entry[kind], self._factor_exchange.stored_shape(FactorKey(layer.index, kind), factor)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"distkfac: checkpoint factor {layer.name}.{kind} has shape {tuple(value.shape)}, "
                    f"the model needs {shape} (split factors: this rank's blocks side by side; resume with the "
                    "checkpoint's split_factors_above, world size and strategy)"
                )

    def _restore_layer(self, layer: _Layer, entry: Mapping[str, Any]) -> None:
        """One layer's factors and, where this rank preconditions it, its decompositions; no pass in progress."""
        device = layer.helper.weight.device
        layer.a_factor = None if entry["A"] is None else entry["A"].to(device).clone()
        layer.g_factor = None if entry["G"] is None else entry["G"].to(device).clone()
        layer.has_factors = entry.get("has_factors", entry["A"] is not None)
        layer.decomposed = entry.get("decomposed", entry["a_state"] is not None)
        if entry["a_state"] is not None and layer.group >= 0:
            group = self._groups[layer.group]
            for dst, src in zip(group.a_state, entry["a_state"], strict=True):
                dst[layer.slot].copy_(src)
            for dst, src in zip(group.g_state, entry["g_state"], strict=True):
                dst[layer.slot].copy_(src)
        layer.a_batch = layer.g_batch = None
        layer.a_passes = layer.g_passes = 0

    # ------------------------------------------------------------------ misc

    def _conventions(self) -> dict[str, str]:
        return {
            "damping_form": self.damping_form,
            "conv_factors": self.conv_factors,
            "g_scale": self.g_scale,
            "weight_sharing": self.weight_sharing,
        }

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank keeps for K-FAC: running factors, and decompositions with their gradient stacks."""
        factors = sum(
            t.numel() * t.element_size()
            for layer in self._layers
            for t in (layer.a_factor, layer.g_factor)
            if t is not None
        )
        decompositions = sum(
            t.numel() * t.element_size()
            for group in self._groups
            for t in (*group.a_state, *group.g_state, group.grads)
        )
        return {"factors": factors, "decompositions": decompositions}

    @property
    def layer_names(self) -> list[str]:
        """The names of the preconditioned layers, in model order."""
        return [layer.name for layer in self._layers]

    @property
    def factor_shapes(self) -> list[tuple[FactorShape, FactorShape]]:
        """Each preconditioned layer's (A, G) factor shapes, in model order: what :func:`distkfac.assign_work`
        balances, e.g. to plan how far the decompositions share out over P ranks."""
        return [(layer.helper.a_shape, layer.helper.g_shape) for layer in self._layers]

    def remove_hooks(self) -> None:
        """Detach from the model: later forward passes capture nothing."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner(layers={len(self._layers)}, compute_method={self.compute_method!r}, "
            f"damping_form={self.damping_form!r}, conv_factors={self.conv_factors!r}, g_scale={self.g_scale!r}, "
            f"weight_sharing={self.weight_sharing!r}, fisher={self.fisher!r}, steps={self._steps}"
            + (f", damping={self.damping!r})" if isinstance(self.damping, LevenbergMarquardt) else ")")
        )
