"""Secure aggregation: SecAgg+ rounds give the plain rounds' model, survive drop-outs
within the threshold, fail loudly beyond it; nodes refuse updates that would corrupt
the sum; settings that need single updates are refused before training.

The rounds run in process (see tests/test_multiplex.py): Flower's SecAgg+ workflow
and secaggplus_mod, the real ClientApp, the run's strategy behind the bridge."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedcifar_app import task
from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.results import load_results
from fedcifar_app.extensions.secagg.server import run_secure_aggregation
from fedcifar_app.extensions.secagg.updates import LEGACY_FIT_PARAMETERS, masked_update
from fedcifar_app.strategies import RunFailedError
from tests.extensions.test_multiplex import InProcessGrid, round_entries, start_in_process

pytestmark = pytest.mark.usefixtures("server_task_identity")

NODES = 4


class DroppingGrid(InProcessGrid):
    """In-process SuperNodes that each get their own copy of a message; the
    ``dropping`` ones vanish once keys are exchanged: they answer the instruction
    that carries the model (legacy or not) with an error."""

    run = SimpleNamespace(run_id=1)

    def __init__(self, nodes: int, run_config: dict, dropping: tuple[int, ...] = ()) -> None:
        super().__init__(nodes, run_config)
        self.dropping = dropping

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            carries_model = (LEGACY_FIT_PARAMETERS in message.content.array_records
                             or ("arrays" in message.content.array_records
                                 and message.metadata.message_type == "train"))
            if message.metadata.dst_node_id in self.dropping and carries_model:
                replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                             reason="node vanished"), reply_to=message))
            else:  # a copy, as if sent: secaggplus_mod edits what it receives
                server_rng = np.random.get_state()  # as if the node ran elsewhere: its
                replies.extend(super().send_and_receive([copy.deepcopy(message)],
                                                        timeout=timeout))
                np.random.set_state(server_rng)  # stochastic rounding draws from NumPy's
        return replies


def run_rounds(tmp_path: Path, tiny_dataset: Path, secure: bool, rounds: int = 1,
               dropping: tuple[int, ...] = (), **overrides: object) -> tuple[dict, dict]:
    """``rounds`` rounds on NODES in-process nodes, with or without SecAgg+; return
    (final model, results.json)."""
    run_config = {"dataset": str(tiny_dataset), "cache-dir": str(tmp_path.parent / "cache"),
                  "fraction-train": 1.0, "fraction-evaluate": 0.5, "local-epochs": 1,
                  "batch-size": 16, "min-available-nodes": 1, "seed": 5,
                  "secure-aggregation": secure, "secagg-max-weight": 100.0, **overrides}
    grid = DroppingGrid(NODES, run_config, dropping)
    config, recorder, strategy = start_in_process(tmp_path, run_config, grid)
    initial = ArrayRecord(task.Net().state_dict())
    if secure:
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config=run_config)
        final = run_secure_aggregation(grid, context, config, strategy, initial,
                                       lambda server_round, arrays: None, rounds)
    else:
        final = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                               timeout=60).arrays
    recorder.finish(None)
    return final.to_torch_state_dict(), load_results(tmp_path)


def assert_close_to_quantisation(plain: dict, secure: dict) -> None:
    """After one round. SecAgg+ rounds each weighted update value (weight: about 90
    examples / secagg-max-weight 100) stochastically to a step of 16 / 2^22 = 3.8e-6:
    the mean of 4 nodes' updates is off by at most 4 steps / 3.6 = 4.2e-6. (Over more
    rounds training amplifies such differences, as it does any.)"""
    assert plain.keys() == secure.keys()
    for name in plain:
        torch.testing.assert_close(secure[name], plain[name], rtol=0, atol=1e-5)


def test_a_secure_round_gives_the_plain_rounds_model(tmp_path: Path,
                                                     tiny_dataset: Path) -> None:
    plain, plain_results = run_rounds(tmp_path / "plain", tiny_dataset, secure=False)
    secure, secure_results = run_rounds(tmp_path / "secure", tiny_dataset, secure=True)
    assert_close_to_quantisation(plain, secure)
    moved = max(float((secure[k] - v).abs().max()) for k, v in task.Net().state_dict().items())
    assert moved > 1e-3  # training moved the model far more than the tolerance
    for plain_round, secure_round in zip(round_entries(plain_results),
                                         round_entries(secure_results), strict=True):
        for key in ("train_replies", "train_failures", "train_nodes", "samples_trained",
                    "evaluate_replies"):
            assert secure_round[key] == plain_round[key], key
        assert secure_round["train"]["train-loss"] == pytest.approx(
            plain_round["train"]["train-loss"], rel=1e-3)


def test_a_node_that_drops_after_the_key_exchange_costs_only_its_update(
        tmp_path: Path, tiny_dataset: Path) -> None:
    """Node 101 vanishes after the key exchange: its neighbours' shares rebuild its
    masks, and the round releases the mean of the other three updates, as a plain
    round in which node 101 fails does."""
    plain, plain_results = run_rounds(tmp_path / "plain", tiny_dataset, secure=False,
                                      dropping=(101,))
    secure, secure_results = run_rounds(tmp_path / "secure", tiny_dataset, secure=True,
                                        dropping=(101,))
    assert_close_to_quantisation(plain, secure)
    for entry in round_entries(secure_results):
        assert (entry["train_replies"], entry["train_failures"]) == (NODES - 1, 1)
        assert 101 not in entry["train_nodes"]


def test_a_round_with_too_few_surviving_share_holders_fails_the_run(
        tmp_path: Path, tiny_dataset: Path) -> None:
    """Three of four nodes vanish: one survivor holds fewer shares than the threshold
    (2), so SecAgg+ abandons the round, and the run fails instead of going on."""
    with pytest.raises(RunFailedError, match="round 1: SecAgg\\+ abandoned the round"):
        run_rounds(tmp_path, tiny_dataset, secure=True, dropping=(101, 102, 103))


def test_client_side_dp_under_secure_aggregation_releases_the_plain_noised_mean(
        tmp_path: Path, tiny_dataset: Path, replay_private_draws) -> None:
    """Nodes clip their updates, SecAgg+ sums them (each weighing 1), the server adds
    the noise: the model a plain dp='client' round releases, with the same noise."""
    settings = {"dp": "client", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 0.2,
                "dp-delta": 1e-3, "fraction-train": 0.9}
    replay_private_draws()
    plain, plain_results = run_rounds(tmp_path / "plain", tiny_dataset, secure=False,
                                      **settings)
    replay_private_draws()
    secure, secure_results = run_rounds(tmp_path / "secure", tiny_dataset, secure=True,
                                        **settings)
    assert_close_to_quantisation(plain, secure)
    spent = [(e["dp_epsilon"], e["dp_clients"]) for e in round_entries(plain_results)]
    assert spent == [(e["dp_epsilon"], e["dp_clients"]) for e in round_entries(secure_results)]


def test_nodes_refuse_updates_that_would_corrupt_the_secure_sum() -> None:
    received = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    trained = [np.full((2, 2), 0.5, np.float32), np.ones(3, np.float32)]
    update = masked_update(trained, received, weight=10, weight_cap=100)
    assert [u.tolist() for u in update] == [[[0.5, 0.5], [0.5, 0.5]], [1.0, 1.0, 1.0]]
    assert update[0].dtype == np.float32
    with pytest.raises(ValueError, match="NaN or Inf"):
        masked_update([trained[0], np.array([1.0, np.nan, 0.0], np.float32)], received,
                      10, 100)
    with pytest.raises(ValueError, match="outside SecAgg\\+'s fixed-point range"):
        masked_update([trained[0], np.array([9.0, 0.0, 0.0], np.float32)], received, 10, 100)
    with pytest.raises(ValueError, match="raise secagg-max-weight"):
        masked_update(trained, received, weight=101, weight_cap=100)


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "fedmedian"}, "'strategy' 'fedmedian' needs each node's update"),
    ({"strategy": "scaffold"}, "'strategy' 'scaffold' needs each node's update"),
    ({"dp": "server"}, "dp='server' clips single updates on the server"),
    ({"dp": "client", "dp-clipping": "adaptive"}, "use dp-clipping='fixed'"),
    ({"update-norm-bound": 1.0}, "set it to 0 (dp='client' clips on the nodes)"),
    ({"virtual-clients": 10}, "multiplexed mode ('virtual-clients')"),
    ({"secagg-num-shares": 2.0}, "'secagg-num-shares' 2 must be a fraction <= 1 or a whole"),
    ({"secagg-num-shares": 5.0, "secagg-reconstruction-threshold": 5.0},
     "'secagg-reconstruction-threshold' 5 must be below 'secagg-num-shares' 5"),
])
def test_settings_that_need_single_updates_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping({"secure-aggregation": True, **settings})
    assert message in str(error.value)
