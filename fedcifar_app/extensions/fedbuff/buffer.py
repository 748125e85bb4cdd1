"""FedBuff's server step (Nguyen et al., AISTATS 2022): buffered, staleness-weighted
updates.

A client trains on the global model of some version v and sends back its weights; its
update is their difference from version v. When it arrives the server is at version
v + tau (tau: its staleness), and the update joins the buffer weighted by
``staleness_weight(tau)`` and by the client's training examples. Once the buffer
holds ``buffer-size`` updates the server steps:

    x <- x + server_lr * sum_i(n_i * s(tau_i) * update_i) / sum_i(n_i)

With equal n_i this is the paper's x <- x + lr * mean(s(tau_i) * update_i): staleness
shrinks the step, it is not normalised away. With no staleness and a server learning
rate of 1 a step is FedAvg's weighted mean of the buffered clients' models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord

# How much an update of staleness tau counts: the paper's 1/sqrt(1 + tau), 1/(1 + tau)
# (FedAsync's polynomial rule with a = 1), or 1 (no weighting).
STALENESS_WEIGHTS: dict[str, Callable[[int], float]] = {
    "inverse-sqrt": lambda tau: 1.0 / math.sqrt(1.0 + tau),
    "inverse": lambda tau: 1.0 / (1.0 + tau),
    "none": lambda tau: 1.0,
}


class UpdateBuffer:
    """The updates since the last server step, weighted as they arrive."""

    def __init__(self, staleness_weighting: str) -> None:
        self.weight_of = STALENESS_WEIGHTS[staleness_weighting]
        self.clear()

    def clear(self) -> None:
        self.weighted_sum: dict[str, np.ndarray] = {}
        self.examples = 0
        self.staleness: list[int] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def __len__(self) -> int:
        return len(self.staleness)

    def add(self, trained: ArrayRecord, base: ArrayRecord, examples: int, staleness: int,
            metrics: dict[str, float]) -> None:
        """Buffer the update ``trained - base`` of a client with ``examples`` examples."""
        weight = examples * self.weight_of(staleness)
        for key in base:
            update = trained[key].numpy().astype(np.float64) - base[key].numpy()
            if key in self.weighted_sum:
                self.weighted_sum[key] += weight * update
            else:
                self.weighted_sum[key] = weight * update
        self.examples += examples
        self.staleness.append(staleness)
        self.metrics.append((examples, metrics))

    def step(self, current: ArrayRecord, server_lr: float) -> ArrayRecord:
        """The next global model: ``current`` moved by the buffered updates."""
        stepped = {}
        for key in current:
            start = current[key].numpy()
            moved = start + server_lr * self.weighted_sum[key] / self.examples
            if not np.issubdtype(start.dtype, np.floating):
                moved = np.rint(moved)
            stepped[key] = Array(moved.astype(start.dtype))
        return ArrayRecord(stepped)

    def mean_metrics(self) -> dict[str, float]:
        """The buffered clients' numeric metrics, weighted by their examples."""
        names = set.intersection(*(set(m) for _, m in self.metrics)) if self.metrics else set()
        return {name: sum(n * float(m[name]) for n, m in self.metrics) / self.examples
                for name in sorted(names) if name != "num-examples"}
