"""Defences against harmful, well-formed updates: Flower's robust aggregators and
update-norm bounding.

The aggregators are Flower's own (``FedMedian``, ``FedTrimmedAvg``, ``Krum``,
``MultiKrum``, ``Bulyan``); ``build_strategy`` mixes the safeguards into them like
into any other strategy. What this module adds:

* ``sample_size_problem``: Krum-style rules need enough updates for the attackers
  they assume (Krum and MultiKrum n > 2f + 2, Bulyan n >= 4f + 3); a run whose
  round would sample fewer fails before training, naming the keys;
* ``bound_update_norms``: each update (its difference from the global model) is
  clipped to an L2 norm before aggregation, with Flower's DP clipping function
  and no noise; it works with every strategy.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm


def minimum_updates(strategy: str, num_malicious: int) -> int:
    """The fewest updates a round of ``strategy`` needs against ``num_malicious``."""
    if strategy == "bulyan":
        return 4 * num_malicious + 3  # El Mhamdi et al. 2018
    if strategy in ("krum", "multikrum"):
        return 2 * num_malicious + 3  # Blanchard et al. 2017: n > 2f + 2
    return 1


def sample_size_problem(strategy: str, num_malicious: int, sampled: int) -> str | None:
    """Why a round that samples ``sampled`` nodes cannot run ``strategy``, or None."""
    needed = minimum_updates(strategy, num_malicious)
    if sampled >= needed:
        return None
    rule = "4f + 3" if strategy == "bulyan" else "2f + 3"
    return (f"strategy '{strategy}' with num-malicious-nodes={num_malicious} needs at least "
            f"{needed} updates per round ({rule}), but a round samples {sampled} "
            "(fraction-train times the connected nodes): raise fraction-train, connect more "
            "nodes or lower num-malicious-nodes")


def update_norm(arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """L2 norm of ``arrays`` minus the global model, over all of its arrays."""
    return float(get_norm([arrays[k].numpy() - v for k, v in zip(
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
        if get_norm(update) <= bound:
            continue
        clip_inputs_inplace(update, bound)
        reply.content["arrays"] = ArrayRecord(
            {key: Array((start + delta).astype(start.dtype, copy=False))
             for key, start, delta in zip(keys, reference, update, strict=True)})
        clipped += 1
    return clipped
