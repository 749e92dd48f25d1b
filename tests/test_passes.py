"""run.micro_batch (jobs.passes): a step's batch in several forward/backward passes is the one-pass step up to
float32 rounding, for SGD, Adam and K-FAC, in real training runs; the automatic choice and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from jobs.config import ConfigError, ModelConfig
from jobs.metrics import read_metrics
from jobs.models import build_model
from jobs.passes import AUTO_PASS_EXAMPLES, pass_examples
from tests.test_train import KFAC, final_model, train

CPU = torch.device("cpu")
# 256 examples a step, 4 steps on the smoke config's 512 Fashion-MNIST images (an MLP with ReLUs; a small ConvNet).
STEPS = ("data.batch_size=256", "run.epochs=2", "run.checkpoint_every=0")
# K-FAC without the KL clip, as the studies run it (the clipped step does not depend on the gradient's scale), and
# its damping 0.1, not the default 1e-3: with 1e-3 the first layer's (A + damping) amplifies float32 rounding
# about 1e3-fold, and the two orders of summation parted by up to 7e-4 in the loss after 4 steps.
OPTIMIZERS = {
    "sgd": (),
    "adam": ("optim.name=adam", "optim.lr=0.003"),
    "kfac": (*KFAC, "kfac.damping=0.1", "kfac.kl_clip=0"),
    "kfac-convnet": (
        *KFAC,
        "kfac.damping=0.1",
        "kfac.kl_clip=0",
        'model.name="convnet"',
        "model.channels=[4, 4, 4, 4]",
        "model.hidden=[16]",
    ),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_step_in_passes_is_the_one_pass_step(tmp_path: Path, optimizer: str) -> None:
    """Passes of 64 against one pass of 256: the same losses and weights after 4 steps up to float32 rounding
    (sums in another order; a ReLU input near 0 can land on the other side, so the weights are compared in norm),
    and config.json says how many examples each pass took."""
    runs = {}
    for micro_batch in (256, 64):
        out = tmp_path / f"m{micro_batch}"
        assert train(out, *STEPS, *OPTIMIZERS[optimizer], f"run.micro_batch={micro_batch}") == 0
        derived = json.loads((out / "config.json").read_text())["derived"]
        assert derived["pass_examples"] == micro_batch
        losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "step"]
        runs[micro_batch] = (losses, final_model(out))
    (losses_one, weights_one), (losses_four, weights_four) = runs[256], runs[64]
    assert len(losses_one) == 4
    torch.testing.assert_close(torch.tensor(losses_four), torch.tensor(losses_one), rtol=1e-4, atol=0.0)
    moved = []
    for name, one in weights_one.items():
        moved.append(float((weights_four[name] - one).norm() / one.norm()))
    print(f"{optimizer}: weights moved by {max(moved):.1e} of their norm")
    assert max(moved) < 1e-4, moved


def test_the_automatic_pass_size_on_the_cpu() -> None:
    """Passes of 64 from batch 512 on in conv models on the CPU, where that changes only the rounding; the whole
    batch elsewhere."""
    plain = build_model(ModelConfig(name="convnet", channels=[4], hidden=[8]), (3, 32, 32), 10)
    assert pass_examples(0, 8192, plain, CPU, None) == AUTO_PASS_EXAMPLES == 64
    assert pass_examples(0, 512, plain, CPU, "example") == 64
    assert pass_examples(0, 256, plain, CPU, None) == 256  # below the measured batches
    assert pass_examples(0, 512 + 32, plain, CPU, None) == 544  # not a multiple of 64
    assert pass_examples(0, 8192, plain, torch.device("meta"), None) == 8192  # not the CPU: not measured
    assert pass_examples(0, 8192, nn.Sequential(nn.Linear(4, 4)), CPU, None) == 8192  # no convolution: neither
    assert pass_examples(0, 8192, plain, CPU, "batch") == 8192  # K-FAC's G would depend on the pass's size
    for layer in (nn.BatchNorm1d(8), nn.Dropout(0.1)):  # the step itself would change
        assert pass_examples(0, 8192, nn.Sequential(plain, layer), CPU, None) == 8192


def test_a_pass_size_that_would_change_the_step_is_refused_with_the_fix() -> None:
    model = nn.Linear(4, 2)
    assert pass_examples(64, 256, model, CPU, "example") == 64
    with pytest.raises(ConfigError, match=r"run.micro_batch = 96 does not divide this rank's batch of 256.*divisor"):
        pass_examples(96, 256, model, CPU, None)
    with pytest.raises(ConfigError, match=r"kfac.g_scale = 'batch'.*use kfac.g_scale = 'example'"):
        pass_examples(64, 256, model, CPU, "batch")
    with pytest.raises(ConfigError, match=r"run.micro_batch must be >= 0"):
        pass_examples(-1, 256, model, CPU, None)


def test_a_bad_pass_size_stops_the_run_before_its_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path / "bad", *STEPS, "run.micro_batch=100") == 2
    assert "run.micro_batch = 100 does not divide this rank's batch of 256" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("ckpt-*"))


def test_the_micro_batch_benchmark_times_each_pass_size_and_names_an_unknown_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import micro_batches

    out = tmp_path / "passes.json"
    argv = ["--batch-sizes", "16,24", "--pass-sizes", "8,5", "--steps", "1", "--rounds", "1", "--out", str(out)]
    assert micro_batches.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    # one pass and passes of 8 for each batch; 5 divides neither
    assert [(r["kind"], r["batch_size"], r["pass_size"]) for r in rows] == [
        (kind, b, p) for kind in ("sgd", "kfac") for b in (16, 24) for p in (b, 8)
    ]
    assert all(r["seconds"] > 0 and r["one_pass_over_passes"] > 0 for r in rows)
    assert "| convnet | kfac | 24 | 8 |" in capsys.readouterr().out
    assert micro_batches.main(["--models", "vgg"]) == 2
    assert "unknown model(s) vgg" in capsys.readouterr().err
