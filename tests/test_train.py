"""python -m jobs.train: models, data loaders and shards, schedules, config errors, and short real training runs
(metrics, checkpoints, resume bit for bit, also on two ranks under torchrun). About 40 s on 2 CPU cores."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac.diagnostics.curvature_share import curvature_shares, overall_share
from jobs.checkpoint import find_latest, shared_file
from jobs.config import ConfigError, DataConfig, ModelConfig, OptimConfig, build_config, load_config, parse_override
from jobs.data import FASHION_MNIST_ROOT, MNIST_ROOT
from jobs.datasets import (
    CIFAR10_TARBALL,
    ShardedBatches,
    augment_shard,
    check_divisible,
    load_cifar10,
    load_dataset,
    resolve_data_path,
)
from jobs.metrics import CSV_COLUMNS, ProgressLine, read_metrics
from jobs.models import MLP, CifarResNet, LeNet5, ResidualLinear, SigmoidResNet, build_model, set_channels_last
from jobs.optim import LRSchedule, make_lr_schedule, peak_lr
from jobs.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
SMOKE = CONFIGS / "smoke.toml"
KFAC = ("optim.name=kfac", "optim.momentum=0.5")  # momentum 0.9: too much on top of K-FAC (examples/kfac_vs_sgd.py)


def train(out_dir: Path, *overrides: str, resume: bool = False, config: Path = SMOKE) -> int:
    argv = ["--config", str(config), f"run.out_dir='{out_dir}'", *overrides]
    return main([*argv, "--resume"] if resume else argv)


def final_model(out_dir: Path) -> dict[str, torch.Tensor]:
    ref = find_latest(out_dir)
    assert ref is not None, f"no checkpoint in {out_dir}"
    state: dict[str, torch.Tensor] = torch.load(shared_file(ref.folder, ref.name), weights_only=True)["model"]
    return state


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")} for r in records]


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (ModelConfig(name="mlp", hidden=[32, 16]), (1, 28, 28)),
        (ModelConfig(name="mlp", hidden=[8], activation="tanh"), (32,)),
        (ModelConfig(name="lenet5"), (1, 28, 28)),
        (ModelConfig(name="lenet5", activation="tanh"), (3, 32, 32)),
        (ModelConfig(name="resnet", depth=8, width=8), (3, 32, 32)),
        (ModelConfig(name="convnet", channels=[4, 4, 8, 8], hidden=[16, 12]), (3, 32, 32)),
        (ModelConfig(name="convnet", channels=[4, 8], hidden=[], activation="tanh"), (1, 28, 28)),
        (ModelConfig(name="sigmoid_resnet", depth=9, width=5), (2,)),
    ],
)
def test_models_build_and_train_on_their_data_shape(config: ModelConfig, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(config, shape, 10)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_classes_and_resnet_depth() -> None:
    assert isinstance(build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10), LeNet5)
    resnet = build_model(ModelConfig(name="resnet", depth=20), (3, 32, 32), 10)
    assert isinstance(resnet, CifarResNet)
    # 6n + 2 = 20 layers with weights: stem, 3 x 3 blocks of 2 convolutions, fc (1x1 shortcuts not counted)
    convs = [m for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 20
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet((3, 32, 32), 10, depth=21)
    with pytest.raises(ValueError, match="needs images"):
        build_model(ModelConfig(name="lenet5"), (32,), 10)
    # seed 003's CIFAR-10 net: 4 convolutions, three 2x2 pools (after all but the first), 3 Linear layers
    convnet = build_model(ModelConfig(name="convnet", channels=[16, 16, 32, 32], hidden=[256, 84]), (3, 32, 32), 10)
    kinds = [type(m) for m in convnet.modules()]
    assert (kinds.count(nn.Conv2d), kinds.count(nn.MaxPool2d), kinds.count(nn.Linear)) == (4, 3, 3)
    assert dict(convnet.named_modules())["classifier.1"].in_features == 32 * 4 * 4
    with pytest.raises(ValueError, match=r"model\.channels is empty"):
        build_config({"model": {"name": "convnet", "channels": []}, "run": {"epochs": 1}})


CONV_MODELS = [
    ModelConfig(name="convnet", channels=[16, 32, 32, 32], hidden=[128]),
    ModelConfig(name="lenet5"),
    ModelConfig(name="resnet", depth=8),
]


def _channels_last_run(
    config: ModelConfig, channels_last: bool, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output and gradients of a fresh model (seed 0) in x's dtype, checking the layouts on the way."""
    torch.manual_seed(0)
    model = build_model(config, (3, 32, 32), 10).to(x.dtype)
    set_channels_last(model, channels_last)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen: list[torch.Tensor] = []
    first_conv.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out))
    out = model(x)
    F.cross_entropy(out, y).backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert seen[0].is_contiguous() != channels_last
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and all(p.is_contiguous() for p in model.parameters())
    assert all(g.is_contiguous() for g in grads)
    return out.detach(), grads


@pytest.mark.parametrize("config", CONV_MODELS, ids=lambda c: c.name)
def test_conv_models_run_channels_last_on_cpu_with_the_same_values_and_gradients(config: ModelConfig) -> None:
    """The CPU speed-up (jobs.models.cpu_channels_last) changes the memory order only: the same outputs and
    gradients as the NCHW model, activations channels-last, weights and gradients in the layout distkfac views.

    Outputs in float32 (oneDNN's kernels, the studies' dtype); gradients in float64. A ReLU's gradient jumps at 0:
    in float32, another summation order puts a pre-activation near 0 on the other side often enough that whole
    gradients moved by 1e-2 relative, NCHW against float64 as often as channels-last (the resnet, 60 inputs)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out_nchw, _ = _channels_last_run(config, False, x, y)
    out_cl, _ = _channels_last_run(config, True, x, y)
    torch.testing.assert_close(out_cl, out_nchw, rtol=1e-4, atol=1e-5)
    out_nchw, grads_nchw = _channels_last_run(config, False, x.double(), y)
    out_cl, grads_cl = _channels_last_run(config, True, x.double(), y)
    torch.testing.assert_close(out_cl, out_nchw)
    for cl, nchw in zip(grads_cl, grads_nchw, strict=True):
        torch.testing.assert_close(cl, nchw)


def test_kfac_factors_and_step_are_the_same_on_channels_last_activations() -> None:
    """distkfac's conv factors read channels-last inputs and output gradients as the NCHW ones (a_columns and
    g_columns take any memory order): the same factors and the same preconditioned step."""
    from distkfac import KFACPreconditioner

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model(CONV_MODELS[0], (3, 32, 32), 10)
        set_channels_last(model, channels_last)
        precond = KFACPreconditioner(model, damping=0.1, factor_decay=0.95, inv_update_steps=1)
        F.cross_entropy(model(x), y).backward()
        precond.step()
        layers = precond.state_dict()["layers"]
        factors = {f"{name}.{kind}": layer[kind] for name, layer in layers.items() for kind in ("A", "G")}
        results.append((factors, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (factors_nchw, grads_nchw), (factors_cl, grads_cl) = results
    assert factors_nchw.keys() == factors_cl.keys() and factors_nchw
    for name, value in factors_cl.items():
        torch.testing.assert_close(value, factors_nchw[name], rtol=1e-4, atol=1e-6, msg=name)
    for cl, nchw in zip(grads_cl, grads_nchw, strict=True):
        torch.testing.assert_close(cl, nchw, rtol=1e-3, atol=1e-6)


def test_per_example_gradients_of_a_conv_model_run_under_vmap_and_match_channels_last_backward() -> None:
    """torch.func's vmap cannot change a layout: the models leave it alone there, and each example's gradient
    equals one channels-last backward of that example."""
    from distkfac.diagnostics.per_example import per_example_gradients

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="convnet", channels=[8, 8], hidden=[16]), (3, 32, 32), 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    rows = torch.cat(list(per_example_gradients(model, (x, y))))
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(rows[i], expected, rtol=1e-4, atol=1e-6)


def test_channels_last_benchmark_times_both_orders_and_names_an_unknown_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import channels_last

    out = tmp_path / "cl.json"
    assert channels_last.main(["--models", "lenet5", "--batch-size", "8", "--steps", "1", "--rounds", "1",
                               "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(row["model"], row["kind"]) for row in rows] == [("lenet5", kind) for kind in ("sgd", "kfac", "eval")]
    assert all(row["nchw_s"] > 0 and row["channels_last_s"] > 0 for row in rows)
    assert "| lenet5 | kfac |" in capsys.readouterr().out
    assert channels_last.main(["--models", "vgg"]) == 2
    assert "unknown model(s) vgg: choose from convnet, lenet5, resnet20" in capsys.readouterr().err


def test_sigmoid_resnet_is_seed_001s_network() -> None:
    """Eqs. 10 and 11 by hand for L = 7: sigmoid layers 2, 3, 5, 7 with biases; identity layers 4 and 6 without,
    each adding the output of two layers before; 21 + 55 n weights for width 5; uniform in [-0.05, 0.05]."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="sigmoid_resnet", depth=7, width=5, slope=2.5), (2,), 1)
    assert isinstance(model, SigmoidResNet)
    assert sum(p.numel() for p in model.parameters()) == 21 + 55 * 2
    assert all(p.abs().max() <= 0.05 for p in model.parameters())
    f = lambda s: 1 / (1 + torch.exp(-2.5 * s))  # noqa: E731
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    z2 = f(model.first(x))
    z3 = f(model.odd[0](z2))
    z4 = model.even[0](z3) + z2  # a Linear without bias: W z
    z5 = f(model.odd[1](z4))
    z6 = model.even[1](z5) + z4
    torch.testing.assert_close(model(x), f(model.last(z6)))
    assert model.even[0].bias is None
    with pytest.raises(ValueError, match=r"L = 2n \+ 3"):
        build_config({"model": {"name": "sigmoid_resnet", "depth": 8}, "run": {"epochs": 1}})


def test_mlp_residual_skips_equal_width_layers_only() -> None:
    torch.manual_seed(0)
    model = MLP(784, [64, 64, 64, 32], 10, "relu", residual=True)
    blocks = [m for m in model if isinstance(m, ResidualLinear)]
    assert len(blocks) == 2  # 64 -> 64 twice; 784 -> 64 and 64 -> 32 change width
    x = torch.randn(3, 64)
    assert torch.allclose(blocks[0](x), x + torch.relu(blocks[0].linear(x)))
    plain = MLP(784, [64, 64, 64, 32], 10, "relu", residual=False)
    assert not any(isinstance(m, ResidualLinear) for m in plain)
    with pytest.raises(ValueError, match="equal input and output widths"):
        MLP(784, [64, 32], 10, residual=True)


def test_linear_mlp_is_affine() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[16, 16, 16], activation="none", residual=True), (8,), 3)
    a, b, zero = torch.randn(1, 8), torch.randn(1, 8), torch.zeros(1, 8)
    with torch.no_grad():
        lhs = model(2 * a + b) - model(zero)
        rhs = 2 * (model(a) - model(zero)) + (model(b) - model(zero))
    assert torch.allclose(lhs, rhs, atol=1e-5)
    relu = build_model(ModelConfig(name="mlp", hidden=[16, 16], activation="relu"), (8,), 3)
    with torch.no_grad():
        assert not torch.allclose(relu(-a) - relu(zero), -(relu(a) - relu(zero)), atol=1e-5)


def test_unknown_model_name_is_a_config_error() -> None:
    known = r"'mlp', 'lenet5', 'convnet', 'resnet', 'sigmoid_resnet'"
    with pytest.raises(ValueError, match=r"model\.name = 'vgg16' is not known.*" + known):
        build_config({"model": {"name": "vgg16"}, "run": {"epochs": 1}})
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        build_model(ModelConfig(name="vgg16"), (1, 28, 28), 10)


# --------------------------------------------------------------------------- data


def test_fashion_mnist_idx() -> None:
    data = load_dataset(DataConfig(name="fashion-mnist", path=str(FASHION_MNIST_ROOT), test_examples=1000))
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.classes == 10 and torch.equal(data.train_y.bincount(), torch.full((10,), 6000))
    assert data.mean.shape == (1, 1, 1) and abs(float(data.mean) - 0.286) < 1e-3  # Fashion-MNIST's known mean
    batch = data.prepare(data.train_x[:5000], torch.device("cpu"))
    assert abs(float(batch.mean())) < 0.05 and abs(float(batch.std()) - 1) < 0.05


def test_mnist_shared_files() -> None:
    data = load_dataset(DataConfig(name="mnist", train_examples=100))
    assert data.train_x.shape == (100, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    assert int(data.train_y.max()) == 9 and float(data.train_x.max()) == 1.0
    full = load_dataset(DataConfig(name="mnist", path=str(MNIST_ROOT)))
    assert len(full.train_x) == 17_435  # the shared copy's training set (see ../shared/data/README.md)


def test_cifar10_image_folder_from_the_shared_tarball(tmp_path: Path) -> None:
    images, labels = load_cifar10(CIFAR10_TARBALL, "test", cache_dir=tmp_path)
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    assert labels[:20].tolist() == list(range(10)) * 2  # round robin over the classes: prefixes are balanced
    assert not (tmp_path / "cifar10-jpeg" / "cifar10-jpeg" / "train").exists()  # only the split asked for
    cached = list((tmp_path / "decoded").glob("*/test-images.npy"))
    assert len(cached) == 1
    again, again_labels = load_cifar10(CIFAR10_TARBALL, "test", cache_dir=tmp_path)  # from the .npy cache
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    # Airplanes (label 0) are bluer than frogs (label 6): the labels belong to the pictures.
    blue_minus_red = images[:, 2].float().mean((1, 2)) - images[:, 0].float().mean((1, 2))
    assert blue_minus_red[labels == 0].mean() > blue_minus_red[labels == 6].mean() + 10


def write_python_batches(folder: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """The official cifar-10-batches-py layout and pickle format (dicts with bytes keys, protocol 2), tiny."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {
            b"batch_label": f"{name} of 6".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        all_data.append(data)
        all_labels.append(labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return np.concatenate(all_data), np.concatenate(all_labels)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    data, labels = write_python_batches(tmp_path / "cifar-10-batches-py")
    loaded = load_dataset(DataConfig(name="cifar10", path=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert loaded.train_x.shape == (30, 3, 32, 32) and loaded.test_x.shape == (6, 3, 32, 32)
    assert torch.equal(loaded.train_x, torch.from_numpy(data[:30].reshape(30, 3, 32, 32)))  # channel-major rows
    assert loaded.train_y.tolist() == labels[:30].tolist() and loaded.test_y.tolist() == labels[30:].tolist()
    # The same folder as the official tarball (cifar-10-python.tar.gz), extracted into the cache.
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    images, test_labels = load_cifar10(tarball, "test", cache_dir=tmp_path / "cache2", fmt="python")
    assert torch.equal(images, loaded.test_x) and torch.equal(test_labels, loaded.test_y)


def test_cifar10_python_batch_that_runs_code_is_refused(tmp_path: Path) -> None:
    write_python_batches(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("true",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="unexpected object"):
        load_cifar10(tmp_path, "test", fmt="python")


def test_synthetic_gaussian_classes_are_seeded_and_learnable() -> None:
    config = DataConfig(name="synthetic", synthetic_shape=[16], synthetic_train_size=2000, synthetic_test_size=500)
    a, b = load_dataset(config), load_dataset(config)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (2000, 16) and a.input_shape == (16,) and a.classes == 10
    other = load_dataset(DataConfig(name="synthetic", synthetic_shape=[16], synthetic_seed=1))
    assert not torch.equal(other.train_x[:10], a.train_x[:10])
    # Nearest class mean (estimated on train) beats chance by far on the test split.
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(a.test_x, means).argmin(1)
    assert (predicted == a.test_y).float().mean() > 0.4
    images = load_dataset(DataConfig(name="synthetic", synthetic_shape=[1, 12, 12], synthetic_train_size=64))
    assert images.train_x.shape == (64, 1, 12, 12) and images.mean.shape == (1, 1, 1)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10"])
def test_missing_data_path_names_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist: set data.path"):
        resolve_data_path(DataConfig(name=name, path=str(missing)))


def test_missing_data_path_stops_the_cli_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    assert train(tmp_path / "run", f"data.path='{missing}'") == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_shards_are_disjoint_and_cover_the_global_batch(world: int) -> None:
    shards = [ShardedBatches(1000, 64, rank, world, seed=3) for rank in range(world)]
    for epoch, step in [(0, 0), (0, 14), (5, 7)]:
        parts = [s.indices(epoch, step) for s in shards]
        assert all(len(p) == 64 // world for p in parts)
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == 64  # disjoint
        assert torch.equal(joined, shards[0].global_indices(epoch, step))  # they make up the global batch
    # One epoch's global batches are disjoint draws from a permutation; another epoch has another order.
    epoch0 = torch.cat([shards[0].global_indices(0, s) for s in range(shards[0].steps_per_epoch)])
    assert len(set(epoch0.tolist())) == 15 * 64 and shards[0].steps_per_epoch == 15
    assert not torch.equal(shards[0].global_indices(0, 0), shards[0].global_indices(1, 0))
    assert torch.equal(ShardedBatches(1000, 64, 0, 1, seed=3).global_indices(2, 3), shards[0].global_indices(2, 3))


def test_batch_not_divisible_by_ranks_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"global batch size 100 .* not divisible by the 3 ranks.*99 or 102"):
        check_divisible(100, 3)
    with pytest.raises(ValueError, match="not divisible by the 8 ranks"):
        ShardedBatches(1000, 60, 0, 8, seed=0)
    with pytest.raises(ValueError, match="larger than the training set"):
        ShardedBatches(100, 128, 0, 1, seed=0)
    assert check_divisible(96, 3) == 32


def test_augmentation_does_not_depend_on_the_number_of_ranks() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    whole = augment_shard(images, slice(0, 8), 8, seed=5)
    halves = [augment_shard(images[r * 4 : (r + 1) * 4], slice(r * 4, (r + 1) * 4), 8, seed=5) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(whole, images)
    assert not torch.equal(augment_shard(images, slice(0, 8), 8, seed=6), whole)


# --------------------------------------------------------------------------- schedules


def test_step_decay_at_epochs() -> None:
    schedule = make_lr_schedule(
        OptimConfig(lr=0.1, schedule="step", milestones=[2, 5], gamma=0.1), steps_per_epoch=10, total_steps=80,
        global_batch=128,
    )  # fmt: skip
    assert [schedule(s) for s in (0, 19)] == [0.1, 0.1]
    assert schedule(20) == pytest.approx(0.01) and schedule(49) == pytest.approx(0.01)
    assert schedule(50) == pytest.approx(0.001) and schedule(79) == pytest.approx(0.001)


def test_linear_decay() -> None:
    schedule = LRSchedule(peak=0.2, total_steps=100, kind="linear", end_lr=0.0)
    assert schedule(0) == pytest.approx(0.2)
    assert schedule(50) == pytest.approx(0.1)
    assert schedule(99) == pytest.approx(0.002)  # the last step still moves
    to_floor = LRSchedule(peak=0.2, total_steps=100, kind="linear", end_lr=0.1)
    assert to_floor(50) == pytest.approx(0.15)


def test_linear_decay_to_a_fraction_of_the_peak() -> None:
    # end_factor: the decay heads for a fraction of the peak lr, after the linear scaling rule (the skip study's
    # "linear decay coefficient"); it replaces end_lr.
    config = OptimConfig(lr=0.1, schedule="linear", end_factor=0.25, end_lr=0.05, base_batch_size=128)
    schedule = make_lr_schedule(config, steps_per_epoch=10, total_steps=100, global_batch=256)
    assert schedule.end_lr == pytest.approx(0.05) and schedule(0) == pytest.approx(0.2)
    assert schedule(50) == pytest.approx(0.125)
    assert make_lr_schedule(OptimConfig(lr=0.1, schedule="linear", end_lr=0.05), 10, 100, 256).end_lr == 0.05
    with pytest.raises(ConfigError, match=r"optim.end_factor must be in \[0, 1\]"):
        load_config(CONFIGS / "smoke.toml", ["optim.end_factor=1.5"])


def test_warmup_in_steps_and_epochs() -> None:
    schedule = LRSchedule(peak=0.4, total_steps=100, warmup_steps=4)
    assert [schedule(s) for s in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    by_epochs = make_lr_schedule(OptimConfig(lr=0.4, warmup_epochs=0.5), steps_per_epoch=8, total_steps=100,
                                 global_batch=64)  # fmt: skip
    assert by_epochs.warmup_steps == 4 and by_epochs(1) == pytest.approx(0.2)
    # Warmup, then linear decay from the peak.
    both = LRSchedule(peak=1.0, total_steps=14, kind="linear", warmup_steps=4)
    assert both(1) == pytest.approx(0.5) and both(4) == pytest.approx(1.0) and both(9) == pytest.approx(0.5)


def test_linear_scaling_rule() -> None:
    config = OptimConfig(lr=0.1, base_batch_size=256)
    assert peak_lr(config, 1024) == pytest.approx(0.4)
    assert peak_lr(config, 128) == pytest.approx(0.05)
    assert peak_lr(OptimConfig(lr=0.1), 1024) == 0.1  # off by default
    schedule = make_lr_schedule(config, steps_per_epoch=10, total_steps=50, global_batch=2048)
    assert schedule(30) == pytest.approx(0.8)


# --------------------------------------------------------------------------- configuration


def test_shipped_configs_are_valid() -> None:
    names = {p.name for p in CONFIGS.glob("*.toml")}
    needed = {"fashion_mlp_kfac.toml", "fashion_mlp_sgd.toml", "mnist_lenet_adam.toml", "cifar10_resnet_kfac.toml"}
    assert needed | {"smoke.toml"} <= names
    for path in CONFIGS.glob("*.toml"):
        config = load_config(path)
        assert config.run.out_dir
        resolve_data_path(config.data)


def test_overrides_are_typed_toml_values() -> None:
    config = load_config(
        SMOKE, ["optim.lr=0.2", "data.batch_size=256", "optim.milestones=[3, 6]", "model.name=lenet5",
                "optim.schedule='step'", "run.progress=true"],
    )  # fmt: skip
    assert config.optim.lr == 0.2 and config.data.batch_size == 256 and config.optim.milestones == [3, 6]
    assert config.model.name == "lenet5" and config.optim.schedule == "step" and config.run.progress is True
    assert config.data.train_examples == 512  # from the file
    assert parse_override("data.path=/data/cifar-10-batches-py") == ("data.path", "/data/cifar-10-batches-py")
    assert load_config(SMOKE, ["optim.momentum=0"]).optim.momentum == 0.0  # an integer is a fine float


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "unknown key 'optim.lrr' \\(did you mean 'lr'\\?\\)"),
        (["optimizer.lr=0.1"], "unknown section 'optimizer'"),
        (["optim.lr"], "expected section.key=value"),
        (["=3"], "expected section.key=value"),
        (["lr=0.1"], "must be section.key"),
        (["optim.lr=[0.1,"], "not a TOML value"),
        (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["data.batch_size=12.5"], "data.batch_size: expected an integer"),
        (["run.progress=1"], "run.progress: expected true or false"),
        (["data.name=imagenet"], "data.name = 'imagenet' is not known"),
        (["optim.name=lbfgs"], "optim.name = 'lbfgs' is not known"),
        (["run.steps=10"], "exactly one of run.epochs and run.steps"),
        (["optim.schedule=step"], "needs optim.milestones"),
    ],
)
def test_config_errors_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, overrides)


def test_unknown_key_in_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "mlp"\nhiden = [8]\n[run]\nepochs = 1\n')
    with pytest.raises(ValueError, match=r"unknown key 'model\.hiden' \(did you mean 'hidden'\?\)"):
        load_config(path)
    path.write_text("[training]\nepochs = 1\n")
    with pytest.raises(ValueError, match="unknown section \\[training\\]"):
        load_config(path)
    assert main(["--config", str(path), f"run.out_dir='{tmp_path / 'out'}'"]) == 2
    assert "unknown section [training]" in capsys.readouterr().err
    # [job] belongs to `python -m launch submit` (docs/launch.md): training ignores it.
    path.write_text('[job]\nnodes = 2\nwalltime = "01:00:00"\n[run]\nepochs = 3\n')
    assert load_config(path).run.epochs == 3
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- training runs


@pytest.mark.parametrize(
    "overrides", [("optim.name=sgd",), ("optim.name=adam", "optim.lr=0.003"), KFAC], ids=["sgd", "adam", "kfac"]
)
def test_smoke_run_writes_metrics_and_checkpoints_and_learns(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    assert train(out, *overrides) == 0
    records = read_metrics(out)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 8), (2, 16)] == [(r["epoch"], r["step"]) for r in evals]
    assert epochs[1]["loss"] < epochs[0]["loss"] - 0.1  # it learns
    assert evals[1]["test_loss"] < evals[0]["test_loss"] and evals[1]["test_accuracy"] > 0.5
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(records)
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(evals[-1]["test_accuracy"])
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["optim"]["name"] == overrides[0].split("=")[1] and resolved["derived"]["total_steps"] == 16
    files = sorted(p.name for p in (out / "checkpoints").iterdir())  # every 4 steps, the newest 2 kept
    assert files == ["ckpt-step00000012.manifest.json", "ckpt-step00000012.pt", "ckpt-step00000012.rank0.pt",
                     "ckpt-step00000016.manifest.json", "ckpt-step00000016.pt", "ckpt-step00000016.rank0.pt",
                     "latest"]  # fmt: skip
    rank0 = torch.load(out / "checkpoints" / "ckpt-step00000016.rank0.pt", weights_only=True)
    assert (rank0["kfac"] is not None) == ("optim.name=kfac" in overrides) and "torch" in rank0["rng"]
    assert not list(out.glob("**/*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    if rank0["kfac"] is None:
        assert "curvature_share" not in evals[-1] and summary["curvature_share"] is None
    else:  # the last evaluation's share is the one of the final checkpoint's decompositions, read another way
        assert [evals[-1]["curvature_share"], evals[-1]["curvature_energy"]] == pytest.approx(
            checkpoint_share(out, 16, resolved), rel=1e-9
        )
        assert 0 < evals[-1]["curvature_share"] < 1 and summary["curvature_share"] == evals[-1]["curvature_share"]
        assert list(evals[-1]["curvature_layers"]) == ["1", "3", "5"]  # the MLP's Linear layers


def checkpoint_share(out: Path, step: int, resolved: dict[str, Any]) -> list[float]:
    """The pooled curvature share and energy of the K-FAC states of every rank's checkpoint file at ``step``, each
    layer once."""
    layers = {}
    for path in sorted((out / "checkpoints").glob(f"ckpt-step{step:08d}.rank*.pt")):
        state = torch.load(path, weights_only=True)["kfac"]
        layers.update({s.layer: s for s in curvature_shares(state, resolved["kfac"]["damping"])})
    pooled = overall_share(list(layers.values()))
    return [pooled.share, pooled.energy]


@pytest.mark.parametrize(
    "overrides",
    [
        KFAC,
        ("model.name=lenet5", "optim.name=adam", "optim.lr=0.002", "data.augment=true", "optim.schedule=linear",
         "optim.warmup_steps=3"),
    ],
    ids=["mlp-kfac", "lenet-adam-augment"],
)  # fmt: skip
def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    common = (*overrides, "run.checkpoint_every=5", "kfac.inv_update_steps=3")
    assert train(tmp_path / "whole", *common) == 0
    # Stopped after step 13, as if killed: its newest checkpoint is step 10, so steps 11-13 are done again.
    assert train(tmp_path / "parts", *common, "run.stop_after_steps=13") == 0
    ref = find_latest(tmp_path / "parts")
    assert ref is not None and ref.step == 10
    assert max(r["step"] for r in read_metrics(tmp_path / "parts")) == 13
    assert train(tmp_path / "parts", *common, resume=True) == 0
    whole, parts = final_model(tmp_path / "whole"), final_model(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert without_timing(read_metrics(tmp_path / "parts")) == without_timing(read_metrics(tmp_path / "whole"))


def _checkpoint_steps(out_dir: Path) -> list[int]:
    return sorted(int(p.name[9:17]) for p in (out_dir / "checkpoints").glob("ckpt-step*.manifest.json"))


def test_timed_checkpoints_fall_on_logged_steps_and_leave_the_run_unchanged(tmp_path: Path) -> None:
    common = (*KFAC, "run.checkpoint_every=0", "run.keep_checkpoints=0", "run.log_every=3")
    assert train(tmp_path / "timed", *common, "run.checkpoint_every_s=1e-6") == 0
    assert train(tmp_path / "hourly", *common, "run.checkpoint_every_s=3600") == 0
    # Every logged step finds the interval passed (and the last step is logged and checkpointed once).
    assert _checkpoint_steps(tmp_path / "timed") == [3, 6, 9, 12, 15, 16]
    assert _checkpoint_steps(tmp_path / "hourly") == [16]
    timed, hourly = final_model(tmp_path / "timed"), final_model(tmp_path / "hourly")
    assert all(torch.equal(timed[k], hourly[k]) for k in timed)
    assert train(tmp_path / "bad", "run.checkpoint_every_s=-1") == 2


def test_resume_refuses_another_config_and_a_fresh_run_refuses_an_old_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(out, "run.stop_after_steps=4") == 0
    assert train(out) == 2
    assert "already holds a run (checkpoint ckpt-step00000004): pass --resume" in capsys.readouterr().err
    assert train(out, "optim.lr=0.3", resume=True) == 2
    assert "optim.lr: checkpoint 0.05, now 0.3" in capsys.readouterr().err
    assert train(out, "run.eval_every=2", resume=True) == 0  # bookkeeping keys may change


def test_progress_line_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        line = ProgressLine(10, stream=stream)
        line.update(5, "loss 1.0", force=True)
        line.close()
    assert terminal.getvalue().startswith("\rstep 5/10 (50%)") and "loss 1.0" in terminal.getvalue()
    assert pipe.getvalue() == ""
    quiet = Terminal()
    ProgressLine(10, enabled=False, stream=quiet).update(5, force=True)
    assert quiet.getvalue() == ""


def _launch(args: list[str], world: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if world is None:
        command = [sys.executable, "-m", "jobs.train", *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc-per-node={world}", "-m", "jobs.train", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_a_summary_and_exits_zero(tmp_path: Path) -> None:
    result = _launch(["--config", str(SMOKE), f"run.out_dir={tmp_path}", "run.steps=4", "run.epochs=0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: 4 steps (0.5 epochs)") and "test accuracy" in result.stdout
    failed = _launch(["--config", str(SMOKE), "optim.lr=-1"])
    assert failed.returncode == 2 and "optim.lr must be > 0" in failed.stderr


def test_two_ranks_under_torchrun_resume_like_the_uninterrupted_run(tmp_path: Path) -> None:
    common = ["--config", str(SMOKE), *KFAC, "run.checkpoint_every=5"]
    # The whole run also checkpoints on rank 0's clock, at every step: rank 1 must follow rank 0's decision.
    timed = ["run.checkpoint_every_s=1e-6", "run.keep_checkpoints=0"]
    whole = _launch([*common, f"run.out_dir={tmp_path / 'whole'}", *timed], world=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "whole") == list(range(1, 17))
    assert len(list((tmp_path / "whole" / "checkpoints").glob("ckpt-step*.rank1.pt"))) == 16
    stopped = _launch([*common, f"run.out_dir={tmp_path / 'parts'}", "run.stop_after_steps=7"], world=2)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == [
        "ckpt-step00000005.manifest.json", "ckpt-step00000005.pt", "ckpt-step00000005.rank0.pt",
        "ckpt-step00000005.rank1.pt", "latest"
    ]  # fmt: skip
    resumed = _launch([*common, f"run.out_dir={tmp_path / 'parts'}", "--resume"], world=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("done:") == 1  # rank 0 only
    a, b = final_model(tmp_path / "whole"), final_model(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["derived"]["local_batch_size"] == 32
    assert without_timing(read_metrics(tmp_path / "parts")) == without_timing(read_metrics(tmp_path / "whole"))


def test_two_mem_opt_ranks_record_the_curvature_share_of_every_layer_once(tmp_path: Path) -> None:
    """mem-opt: each rank holds the decompositions of its own layers only; the eval record pools them all, each once."""
    out = tmp_path / "mem-opt"
    done = _launch(["--config", str(SMOKE), *KFAC, "kfac.strategy='mem-opt'", f"run.out_dir={out}"], world=2)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(p, weights_only=True)["kfac"] for p in sorted(out.glob("checkpoints/ckpt-step00000016.rank*"))]
    held = [{name for name, layer in state["layers"].items() if layer["a_state"] is not None} for state in ranks]
    assert len(held) == 2 and held[0] and held[1] and not held[0] & held[1], held
    resolved = json.loads((out / "config.json").read_text())
    last = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    assert last["step"] == 16 and sorted(last["curvature_layers"]) == sorted(held[0] | held[1])
    assert [last["curvature_share"], last["curvature_energy"]] == pytest.approx(
        checkpoint_share(out, 16, resolved), rel=1e-9
    )


def test_a_model_whose_strided_1x1_convolution_channels_last_gets_wrong_runs_nchw() -> None:
    """torch 2.13's CPU weight gradient of a 1x1 stride-2 convolution with 2 to 7 input channels is wrong on
    channels-last input (by far more than rounding at 2 threads; a corrupted heap at 1): a ResNet of width 4 has
    such a shortcut (4 to 8 channels; on 8 x 8 images its gradient was 44x its norm off), so it runs NCHW and its
    float32 gradients are float64's up to rounding; channels-last is refused for it, and wider ResNets keep it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet", depth=8, width=4), (3, 8, 8), 10)
    assert [name for name, m in model.named_modules() if isinstance(m, CifarResNet) and not m.channels_last] == [""]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    F.cross_entropy(model(x), y).backward()
    reference = copy.deepcopy(model).double()
    reference.zero_grad()
    F.cross_entropy(reference(x.double()), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        error = float((p.grad.double() - q.grad).norm() / q.grad.norm())
        assert error < 1e-3, (name, error)
    with pytest.raises(ValueError, match=r"1x1 strided convolution\(s\) stages.1.shortcut.0 with fewer"):
        set_channels_last(model, True)
    assert build_model(ModelConfig(name="resnet", depth=8, width=8), (3, 8, 8), 10).channels_last
