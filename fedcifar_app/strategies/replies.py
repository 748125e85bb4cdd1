"""What the server reads from replies: checks, counts per client, folded evaluation.

A reply normally stands for one client, its node. A reply may stand for several (a
multiplexed node's mean of its clients' results, see extensions/multiplex): then its
``CLIENTS_RECORD`` ConfigRecord says which clients it served, and which of them failed,
were rejected or clipped on the node, and how long they trained; the safeguards count
per client through the functions here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedcifar_app import compat

CLIENTS_RECORD = "virtual-clients"
# With evaluate-in-train, a training reply's metrics that start with this prefix are
# the node's evaluation of the model it received, weighted by 'eval-num-examples'.
FOLDED_EVALUATION_PREFIX = "eval-"
FOLDED_EVALUATION_WEIGHT = "eval-num-examples"


def update_problem(reply: Message, global_arrays: ArrayRecord,
                   record_names: tuple[str, ...] = ("arrays",)) -> str | None:
    """Why a (non-error) training reply must not be aggregated, or None if it may.

    Each ArrayRecord in ``record_names`` must be a finite copy of the global model's
    layout, and the reply may hold no other ArrayRecord (Flower's aggregation fails
    the whole round on one that does)."""
    content = reply.content
    for name in record_names:
        if name not in content.array_records:
            return f"no ArrayRecord '{name}' in the reply"
    unexpected = sorted(set(content.array_records) - set(record_names))
    if unexpected:
        return f"unexpected ArrayRecords {unexpected}"
    problem = metrics_problem(reply)
    if problem is not None:
        return problem
    for name in record_names:
        problem = layout_problem(content.array_records[name], global_arrays)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def metrics_problem(reply: Message) -> str | None:
    """Why a (non-error) reply's metrics cannot be aggregated (training or evaluation),
    or None if they can."""
    records = reply.content.metric_records
    if list(records) != ["metrics"]:
        return f"MetricRecords {sorted(records)}, expected exactly one, 'metrics'"
    examples = records["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"'num-examples' must be a positive number, got {examples!r}"
    return None


def folded_evaluation(replies: list[Message]) -> dict[str, float]:
    """The evaluation metrics training replies carry (evaluate-in-train), averaged
    weighted by each node's number of validation examples, as Flower's evaluation is."""
    rows = [r.content["metrics"] for r in replies
            if FOLDED_EVALUATION_WEIGHT in r.content["metrics"]]
    total = sum(float(m[FOLDED_EVALUATION_WEIGHT]) for m in rows)
    if total == 0:
        return {}
    names = [k for k in rows[0] if k.startswith(FOLDED_EVALUATION_PREFIX)
             and k != FOLDED_EVALUATION_WEIGHT]
    return {name: sum(float(m[name]) * float(m[FOLDED_EVALUATION_WEIGHT]) for m in rows)
            / total for name in names}


def worker(reply: Message) -> dict[str, str]:
    """Where the node says it trained (its 'worker' ConfigRecord: host, Ray node)."""
    record = reply.content.config_records.get("worker")
    return {} if record is None else {k: str(v) for k, v in record.items()}


def metric_names(reply: Message) -> frozenset[str]:
    return frozenset(reply.content.metric_records["metrics"].keys())


def most_common_metric_names(replies: list[Message]) -> frozenset[str]:
    """The metric names most replies send (the first reply's set wins a tie)."""
    names = [metric_names(r) for r in replies]
    return max(names, key=names.count, default=frozenset())


def layout_problem(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    """How ``arrays`` differs from the global model's keys, shapes and dtypes, or holds
    NaN/Inf; None if it does not."""
    missing = sorted(set(global_arrays) - set(arrays))
    extra = sorted(set(arrays) - set(global_arrays))
    if missing or extra:
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    for name, expected in global_arrays.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return (f"'{name}' is {got.dtype}{list(got.shape)}, the global model has "
                    f"{expected.dtype}{list(expected.shape)}")
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"'{name}' holds NaN or Inf"
    return None


def served(reply: Message) -> list[int]:
    """The clients whose results a (non-error) reply holds: its CLIENTS_RECORD
    record's, or the sending node for a per-node reply."""
    record = reply.content.config_records.get(CLIENTS_RECORD)
    return [reply.metadata.src_node_id] if record is None else list(record["served"])


def rejected_on_nodes(replies: Iterable[Message]) -> int:
    """Clients whose update or evaluation their node's filter dropped (MEAN replies)."""
    return sum(len(_record(r)["rejected"]) for r in replies if _record(r) is not None)


def is_node_mean(reply: Message) -> bool:
    """Whether ``reply`` is a multiplexed node's mean of its clients' results."""
    return _record(reply) is not None


def clipped_on_nodes(replies: Iterable[Message]) -> int:
    """Client updates their node clipped to update-norm-bound (MEAN replies)."""
    return sum(int(_record(r)["clipped"]) for r in replies if _record(r) is not None)


def train_seconds(reply: Message) -> float:
    """Seconds the reply's clients trained, summed (a MEAN reply's metric is their
    weighted mean, as Flower averages metrics)."""
    record = _record(reply)
    if record is None:
        return float(reply.content["metrics"].get("train-seconds", 0.0))
    return float(record["train-seconds"])


def _record(reply: Message) -> ConfigRecord | None:
    return None if reply.has_error() else reply.content.config_records.get(CLIENTS_RECORD)


def update_norm(arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """L2 norm of ``arrays`` minus the global model, over all of its arrays."""
    return float(compat.get_norm([arrays[k].numpy() - v for k, v in zip(
        global_arrays, global_arrays.to_numpy_ndarrays(), strict=True)]))


def bound_update_norms(replies: list[Message], global_arrays: ArrayRecord,
                       bound: float) -> int:
    """Clip each reply's update to L2 norm ``bound`` in place; return how many were
    longer than the bound (and so were shortened)."""
    keys = list(global_arrays)
    reference = global_arrays.to_numpy_ndarrays()
    clipped = 0
    for reply in replies:
        record = reply.content["arrays"]
        update = [record[key].numpy() - start for key, start in zip(keys, reference, strict=True)]
        if compat.get_norm(update) <= bound:
            continue
        compat.clip_inputs_inplace(update, bound)
        reply.content["arrays"] = ArrayRecord(
            {key: Array((start + delta).astype(start.dtype, copy=False))
             for key, start, delta in zip(keys, reference, update, strict=True)})
        clipped += 1
    return clipped
