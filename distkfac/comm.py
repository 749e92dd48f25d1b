"""The communicator: every exchange between ranks goes through one object, called explicitly by the preconditioner.

In a single process each exchange is a no-op. Distributed communicators implement the same three calls.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Communicator(Protocol):
    """How factors, decompositions and preconditioned gradients travel between ranks."""

    rank: int
    world_size: int

    def average_factors(self, factors: list[torch.Tensor]) -> None:
        """Average the batch factors of all ranks, in place, before they enter the running averages."""

    def share_decompositions(self, states: list[list[torch.Tensor]]) -> None:
        """Give every rank that needs them the decompositions that another rank computed."""

    def share_gradients(self, grads: list[torch.Tensor]) -> None:
        """Give every rank the preconditioned gradients that another rank computed."""


class SingleProcessCommunicator:
    """One process holds everything: nothing travels."""

    rank = 0
    world_size = 1

    def average_factors(self, factors: list[torch.Tensor]) -> None:
        return None

    def share_decompositions(self, states: list[list[torch.Tensor]]) -> None:
        return None

    def share_gradients(self, grads: list[torch.Tensor]) -> None:
        return None
