"""Secure aggregation on the node: Flower's ``secaggplus_mod`` and the legacy bridge.

flwr 1.42 ships SecAgg+ for its legacy API only: the workflow sends legacy fit and
evaluate instructions. This mod lets the same train and evaluate handlers serve them:
it turns an instruction into this app's format, calls the handler, and replies with
the checked update and its weight as a legacy FitRes, which secaggplus_mod masks
(evaluation is not masked). Every other message passes untouched.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)

from fedcifar_app import compat, task
from fedcifar_app.config import RunConfig
from fedcifar_app.node import UNIT_WEIGHT
from fedcifar_app.extensions.secagg.updates import (LEGACY_EVALUATE_PARAMETERS,
                                                    LEGACY_FIT_PARAMETERS, masked_update,
                                                    max_weight)


def secure_aggregation_mod(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    """SecAgg+'s protocol messages go through Flower's secaggplus_mod (key exchange,
    masking, unmasking; it calls the handler once per round, for the update it masks);
    legacy evaluate instructions are translated; every other message passes."""
    if compat.RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context,
                              lambda fit, ctx: _secure_fit(fit, ctx, call_next))
    if LEGACY_EVALUATE_PARAMETERS in msg.content.array_records:
        return _secure_evaluate(msg, context, call_next)
    return call_next(msg, context)


def _from_legacy(msg: Message, config: RunConfig) -> list:
    """Turn a legacy fit or evaluate instruction into this app's format in place, so
    that the same handler serves it; return the received weights as NumPy arrays."""
    legacy = compat.legacy_records
    if LEGACY_FIT_PARAMETERS in msg.content.array_records:
        instruction = legacy.recorddict_to_fitins(msg.content, keep_input=True)
    else:
        instruction = legacy.recorddict_to_evaluateins(msg.content, keep_input=True)
    received = parameters_to_ndarrays(instruction.parameters)
    names = task.build_model(config.model).state_dict()  # legacy Parameters have no names
    msg.content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in zip(names, received, strict=True)}),
        "config": ConfigRecord(instruction.config)})
    return received


def _secure_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """One round under secure aggregation: train as always, then reply with the
    checked update and its weight as a legacy FitRes, which secaggplus_mod masks."""
    config = RunConfig.from_mapping(context.run_config)
    received = _from_legacy(msg, config)
    trained = call_next(msg, context).content
    metrics = dict(trained["metrics"])
    # With DP every client weighs the same (see node.UNIT_WEIGHT).
    weight = metrics.get(UNIT_WEIGHT, metrics["num-examples"])
    update = masked_update(trained["arrays"].to_numpy_ndarrays(), received, weight,
                           max_weight(config.dp, config.secagg_max_weight))
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(weight), metrics)
    return Message(compat.legacy_records.fitres_to_recorddict(result, keep_input=False),
                   reply_to=msg)


def _secure_evaluate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Evaluation under secure aggregation (not masked; the workflow is legacy): the
    same handler, its metrics as a legacy EvaluateRes."""
    _from_legacy(msg, RunConfig.from_mapping(context.run_config))
    metrics = dict(call_next(msg, context).content["metrics"])
    result = EvaluateRes(Status(Code.OK, ""), float(metrics["eval-loss"]),
                         int(metrics["num-examples"]), metrics)
    return Message(compat.legacy_records.evaluateres_to_recorddict(result), reply_to=msg)
