"""DP-FedAvg on the node: every client weighs the same, and with dp='client' the
update leaves the node clipped to the round's norm (which the server sends)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedcifar_app.config import RunConfig
from fedcifar_app.node import UNIT_WEIGHT, ClientRound, TrainingHook, clip_update

# With dp='client', a reply's metric: 1 if the client clipped its update.
DP_CLIPPED = "dp-clipped"


class UnitWeight(TrainingHook):
    """DP-FedAvg averages clients unweighted: each reply weighs 1 (UNIT_WEIGHT)."""

    def after_training(self, client: ClientRound) -> None:
        client.metrics[UNIT_WEIGHT] = 1

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        metrics[UNIT_WEIGHT] = 1


def client_clipping_mod(msg: Message, context: Context,
                        call_next: ClientAppCallable) -> Message:
    """dp='client': clip the reply's update to the round's clipping norm and say
    whether it was longer; every other run's replies pass untouched."""
    answer = call_next(msg, context)
    if RunConfig.from_mapping(context.run_config).dp != "client" or answer.has_error():
        return answer
    received = msg.content["arrays"].to_torch_state_dict()
    weights = answer.content["arrays"].to_torch_state_dict()
    norm = float(msg.content["config"]["dp-clipping-norm"])
    answer.content["metrics"][DP_CLIPPED] = int(clip_update(weights, received, norm))
    answer.content["arrays"] = ArrayRecord(weights)
    return answer
