"""Multiplexed mode's messages, and the one result a node sends for many clients.

(Pure PyTorch; the server side is ``strategies/multiplex.py``.) A node that serves
several virtual clients in a round gets one message whose ``VIRTUAL_CLIENTS``
ConfigRecord lists them and the reply wanted, and sends one weighted mean of their models and metrics,
with their total weight. The server's weighted average over such replies is the
weighted average over the clients, as if each had replied on its own. Before a
client's model joins the mean, it passes what the server checks of each update in
per-node mode: finite weights, and, with update-norm-bound, an update clipped to
that L2 norm.
"""

from __future__ import annotations

import math

import torch

StateDict = dict[str, torch.Tensor]
# The ConfigRecord of a bundle ('partition-ids' to serve, 'reply' kind) and of its reply
# ('served', 'failed' with 'failure-reasons', 'rejected', 'clipped', 'train-seconds').
VIRTUAL_CLIENTS = "virtual-clients"
# Reply kinds: one weighted mean of the clients' results, or each client's result
# (for aggregators that need every update), in records named "<record>/<client>".
MEAN, EACH = "mean", "each"
SEPARATOR = "/"
# With DP every client weighs 1 in the average (DP-FedAvg): this metric, which a
# multiplexed node's reply sums over its clients.
DP_WEIGHT = "dp-weight"
# With dp='client', a per-node reply's metric: 1 if the client clipped its update.
DP_CLIPPED = "dp-clipped"
# Metrics that are counts: summed over the clients, not averaged.
COUNTS = ("num-examples", "eval-num-examples", DP_WEIGHT)
# Metrics named eval-* from evaluate-in-train are weighted by this count, as the server
# weights them (see strategies/safeguards.py); all others by num-examples.
EVAL_PREFIX, EVAL_WEIGHT = "eval-", "eval-num-examples"


def non_finite(weights: StateDict) -> str | None:
    """The first tensor holding NaN or Inf, or None.

    The fast path sums each tensor (a tenth of the cost of isfinite on every value,
    paid once per client): a sum is finite unless a value is NaN or Inf, or the
    values are too large to add up, which no trained model has."""
    floats = [t for t in weights.values() if t.is_floating_point()]
    if math.isfinite(sum(float(t.sum()) for t in floats)):
        return None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"'{name}' holds NaN or Inf"
    return "its weights are too large to add up (over 1e38)"


def clip_update(weights: StateDict, start: StateDict, bound: float) -> bool:
    """Shorten ``weights - start`` to L2 norm ``bound`` in place (the norm over all
    tensors, as Flower's clipping measures it); return whether it was longer."""
    squared = sum(float((weights[k].double() - start[k].double()).pow(2).sum())
                  for k in start)
    norm = math.sqrt(squared)
    if norm <= bound:
        return False
    for name, reference in start.items():
        update = (weights[name].double() - reference.double()) * (bound / norm)
        weights[name] = (reference.double() + update).to(weights[name].dtype)
    return True


class ClientMean:
    """Running weighted mean of client models (weight: the metric ``weight_key``,
    num-examples unless DP) and of their metrics, plus the plain mean of per-client
    tensors such as SCAFFOLD's control deltas (the server averages those per client,
    unweighted)."""

    def __init__(self, weight_key: str = "num-examples") -> None:
        self.weight_key = weight_key
        self.clients = 0
        self.total_weight = 0.0
        self._weighted_sum: StateDict = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._metrics: list[dict[str, float]] = []
        self._plain_sum: StateDict = {}

    def add(self, weights: StateDict | None, metrics: dict[str, float],
            per_client: StateDict | None = None) -> None:
        weight = float(metrics[self.weight_key])
        self.clients += 1
        self.total_weight += weight
        self._metrics.append(metrics)
        if weights is not None:
            _accumulate(self._weighted_sum, weights, weight, self._dtypes)
        if per_client is not None:
            _accumulate(self._plain_sum, per_client, 1.0, {})

    def model(self) -> StateDict:
        return {k: (v / self.total_weight).to(self._dtypes[k])
                for k, v in self._weighted_sum.items()}

    def per_client_mean(self) -> StateDict:
        return {k: (v / self.clients).float().cpu() for k, v in self._plain_sum.items()}

    def metrics(self) -> dict[str, float]:
        """Counts summed; every other metric weighted as the server weights it."""
        merged = {}
        for name in self._metrics[0]:
            if name in COUNTS:
                merged[name] = sum(m[name] for m in self._metrics)
                continue
            weight_key = (EVAL_WEIGHT if name.startswith(EVAL_PREFIX)
                          and EVAL_WEIGHT in self._metrics[0] else self.weight_key)
            total = sum(float(m[weight_key]) for m in self._metrics)
            merged[name] = sum(float(m[name]) * float(m[weight_key])
                               for m in self._metrics) / total if total else 0.0
        return merged


def _accumulate(sums: StateDict, tensors: StateDict, weight: float,
                dtypes: dict[str, torch.dtype]) -> None:
    """Add ``weight`` times each tensor, in float32 as Flower's own aggregation does."""
    for name, tensor in tensors.items():
        if name in sums:
            sums[name].add_(tensor.detach(), alpha=weight)
        else:
            dtypes[name] = tensor.dtype
            sums[name] = tensor.detach().float() * weight
