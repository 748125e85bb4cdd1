"""Multiplexed mode's messages, and the one result a node sends for many clients.

(Pure PyTorch.) A node that serves several virtual clients in a round gets one message
whose ``CLIENTS_RECORD`` ConfigRecord lists them and the reply wanted, and sends one
weighted mean of their models and metrics, with their total weight. The server's
weighted average over such replies is the weighted average over the clients, as if
each had replied on its own. Before a client's model joins the mean, it passes what
the server checks of each update in per-node mode: finite weights, and an update
clipped to the bound the server would clip it to.
"""

from __future__ import annotations

import torch

from fedcifar_app.node import UNIT_WEIGHT
from fedcifar_app.strategies.replies import CLIENTS_RECORD

StateDict = dict[str, torch.Tensor]
VIRTUAL_CLIENTS = CLIENTS_RECORD  # a bundle's 'partition-ids' and 'reply' kind
# Reply kinds: one weighted mean of the clients' results, or each client's result
# (for aggregators that need every update), in records named "<record>/<client>".
MEAN, EACH = "mean", "each"
SEPARATOR = "/"
# Metrics that are counts: summed over the clients, not averaged.
COUNTS = ("num-examples", "eval-num-examples", UNIT_WEIGHT)
# Metrics named eval-* from evaluate-in-train are weighted by this count, as the server
# weights them (see strategies/safeguards.py); all others by the reply weight.
EVAL_PREFIX, EVAL_WEIGHT = "eval-", "eval-num-examples"


class ClientMean:
    """Running weighted mean of client models (weight: the metric ``weight_key``; None:
    UNIT_WEIGHT if the clients' metrics hold it, as DP-FedAvg's do, else num-examples) and
    of their metrics, plus the plain mean of other per-client tensors such as SCAFFOLD's
    control deltas (the server averages those per client, unweighted)."""

    def __init__(self, weight_key: str | None = "num-examples") -> None:
        self.weight_key = weight_key
        self.clients = 0
        self.total_weight = 0.0
        self._weighted_sum: StateDict = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._metrics: list[dict[str, float]] = []
        self._plain_sums: dict[str, StateDict] = {}

    def add(self, weights: StateDict | None, metrics: dict[str, float],
            per_client: dict[str, StateDict] | None = None) -> None:
        if self.weight_key is None:
            self.weight_key = UNIT_WEIGHT if UNIT_WEIGHT in metrics else "num-examples"
        weight = float(metrics[self.weight_key])
        self.clients += 1
        self.total_weight += weight
        self._metrics.append(metrics)
        if weights is not None:
            _accumulate(self._weighted_sum, weights, weight, self._dtypes)
        for name, tensors in (per_client or {}).items():
            _accumulate(self._plain_sums.setdefault(name, {}), tensors, 1.0, {})

    def model(self) -> StateDict:
        return {k: (v / self.total_weight).to(self._dtypes[k])
                for k, v in self._weighted_sum.items()}

    def per_client_means(self) -> dict[str, StateDict]:
        return {name: {k: (v / self.clients).float().cpu() for k, v in sums.items()}
                for name, sums in self._plain_sums.items()}

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
