"""Per-example gradients of the training loss, as rows ``g_i`` (flattened to ``d`` columns), in bounded chunks.

``g_i`` is the gradient of example ``i``'s own cross-entropy loss ``l_i = CE(f(x_i), y_i)`` with respect to the
chosen parameters: those of one layer (by module name) or of the whole model. Its columns are the parameters'
flattened gradients concatenated in ``named_parameters()`` order (for a Linear layer: the weight row by row, then the
bias). No Python loop runs over examples:

- an ``nn.Linear`` layer: the weight gradient of example ``i`` is ``g_i a_i^T`` (its bias gradient ``g_i``), with
  ``a_i`` the layer's input (a forward hook) and ``g_i = dl_i/ds_i`` the gradient at its output ``s_i``, from one
  ``autograd.grad`` of the loss *summed* over the chunk: the sum makes row ``i`` of the output gradient example
  ``i``'s own (no 1/n). Extra dimensions between the batch and the features (a sequence) are summed over.
- anything else (Conv2d, the whole model): ``torch.func``, ``vmap`` of ``grad`` of a ``functional_call`` on one
  example.

:func:`linear_factors` keeps the Linear layers' ``a_i`` and ``g_i`` instead of the rows (``FactoredRows``, see
``factored``): every Linear layer of an MLP, or one layer, in one pass, at ``N (in + out)`` numbers.

Either way the model must treat examples independently: BatchNorm in training mode couples them (use ``eval()``).
The model's ``.grad`` are left untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from distkfac.diagnostics.factored import FactoredRows, LinearFactors

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Batch | Iterable[Batch]


def per_example_gradients(
    model: nn.Module, data: Data, layer: str | None = None, chunk_size: int = 256
) -> Iterator[torch.Tensor]:
    """Yields chunks of per-example gradient rows, each of shape ``(n, d)`` with ``n <= chunk_size``.

    ``data``: the examples as one ``(x, y)`` pair of tensors, or an iterable of ``(x, y)`` batches (a DataLoader);
    batches larger than ``chunk_size`` are split, so memory stays bounded by ``chunk_size`` examples. ``layer``: a
    module name from ``model.named_modules()``, or None for every parameter of the model that requires grad.
    Raises ValueError for an unknown layer (naming the layers with parameters), a bad chunk size, or empty data.
    """
    if chunk_size < 1:
        raise ValueError(f"distkfac.diagnostics: chunk_size must be at least 1, got {chunk_size}")
    names = _chosen_parameters(model, layer)
    module = dict(model.named_modules())[layer] if layer is not None else None
    device = next(model.parameters()).device
    seen = 0
    for x, y in _chunks(data, chunk_size):
        x, y = x.to(device), y.to(device)
        seen += len(x)
        if isinstance(module, nn.Linear):
            yield _linear_rows(model, module, x, y)
        else:
            yield _functional_rows(model, names, x, y)
    if seen == 0:
        raise ValueError("distkfac.diagnostics: empty data: no examples to take gradients of")


def factorable_layers(model: nn.Module, layer: str | None = None) -> list[str] | None:
    """The Linear modules behind every chosen parameter (``layer``, or the whole model when None), in column order;
    None when some chosen parameter is not a Linear layer's weight or bias (then only explicit rows will do)."""
    names = _chosen_parameters(model, layer)
    modules = dict(model.named_modules())
    owners: list[str] = []
    for name in names:
        owner, _, kind = name.rpartition(".")
        if not isinstance(modules.get(owner), nn.Linear) or kind not in ("weight", "bias"):
            return None
        if not owners or owners[-1] != owner:
            owners.append(owner)
    expected = [f"{o}.{kind}" for o in owners for kind, p in modules[o].named_parameters() if p.requires_grad]
    return owners if expected == names else None


def linear_factors(model: nn.Module, data: Data, layer: str | None = None, chunk_size: int = 256) -> FactoredRows:
    """The per-example gradients of ``layer`` (or of the whole model) as Linear layers' factors, one pass over
    ``data`` in chunks of ``chunk_size``; the same rows as :func:`per_example_gradients`. Raises ValueError when a
    chosen parameter is not a Linear layer's, or a layer's input is not ``(n, features)``."""
    owners = factorable_layers(model, layer)
    if owners is None:
        raise ValueError(f"distkfac.diagnostics: the parameters of {layer or 'the model'!r} are not all Linear layers'")
    modules = dict(model.named_modules())
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {owner: ([], []) for owner in owners}
    device = next(model.parameters()).device
    for x, y in _chunks(data, chunk_size):
        for owner, (a, g) in _chunk_factors(model, [modules[o] for o in owners], owners, x.to(device), y.to(device)):
            parts[owner][0].append(a)
            parts[owner][1].append(g)
    if not parts[owners[0]][0]:
        raise ValueError("distkfac.diagnostics: empty data: no examples to take gradients of")
    blocks = [
        LinearFactors(torch.cat(parts[o][0]), torch.cat(parts[o][1]), modules[o].bias is not None) for o in owners
    ]
    return FactoredRows(blocks, chunk_size)


def _chunk_factors(
    model: nn.Module, linears: list[nn.Module], names: list[str], x: torch.Tensor, y: torch.Tensor
) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each layer's ``(a_i, g_i)`` for one chunk: forward hooks, one ``autograd.grad`` of the summed loss."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[id(module)] = (inputs[0].detach(), output)

    handles = [module.register_forward_hook(keep) for module in linears]
    try:
        loss = F.cross_entropy(model(x), y, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(linears) or any(seen[id(m)][0].dim() != 2 for m in linears):
        raise ValueError("distkfac.diagnostics: every chosen Linear layer must run once, on (n, features) inputs")
    grads = torch.autograd.grad(loss, [seen[id(m)][1] for m in linears])
    return [(name, (seen[id(m)][0], g)) for name, m, g in zip(names, linears, grads, strict=True)]


def parameter_names(model: nn.Module, layer: str | None = None) -> list[str]:
    """The parameters behind the columns of ``g_i``, in column order (full names as in ``named_parameters()``)."""
    return _chosen_parameters(model, layer)


def _chosen_parameters(model: nn.Module, layer: str | None) -> list[str]:
    if layer is None:
        names = [name for name, p in model.named_parameters() if p.requires_grad]
    else:
        modules = dict(model.named_modules())
        with_parameters = [name for name, m in modules.items() if name and any(True for _ in m.parameters())]
        if layer not in modules or not layer:
            raise ValueError(
                f"distkfac.diagnostics: the model has no layer {layer!r}; layers with parameters: {with_parameters}"
            )
        names = [f"{layer}.{name}" for name, p in modules[layer].named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"distkfac.diagnostics: layer {layer!r} has no parameters that require grad")
    return names


def _chunks(data: Data, chunk_size: int) -> Iterator[Batch]:
    one_pair = isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    batches = [cast(Batch, data)] if one_pair else cast(Iterable[Batch], data)
    for x, y in batches:
        if len(x) != len(y):
            raise ValueError(f"distkfac.diagnostics: a batch has {len(x)} inputs but {len(y)} targets")
        if len(x):  # split() gives one empty piece of an empty batch
            yield from zip(x.split(chunk_size), y.split(chunk_size), strict=True)


def _linear_rows(model: nn.Module, module: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["input"], seen["output"] = inputs[0].detach(), output

    handle = module.register_forward_hook(keep)
    try:
        loss = F.cross_entropy(model(x), y, reduction="sum")
    finally:
        handle.remove()
    if "output" not in seen:
        raise ValueError("distkfac.diagnostics: the chosen Linear layer did not run in the model's forward pass")
    (output_grad,) = torch.autograd.grad(loss, seen["output"])
    inputs = seen["input"]
    weight = torch.einsum("n...o,n...i->noi", output_grad, inputs).reshape(len(x), -1)
    columns = {"weight": weight, "bias": output_grad.reshape(len(x), -1, output_grad.shape[-1]).sum(1)}
    return torch.cat([columns[name] for name, p in module.named_parameters() if p.requires_grad], dim=1)


def _functional_rows(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    state: dict[str, Any] = {**dict(model.named_buffers()), **{n: p.detach() for n, p in model.named_parameters()}}
    chosen = {name: state.pop(name) for name in names}

    def loss(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**state, **params}, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(chosen, x, y)
    return torch.cat([grads[name].reshape(len(x), -1) for name in names], dim=1)
