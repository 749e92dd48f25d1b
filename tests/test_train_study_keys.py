"""The training loop's batch-size-study keys: stop at a target accuracy, the gradient noise scale during training
(also on two ranks), the final training-split evaluation, and their config errors. About 30 s on 2 CPU cores."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from jobs.checkpoint import find_latest, shared_file
from jobs.config import ConfigError, ModelConfig, build_config
from jobs.loop import run_training
from jobs.metrics import read_metrics
from jobs.models import build_model
from jobs.noise_scale import measure_noise
from jobs.parallel import SingleContext
from jobs.train import main
from tests.processes import ENV, PYTHON, ROOT

SMOKE = ROOT / "jobs" / "configs" / "smoke.toml"
KFAC = ("optim.name=kfac", "optim.momentum=0.5")
# Overlapping Gaussian classes: per-example gradients disagree, and the noise scale (B_simple about 20-90 here) is of
# the order of the batch (64), where it is worth measuring.
NOISY = (
    "data.name=synthetic", "data.synthetic_shape=[16]", "data.synthetic_classes=4", "data.synthetic_separation=2.0",
    "data.synthetic_train_size=512", "data.synthetic_test_size=256", "data.train_examples=0", "data.test_examples=0",
    "model.hidden=[32]", "run.steps=16", "run.epochs=0", "run.eval_every=0",
)  # fmt: skip


def train(out_dir: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["--config", str(SMOKE), f"run.out_dir='{out_dir}'", *overrides]
    return main([*argv, "--resume"] if resume else argv)


def summary(out_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out_dir / "summary.json").read_text())
    return result


def final_model(out_dir: Path) -> dict[str, torch.Tensor]:
    ref = find_latest(out_dir)
    assert ref is not None, f"no checkpoint in {out_dir}"
    state: dict[str, torch.Tensor] = torch.load(shared_file(ref.folder, ref.name), weights_only=True)["model"]
    return state


def without(records: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    drop = {"seconds", "examples_per_second", *keys}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


# --------------------------------------------------------------------------- target accuracy


def test_a_reached_target_stops_the_run_at_that_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Test accuracies of this run every 2 steps: .20 .36 .36 .50 .48 .54 .59 .63; 0.52 is first reached mid-epoch.
    common = ("run.eval_every_steps=2", "run.target_accuracy=0.52", "run.checkpoint_every=0")
    assert train(out, *common) == 0
    records = read_metrics(out)
    evals = [r for r in records if r["kind"] == "eval"]
    first = next(r["step"] for r in evals if r["test_accuracy"] >= 0.52)
    assert first < 16 and first % 8  # stopped early, inside the second epoch
    assert all(r["step"] % 2 == 0 for r in evals) and evals[-1]["step"] == first
    assert max(r["step"] for r in records) == first and records[-1] == {**records[-1], "kind": "epoch", "step": first}
    result = summary(out)
    assert result["steps"] == first and result["total_steps"] == 16 and not result["stopped_early"]
    assert result["reached_target"] and result["steps_to_target"] == first and result["target_accuracy"] == 0.52
    assert result["examples_to_target"] == first * 64
    assert result["test_accuracy"] == pytest.approx(evals[-1]["test_accuracy"])
    assert 0.4 < result["train_accuracy"] <= 1 and result["train_loss"] > 0 and result["noise_scale"] is None
    ref = find_latest(out)
    assert ref is not None and ref.step == first  # the final checkpoint, as at the end of a run
    # Resuming a run that stopped at its target trains nothing and reports the same step.
    assert train(out, *common, resume=True) == 0
    assert summary(out)["steps"] == first and summary(out)["steps_to_target"] == first
    assert max(r["step"] for r in read_metrics(out)) == first


def test_an_unreachable_target_runs_to_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train(out, "run.target_accuracy=0.999", "run.train_eval_examples=100") == 0
    result = summary(out)
    assert result["steps"] == 16 and not result["reached_target"] and result["steps_to_target"] is None
    assert result["examples_to_target"] is None and result["target_accuracy"] == 0.999
    assert 0 < result["train_accuracy"] <= 1 and math.isfinite(result["train_loss"])
    assert max(r["step"] for r in read_metrics(out)) == 16
    assert train(tmp_path / "cli", "run.target_accuracy=0.999", "run.steps=2", "run.epochs=0") == 0
    assert "target accuracy 0.999 not reached" in capsys.readouterr().out


# --------------------------------------------------------------------------- noise scale


@pytest.mark.parametrize("optimizer", [("optim.name=sgd",), KFAC], ids=["sgd", "kfac"])
def test_noise_scale_is_recorded_and_does_not_change_the_trajectory(tmp_path: Path, optimizer: tuple[str, ...]) -> None:
    common = (*NOISY, *optimizer, "run.log_every=4")
    assert train(tmp_path / "plain", *common) == 0
    assert train(tmp_path / "noise", *common, "run.noise_every=3") == 0
    plain, noise = final_model(tmp_path / "plain"), final_model(tmp_path / "noise")
    assert all(torch.allclose(plain[k], noise[k], rtol=0, atol=1e-6) for k in plain)
    records = read_metrics(tmp_path / "noise")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [3, 4, 6, 8, 9, 12, 15, 16]  # log_every=4, plus every measuring step
    measured = [r for r in steps if r["step"] % 3 == 0]
    assert all("noise_trace" in r and "noise_grad_sq" in r for r in measured)
    assert not any("noise_trace" in r for r in steps if r["step"] % 3)
    last = measured[-1]["noise_scale"]
    assert math.isfinite(last) and 1 < last < 512 and summary(tmp_path / "noise")["noise_scale"] == pytest.approx(last)
    # The measuring run's other records are those of the plain run at the same steps.
    plain_records = {(r["kind"], r["step"]): r for r in without(read_metrics(tmp_path / "plain"))}
    for record in without(records, "noise_scale", "noise_trace", "noise_grad_sq"):
        other = plain_records.get((record["kind"], record["step"]))
        if other is not None:
            assert record.keys() == other.keys()
            assert all(_close(record[k], other[k]) for k in record if k != "kind")


def _close(value: Any, other: Any) -> bool:
    """Equal to 1e-6, also inside a record's mappings (K-FAC's curvature_layers)."""
    if isinstance(value, dict):
        same_keys = isinstance(other, dict) and value.keys() == other.keys()
        return same_keys and all(_close(value[k], other[k]) for k in value)
    return bool(value == pytest.approx(other, rel=1e-6))


def test_noise_state_survives_a_resume(tmp_path: Path) -> None:
    common = (*NOISY, "run.noise_every=2", "run.checkpoint_every=6")
    assert train(tmp_path / "whole", *common) == 0
    assert train(tmp_path / "parts", *common, "run.stop_after_steps=9") == 0
    assert train(tmp_path / "parts", *common, resume=True) == 0
    assert without(read_metrics(tmp_path / "parts")) == without(read_metrics(tmp_path / "whole"))
    assert summary(tmp_path / "parts")["noise_scale"] == summary(tmp_path / "whole")["noise_scale"]


def test_measure_noise_keeps_batch_norm_statistics_grads_and_kfac_factors() -> None:
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 4, (10,))
    factors = []
    for measure in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="resnet", depth=8, width=4), (3, 8, 8), 4)
        precond = KFACPreconditioner(model, lr=0.1)
        if measure:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with precond.paused():
                small, b_small, big, b_big = measure_noise(model, x, y, SingleContext())
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats and counts, weights
            assert all(p.grad is None for p in model.parameters())
            assert (b_small, b_big) == (5, 10) and float(small) > float(big) > 0
        F.cross_entropy(model(x), y).backward()
        precond.step()
        factors.append(precond.state_dict()["layers"])
    # The measuring passes added nothing to the factors of the training step that followed.
    plain, measured = factors
    # BatchNorm layers have no A (their unit-wise blocks are their G): None on both sides.
    pairs = [(plain[n][k], measured[n][k]) for n in plain for k in ("A", "G")]
    assert all(a is b is None or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)
    assert any(a is not None for a, _ in pairs)


@pytest.mark.parametrize("pass_size", [None, 4, 3, 1])  # one pass per half; passes of 3 + 1 examples; of 1
def test_measure_noise_norms_are_those_of_the_half_and_full_batch_gradients(pass_size: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))  # odd: the last example is left out

    def grad_sq(xs: torch.Tensor, ys: torch.Tensor) -> float:
        grads = torch.autograd.grad(F.cross_entropy(model(xs), ys), list(model.parameters()))
        return float(sum(g.square().sum() for g in grads))

    small, b_small, big, b_big = measure_noise(model, x, y, SingleContext(), pass_size)
    assert (b_small, b_big) == (4, 8)
    assert float(small) == pytest.approx((grad_sq(x[:4], y[:4]) + grad_sq(x[4:8], y[4:8])) / 2, rel=1e-5)
    assert float(big) == pytest.approx(grad_sq(x[:8], y[:8]), rel=1e-5)


_TWO_RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from distkfac.comm import leave
from jobs.noise_scale import measure_noise
from jobs.parallel import SingleContext
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
local = slice(8 * rank, 8 * rank + 8)
context = SingleContext(rank=rank, world_size=2, kind="torch")
small, b_small, big, b_big = measure_noise(model, x[local], y[local], context)
if rank == 0:
    with open(sys.argv[1], "w") as out:
        json.dump([float(small), b_small, float(big), b_big], out)
leave(0)  # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13)
"""


def test_measure_noise_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    script, result = tmp_path / "two_ranks.py", tmp_path / "result.json"
    script.write_text(_TWO_RANK_SCRIPT)
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", str(script), str(result)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    small, b_small, big, b_big = json.loads(result.read_text())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def grad_sq(part: slice) -> float:
        grads = torch.autograd.grad(F.cross_entropy(model(x[part]), y[part]), list(model.parameters()))
        return float(sum(g.square().sum() for g in grads))

    assert (b_small, b_big) == (4, 16)
    assert big == pytest.approx(grad_sq(slice(0, 16)), rel=1e-5)  # the global batch's gradient
    assert small == pytest.approx(sum(grad_sq(slice(i, i + 4)) for i in range(0, 16, 4)) / 4, rel=1e-5)


def test_two_ranks_with_ddp_record_the_noise_scale(tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    args = ["--config", str(SMOKE), f"run.out_dir={out}", "run.noise_every=2", "run.target_accuracy=0.999"]
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", "-m", "jobs.train", *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1 and "target accuracy 0.999 not reached" in done.stdout
    steps = [r for r in read_metrics(out) if r["kind"] == "step"]
    assert all(("noise_trace" in r) == (r["step"] % 2 == 0) for r in steps)
    assert summary(out)["train_accuracy"] is not None


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.target_accuracy=1.5"], r"run\.target_accuracy must be in \(0, 1\]"),
        (["run.target_accuracy=-0.1"], r"run\.target_accuracy must be in \(0, 1\]"),
        (["run.noise_every=2", "data.batch_size=1"], r"run\.noise_every needs .* data\.batch_size = 1"),
        (["run.noise_every=-1"], r"run\.noise_every must be >= 0"),
        (["run.eval_every_steps=-2"], r"run\.eval_every_steps must be >= 0"),
        (["run.train_eval_examples=-1"], r"run\.train_eval_examples must be >= 0"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"run": {"epochs": 1}}, overrides)


def test_noise_every_needs_two_examples_per_rank(tmp_path: Path) -> None:
    config = build_config(
        {"data": {"name": "synthetic", "batch_size": 2}, "run": {"steps": 2, "noise_every": 1}},
        [f"run.out_dir='{tmp_path}'", "run.tensorboard=false"],
    )
    # Rank 0 of 2 (no collective runs before the check): a local batch of 1.
    with pytest.raises(ConfigError, match=r"run\.noise_every needs at least 2 examples per rank.* = 1"):
        run_training(config, SingleContext(rank=0, world_size=2), log=lambda _: None)


def test_trajectory_keys_block_a_resume_and_evaluation_keys_do_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(out, "run.stop_after_steps=4") == 0
    assert train(out, "run.noise_every=2", resume=True) == 2
    assert "run.noise_every: checkpoint 0, now 2" in capsys.readouterr().err
    assert train(out, "run.target_accuracy=0.9", resume=True) == 2
    assert train(out, "run.eval_every_steps=4", "run.train_eval_examples=64", resume=True) == 0


def _float_keys() -> dict[str, bool]:
    """Every key of the configuration that holds a float, and whether it holds a list of them."""
    import typing

    from jobs.config import SECTIONS

    return {
        f"{section}.{key}": tp == list[float]
        for section, cls in SECTIONS.items()
        for key, tp in typing.get_type_hints(cls).items()
        if tp is float or tp == list[float]
    }


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_for_every_float_key(value: str) -> None:
    keys = _float_keys()
    assert {"optim.lr", "optim.betas", "kfac.damping", "run.target_accuracy"} <= set(keys)
    assert keys["optim.betas"] and keys["data.teacher_singular_values"]
    for key, is_list in keys.items():
        text = f"[{value}, 0.9]" if is_list else value
        shown = f"{key}[0]" if is_list else key
        with pytest.raises(ConfigError, match=rf"^{re.escape(shown)}: {re.escape(value)} is not a usable value"):
            build_config({"run": {"epochs": 1}}, [f"{key}={text}"])


def test_nan_lr_stops_the_cli_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "optim.lr=nan") == 2
    assert "optim.lr: nan is not a usable value: give a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_target_of_one_is_accepted_by_the_run_and_by_the_study(tmp_path: Path) -> None:
    from study.config import StudyError, check_cells, load_study

    assert build_config({"run": {"epochs": 1}}, ["run.target_accuracy=1.0"]).run.target_accuracy == 1.0
    (tmp_path / "base.toml").write_text('[data]\nname = "synthetic"\n[run]\nsteps = 4\n')
    study = """
[study]
name = "one"
base_config = "base.toml"
optimizers = ["sgd"]
batch_sizes = [32]
target_accuracy = TARGET
max_steps = 8
eval_every_steps = 2
[given.sgd]
"optim.lr" = 0.1
"""
    (tmp_path / "one.toml").write_text(study.replace("TARGET", "1.0"))
    loaded = load_study(tmp_path / "one.toml", tmp_path / "out")
    assert [c.run.target_accuracy for c in check_cells(loaded).values()] == [1.0]
    for target in ("1.5", "nan"):
        (tmp_path / "bad.toml").write_text(study.replace("TARGET", target))
        with pytest.raises(StudyError, match=r"cannot be reached: give an accuracy in \[0, 1\]"):
            load_study(tmp_path / "bad.toml", tmp_path / "out")
