"""The small Vision Transformer (model.name = "vit"): shapes, what K-FAC preconditions in it, its config keys, and
short real training runs on Fashion-MNIST with K-FAC and with AdamW. About 15 s on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import distkfac
from jobs.config import ConfigError, ModelConfig, build_config, ignored_keys
from jobs.metrics import read_metrics
from jobs.models import Attention, VisionTransformer, build_model
from jobs.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
SMALL = ModelConfig(name="vit", width=32, depth=2, heads=4, patch=7, mlp_ratio=2)


def test_vit_shapes_tokens_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(SMALL, (1, 28, 28), 10)
    assert isinstance(model, VisionTransformer)
    x = torch.randn(5, 1, 28, 28)
    patches = model.patches(x)
    assert patches.shape == (5, 16, 49)  # 4 x 4 patches of 7 x 7 pixels
    # the second patch of the first row is pixels [0:7, 7:14], flattened row by row
    assert torch.equal(patches[0, 1], x[0, 0, 0:7, 7:14].reshape(-1))
    assert model.embed(patches).shape == (5, 16, 32)
    assert model.position.shape == (1, 16, 32)
    out = model(x)
    assert out.shape == (5, 10)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # colour images: 3 x 32 x 32 with patch 4 gives 64 tokens of 48 values
    cifar = build_model(ModelConfig(name="vit", width=16, depth=1, heads=2, patch=4), (3, 32, 32), 10)
    assert isinstance(cifar, VisionTransformer)
    assert cifar.embed.in_features == 48 and cifar.position.shape == (1, 64, 16)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vit_attention_is_plain_linear_layers_and_no_multihead_module() -> None:
    model = build_model(SMALL, (1, 28, 28), 10)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attention) == 2
    assert all(isinstance(getattr(a, name), nn.Linear) for a in attention for name in ("q", "k", "v", "out"))
    kinds = {type(m) for m in model.modules()}
    assert {nn.LayerNorm, nn.GELU} <= kinds


def test_kfac_preconditions_the_embedding_attention_and_mlp_layers() -> None:
    torch.manual_seed(0)
    model = build_model(SMALL, (1, 28, 28), 10)
    assert isinstance(model, VisionTransformer)
    precond = distkfac.KFACPreconditioner(model, inv_update_steps=1)
    expected = ["embed"]
    for block in range(2):
        expected += [f"blocks.{block}.ln1", *(f"blocks.{block}.attn.{name}" for name in ("q", "k", "v", "out"))]
        expected += [f"blocks.{block}.ln2", f"blocks.{block}.fc1", f"blocks.{block}.fc2"]
    assert precond.layer_names == [*expected, "norm", "head"]  # LayerNorms by their unit-wise blocks
    # one step: the embedding, applied to 16 tokens per image, gets a preconditioned gradient
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
    loss.backward()
    grad = model.embed.weight.grad
    assert grad is not None
    plain = grad.clone()
    precond.step()
    assert not torch.allclose(plain, grad)  # preconditioned in place


def test_vit_config_keys_and_errors() -> None:
    config = build_config({"model": {"name": "vit", "width": 64, "depth": 2, "heads": 4}, "run": {"epochs": 1}})
    assert (config.model.patch, config.model.mlp_ratio) == (7, 2)
    assert ignored_keys(config) == []
    with pytest.raises(ConfigError, match=r"model\.width = 30 is not a multiple of model\.heads = 4"):
        build_config({"model": {"name": "vit", "width": 30}, "run": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"model\.patch must be > 0"):
        build_config({"model": {"name": "vit", "patch": 0}, "run": {"epochs": 1}})
    with pytest.raises(ValueError, match=r"model\.patch = 5 does not divide the 28 x 28 images"):
        build_model(ModelConfig(name="vit", width=16, patch=5), (1, 28, 28), 10)
    with pytest.raises(ValueError, match="needs images"):
        build_model(SMALL, (32,), 10)
    mlp = build_config({"model": {"name": "mlp", "heads": 2}, "run": {"epochs": 1}})
    assert ignored_keys(mlp) == ["model.heads (not used by mlp)"]


@pytest.mark.parametrize("config", ["vit_fashion_kfac.toml", "vit_fashion_adamw.toml"], ids=["kfac", "adamw"])
def test_short_real_run_on_fashion_mnist_learns(tmp_path: Path, config: str) -> None:
    """The shipped configs, cut to 96 steps of 64 on 2048 real Fashion-MNIST images (no warmup, a narrower model)."""
    out = tmp_path / "run"
    overrides = [
        f"run.out_dir='{out}'", "run.epochs=3", "data.train_examples=2048", "data.batch_size=64",
        "data.test_examples=512", "optim.warmup_steps=0", "model.width=32", "run.progress=false", "run.threads=1",
        "run.checkpoint_every=0",
    ]  # fmt: skip
    assert main(["--config", str(CONFIGS / config), *overrides]) == 0
    records = read_metrics(out)
    epochs = [r for r in records if r["kind"] == "epoch"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in epochs] == [32, 64, 96]
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.2  # it learns
    assert evals[-1]["test_loss"] < evals[0]["test_loss"] and evals[-1]["test_accuracy"] > 0.5
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[-1]["loss"] < 0.75 * steps[0]["loss"]
    assert ("kl_scale" in steps[-1]) == (config == "vit_fashion_kfac.toml")  # K-FAC ran in the kfac run only
