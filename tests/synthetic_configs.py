"""Test data: the TOML of a small MLP on the synthetic data set, the base config of the hpo and study tests."""

from __future__ import annotations


def synthetic_mlp_toml(*, batch_size: int, train_size: int, test_size: int, lr: str, run: str) -> str:
    """A config text; ``lr`` and the ``[run]`` table's lines (``run``) are inserted as given."""
    return f"""
[model]
name = "mlp"
hidden = [16]
[data]
name = "synthetic"
batch_size = {batch_size}
synthetic_shape = [8]
synthetic_classes = 4
synthetic_train_size = {train_size}
synthetic_test_size = {test_size}
[optim]
name = "sgd"
lr = {lr}
[run]
{run}
"""
