"""Defences: Flower's robust aggregators under the safeguards, and update-norm bounding,
each against a crafted malicious update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from fedcifar_app.strategies import RunFailedError
from tests.strategies.test_strategy import GLOBAL, FakeGrid, make_strategy, reply, state_dict

pytestmark = pytest.mark.usefixtures("server_task_identity")

HONEST = 8


def updates(malicious_value: float) -> list:
    """8 honest updates near 1.0 and one malicious update at ``malicious_value``."""
    generator = torch.Generator().manual_seed(0)
    replies = [reply({k: 1 + 0.01 * torch.randn(v.shape, generator=generator)
                      for k, v in state_dict().items()}, node=n) for n in range(1, HONEST + 1)]
    replies.append(reply({k: torch.full_like(v, malicious_value)
                          for k, v in state_dict().items()}, node=99))
    return replies


def aggregated_mean(strategy) -> float:
    arrays, _ = strategy.aggregate_train(1, updates(malicious_value=-1000.0))
    return torch.cat([t.flatten() for t in arrays.to_torch_state_dict().values()]).mean().item()


@pytest.mark.parametrize("config", [
    {"strategy": "fedmedian"},
    {"strategy": "fedtrimmedavg", "trimmed-beta": 0.2},
    {"strategy": "krum", "num-malicious-nodes": 1},
    {"strategy": "multikrum", "num-malicious-nodes": 1},
    {"strategy": "bulyan", "num-malicious-nodes": 1},
])
def test_robust_aggregators_exclude_a_malicious_update(tmp_path: Path, config: dict) -> None:
    strategy, recorder = make_strategy(tmp_path, **config)
    assert aggregated_mean(strategy) == pytest.approx(1.0, abs=0.05)
    assert recorder.entries[0]["train_replies"] == HONEST + 1


def test_fedavg_takes_the_malicious_update_in(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path)
    assert aggregated_mean(strategy) < -50  # the contrast the defences are measured by


def test_update_norm_bounding_limits_what_one_update_can_move(tmp_path: Path) -> None:
    bound = 5.0
    strategy, recorder = make_strategy(tmp_path, **{"update-norm-bound": bound})
    replies = updates(malicious_value=-1000.0)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert recorder.entries[0]["train_clipped"] == HONEST + 1  # all of them are long here
    start = torch.cat([t.flatten() for t in GLOBAL.to_torch_state_dict().values()])
    clipped = [torch.cat([t.flatten() for t in r.content["arrays"].to_torch_state_dict()
                          .values()]) for r in replies]
    assert all((c - start).norm() == pytest.approx(bound, rel=1e-4) for c in clipped)
    # The average of updates no longer than the bound moves the model at most that far.
    result = torch.cat([t.flatten() for t in arrays.to_torch_state_dict().values()])
    assert (result - start).norm() <= bound * (1 + 1e-4)


def test_an_impossible_sample_for_the_assumed_attackers_fails_before_training(
        tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path, strategy="bulyan", **{"num-malicious-nodes": 2,
                                                               "fraction-train": 1.0})
    with pytest.raises(RunFailedError, match="'bulyan' with num-malicious-nodes=2 needs at "
                                             "least 11 updates per round .* samples 8"):
        strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(8))
    assert list(strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(11)))
    krum, _ = make_strategy(tmp_path, strategy="krum", **{"num-malicious-nodes": 2,
                                                          "fraction-train": 0.5})
    with pytest.raises(RunFailedError, match="needs at least 7 .* samples 5"):
        krum.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(10))


def test_bulyan_left_with_too_few_updates_fails_the_round(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path, strategy="bulyan", **{"num-malicious-nodes": 2})
    with pytest.raises(RunFailedError, match="'bulyan' could not aggregate the 9 usable"):
        strategy.aggregate_train(1, updates(malicious_value=5.0))
