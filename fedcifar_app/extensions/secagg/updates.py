"""Secure aggregation's messages: what a node masks, and the checks it makes first.

(Pure NumPy; the node side is ``node.py``, the server side ``server.py``.) With
``secure-aggregation``, training rounds run Flower's SecAgg+ protocol, which masks
each node's reply so that the server can only recover the weighted sum over the
nodes that finished the round. What a node puts into that sum is its *update*
(trained weights minus received weights), not its weights: updates are small, so
they fit SecAgg+'s fixed-point range (each value is clipped to
+-``CLIPPING_RANGE`` and quantised to 2^22 levels before masking) with room to
spare, whatever the weights' magnitude.

The server cannot check single updates any more, so the node checks its own
before masking, and refuses to send one that would corrupt the sum: non-finite
values, values SecAgg+ would clip, a weight above the agreed maximum.
"""

from __future__ import annotations

import numpy as np

# SecAgg+'s fixed-point range (Flower's default); the server's workflow uses the same.
CLIPPING_RANGE = 8.0
# Legacy (fit/evaluate) records: SecAgg+ exists only on flwr 1.42's legacy API.
LEGACY_FIT_PARAMETERS = "fitins.parameters"
LEGACY_EVALUATE_PARAMETERS = "evaluateins.parameters"


def max_weight(dp: str, secagg_max_weight: float) -> float:
    """The largest weight a node may give its update: with DP every client weighs 1
    (DP-FedAvg); otherwise its number of examples, up to secagg-max-weight."""
    return 1.0 if dp != "none" else secagg_max_weight


def masked_update(trained: list[np.ndarray], received: list[np.ndarray], weight: float,
                  weight_cap: float) -> list[np.ndarray]:
    """The update a node hands to SecAgg+; ValueError (the node then drops out of the
    round, which SecAgg+ tolerates) if it would corrupt the sum."""
    if not 0 < weight <= weight_cap:
        raise ValueError(f"weight {weight:g} is not in (0, {weight_cap:g}]: SecAgg+ would "
                         "cap it (raise secagg-max-weight to the largest node's examples)")
    update = [t.astype(np.float64) - r.astype(np.float64)
              for t, r in zip(trained, received, strict=True)]
    if not all(np.isfinite(u).all() for u in update):
        raise ValueError("the update holds NaN or Inf; not sent into the secure sum")
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if largest > CLIPPING_RANGE:
        raise ValueError(f"an update value of {largest:.4g} is outside SecAgg+'s fixed-point "
                         f"range +-{CLIPPING_RANGE:g}; not sent into the secure sum")
    return [u.astype(r.dtype) for u, r in zip(update, received, strict=True)]
