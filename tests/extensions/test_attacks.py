"""Simulated attacks: each transforms data or updates exactly as specified, only on the
nodes chosen to attack, and honest nodes never load the attack code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcifar_app import client_app, task
from fedcifar_app.extensions.attacks import attacker as attacks
from fedcifar_app.extensions.attacks.attacker import NodeAttack
from fedcifar_app.config import ConfigError, RunConfig
from tests.test_client_app import SIMULATED, make_context, make_message, task_identity  # noqa: F401 (autouse)


def config(**values: object) -> RunConfig:
    return RunConfig.from_mapping(values)


def test_the_attackers_are_drawn_from_the_seed_by_partition() -> None:
    first = attacks.malicious_partitions(20, 0.2, seed=42)
    assert first == attacks.malicious_partitions(20, 0.2, seed=42) and len(first) == 4
    assert attacks.malicious_partitions(20, 0.2, seed=43) != first
    assert len(attacks.malicious_partitions(10, 0.25, seed=1)) == 2  # rounded


def test_baruch_z_max() -> None:
    # n = 50, m = 10 (their CIFAR setting, 20 %): s = 26 - 10 = 16, z = Phi^-1(34/50).
    assert attacks.baruch_z(50, 10) == pytest.approx(0.4677, abs=1e-3)
    assert attacks.baruch_z(20, 4) == pytest.approx(0.3853, abs=1e-3)


def test_label_flipping_maps_y_to_nine_minus_y() -> None:
    data = task.ImageTensors(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    flipped = attacks.flip_labels(data)
    assert flipped.labels.tolist() == list(range(9, -1, -1))
    assert flipped.images is data.images


def states() -> tuple[dict, dict]:
    torch.manual_seed(0)
    start = task.Net().state_dict()
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
    return start, trained


@pytest.mark.parametrize("kind, expected", [
    ("sign-flip", lambda g, t: g - 10.0 * (t - g)),
    ("scale", lambda g, t: g + 10.0 * (t - g)),
])
def test_model_poisoning_sends_the_specified_weights(kind: str, expected) -> None:
    start, trained = states()
    sent = attacks.poisoned(NodeAttack(kind, 10.0, 1.0, 0.0), start, trained,
                            torch.Generator().manual_seed(0))
    assert all(torch.allclose(sent[k], expected(start[k], trained[k])) for k in start)


def test_gaussian_attack_sends_noise_around_the_global_model() -> None:
    start, trained = states()
    sent = attacks.poisoned(NodeAttack("gaussian", 10.0, 0.5, 0.0), start, trained,
                            torch.Generator().manual_seed(0))
    noise = torch.cat([(sent[k] - start[k]).flatten() for k in start])
    assert noise.std().item() == pytest.approx(0.5, rel=0.02)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)


def test_a_little_is_enough_shifts_the_mean_by_z_deviations() -> None:
    start, _ = states()
    honest = [{k: v + shift for k, v in start.items()} for shift in (1.0, 2.0, 3.0)]
    sent = attacks.little_is_enough(start, honest, z=1.5)
    # Per coordinate the updates are 1, 2, 3: mean 2, sample std 1.
    assert all(torch.allclose(sent[k], start[k] + 2.0 - 1.5) for k in start)
    with pytest.raises(ValueError, match="at least 2 honest updates"):
        attacks.little_is_enough(start, honest[:1], z=1.0)


def test_which_node_attacks_and_how() -> None:
    run = config(attack="sign-flip", **{"malicious-fraction": 0.5, "seed": 3})
    chosen = attacks.malicious_partitions(4, 0.5, seed=3)
    honest = next(p for p in range(4) if p not in chosen)
    assert attacks.node_attack(run, {"partition-id": honest, "num-partitions": 4}) is None
    attack = attacks.node_attack(run, {"partition-id": chosen[0], "num-partitions": 4})
    assert attack.kind == "sign-flip" and attack.colluders == tuple(chosen)
    assert attack.z == pytest.approx(attacks.baruch_z(4, 2))
    # A deployed SuperNode attacks because its node config says so.
    deployed = attacks.node_attack(config(), {"data-path": "/srv/d", "attack": "scale"})
    assert deployed.kind == "scale" and deployed.colluders == ()
    assert attacks.node_attack(config(), {"data-path": "/srv/d"}) is None
    with pytest.raises(ValueError, match="node config 'attack' must be one of"):
        attacks.node_attack(config(), {"attack": "rootkit"})
    with pytest.raises(ValueError, match="needs 'attack-z' > 0"):
        attacks.node_attack(config(), {"attack": "little-is-enough"})
    with pytest.raises(ConfigError, match="'attack' and 'malicious-fraction' go together"):
        config(attack="scale")


def test_a_malicious_node_sends_its_poisoned_training(tiny_dataset: Path,
                                                       cache_dir: Path) -> None:
    """The attacker trains exactly as an honest node would, then flips the update."""
    chosen = attacks.malicious_partitions(4, 0.5, seed=42)
    node_config = {"partition-id": chosen[0], "num-partitions": 4}
    torch.manual_seed(0)
    net = task.Net()
    honest = client_app.app(make_message("train", net),
                            make_context(tiny_dataset, cache_dir, node_config))
    attacked = client_app.app(make_message("train", net), make_context(
        tiny_dataset, cache_dir, node_config, attack="sign-flip",
        **{"malicious-fraction": 0.5, "attack-scale": 3.0}))
    start = net.state_dict()
    trained = honest.content["arrays"].to_torch_state_dict()
    sent = attacked.content["arrays"].to_torch_state_dict()
    assert all(torch.allclose(sent[k], start[k] - 3.0 * (trained[k] - start[k]), atol=1e-6)
               for k in start)
    assert attacked.content["metrics"]["num-examples"] == honest.content["metrics"][
        "num-examples"]  # it looks like any other reply


def test_little_is_enough_colluders_send_the_same_update(tiny_dataset: Path,
                                                         cache_dir: Path) -> None:
    chosen = attacks.malicious_partitions(4, 0.5, seed=42)
    net = task.Net()
    run = {"attack": "little-is-enough", "malicious-fraction": 0.5, "local-epochs": 1}
    sent = [client_app.app(make_message("train", net), make_context(
        tiny_dataset, cache_dir, {"partition-id": p, "num-partitions": 4}, **run))
        .content["arrays"].to_torch_state_dict() for p in chosen]
    assert all(torch.equal(sent[0][k], sent[1][k]) for k in sent[0])
    assert any(not torch.equal(sent[0][k], v) for k, v in net.state_dict().items())


def test_honest_nodes_never_load_the_attack_code(tiny_dataset: Path, cache_dir: Path) -> None:
    probe = f"""
import sys, torch
from tests.test_client_app import make_context, make_message
from fedcifar_app import client_app, task
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 7, 1
context = make_context({str(tiny_dataset)!r}, {str(cache_dir)!r}, {SIMULATED!r})
reply = client_app.app(make_message("train", task.Net()), context)
assert not reply.has_error()
print("attacks loaded:", "fedcifar_app.extensions.attacks.attacker" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert "attacks loaded: False" in done.stdout, done.stderr
