"""Simulated attackers, for measuring defences. Honest code never imports this module:
the extension loads it only when a run or a node is configured to attack.

Which nodes attack: in simulation, ``malicious-fraction`` of the partitions, drawn
from the seed (``malicious_partitions``); on a deployed SuperNode, the node config
key ``attack`` makes that node an attacker. The attacks (``attack`` key):

* ``label-flip`` (data poisoning): train on labels y -> 9 - y;
* ``sign-flip``: send the global model minus ``attack-scale`` times the update;
* ``scale``: send the global model plus ``attack-scale`` times the update (boosting);
* ``gaussian``: send the global model plus N(0, ``attack-noise-std``^2) noise, no training;
* ``little-is-enough`` (Baruch et al. 2019, "A Little Is Enough"): the colluding
  attackers send the same update, the mean minus z standard deviations (per
  coordinate) of honest updates. They estimate those from honest updates trained
  on their own data: in simulation one per colluding partition, on a deployed node
  one per shard of its data (``LIE_SHARDS``). ``attack-z`` 0 uses the paper's
  z_max for n nodes of which m attack.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

from fedcifar_app import task
from fedcifar_app.config import ATTACKS, RunConfig
from fedcifar_app.node import ClientRound, TrainingHook, local_training, node_data, round_seed
from fedcifar_app.task import NUM_CLASSES, ImageTensors

# On a deployed node, "a little is enough" estimates honest statistics from this many
# updates, each trained on a disjoint shard of the node's own data.
LIE_SHARDS = 4

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NodeAttack:
    """What one malicious node does this run."""

    kind: str
    scale: float
    noise_std: float
    z: float
    # Simulation: the partitions of all attackers (they collude); deployment: empty.
    colluders: tuple[int, ...] = ()

    @property
    def poisons_data(self) -> bool:
        return self.kind == "label-flip"


def malicious_partitions(num_partitions: int, fraction: float, seed: int) -> list[int]:
    """The attacking partitions: ``round(fraction * num_partitions)`` of them, the same
    for the same seed (a string seed is hashed with SHA-512, not PYTHONHASHSEED)."""
    count = round(fraction * num_partitions)
    return sorted(random.Random(f"{seed}:malicious").sample(range(num_partitions), count))


def baruch_z(num_nodes: int, num_malicious: int) -> float:
    """z_max of Baruch et al. 2019: s = floor(n/2 + 1) - m honest nodes must look
    further from the mean than the attackers; z = Phi^-1((n - s) / n)."""
    supporters = num_nodes // 2 + 1 - num_malicious
    return statistics.NormalDist().inv_cdf((num_nodes - supporters) / num_nodes)


def node_attack(config: RunConfig, node_config: dict) -> NodeAttack | None:
    """This node's attack, or None for an honest node."""
    if "attack" in node_config:  # a deployed SuperNode told to attack
        kind = str(node_config["attack"])
        if kind not in ATTACKS:
            raise ValueError(f"node config 'attack' must be one of {', '.join(ATTACKS)}, "
                             f"got {kind!r}")
        if kind == "little-is-enough" and config.attack_z == 0:
            raise ValueError("a deployed 'little-is-enough' node needs 'attack-z' > 0 "
                             "(z_max depends on how many nodes attack, which it cannot know)")
        return None if kind == "none" else NodeAttack(kind, config.attack_scale,
                                                      config.attack_noise_std, config.attack_z)
    if config.attack == "none" or "partition-id" not in node_config:
        return None
    num_partitions = int(node_config["num-partitions"])
    colluders = malicious_partitions(num_partitions, config.malicious_fraction, config.seed)
    if int(node_config["partition-id"]) not in colluders:
        return None
    z = config.attack_z or baruch_z(num_partitions, len(colluders))
    return NodeAttack(config.attack, config.attack_scale, config.attack_noise_std, z,
                      tuple(colluders))


def flip_labels(data: ImageTensors) -> ImageTensors:
    """Label flipping: class y becomes 9 - y."""
    return ImageTensors(data.images, NUM_CLASSES - 1 - data.labels)


def _floating(state: StateDict) -> list[str]:
    return [name for name, tensor in state.items() if tensor.is_floating_point()]


def poisoned(attack: NodeAttack, global_state: StateDict, trained: StateDict,
             generator: torch.Generator) -> StateDict:
    """The weights a sign-flip, scale or gaussian attacker sends instead of ``trained``."""
    result = dict(trained)
    for name in _floating(trained):
        start, update = global_state[name], trained[name] - global_state[name]
        if attack.kind == "sign-flip":
            result[name] = start - attack.scale * update
        elif attack.kind == "scale":
            result[name] = start + attack.scale * update
        elif attack.kind == "gaussian":
            noise = torch.randn(start.shape, generator=generator, device=start.device)
            result[name] = start + attack.noise_std * noise
        else:
            raise ValueError(f"'{attack.kind}' does not poison a trained update")
    return result


def little_is_enough(global_state: StateDict, honest: list[StateDict], z: float) -> StateDict:
    """The colluders' update: per coordinate, the mean of the honest updates minus z of
    their standard deviations (Baruch et al. 2019)."""
    if len(honest) < 2:
        raise ValueError("'little-is-enough' needs at least 2 honest updates to estimate "
                         "their spread")
    result = dict(honest[0])
    for name in _floating(global_state):
        updates = torch.stack([state[name] - global_state[name] for state in honest])
        result[name] = global_state[name] + updates.mean(0) - z * updates.std(0)
    return result


class AttackHook(TrainingHook):
    """A malicious client's round: label flipping before training; after it, the
    weights it sends instead of what it trained."""

    def __init__(self, attack: NodeAttack) -> None:
        self.attack = attack
        self.received: StateDict = {}

    def before_training(self, client: ClientRound) -> None:
        self.received = task.cpu_state_dict(client.net)
        if self.attack.poisons_data:
            client.train_data = flip_labels(client.train_data)

    def after_training(self, client: ClientRound) -> None:
        if self.attack.poisons_data:
            return
        net = client.net
        if self.attack.kind == "little-is-enough":
            honest = []
            for colluder_id, data in _colluder_data(self.attack, client):
                colluder = task.build_model(client.config.model).to(
                    next(net.parameters()).device)
                colluder.load_state_dict(self.received)
                local_training(colluder, data, client.config, client.instruction, colluder_id)
                honest.append(task.cpu_state_dict(colluder))
            sent = little_is_enough(self.received, honest, self.attack.z)
        else:
            seed = round_seed(client.config, client.server_round, client.client_id)
            sent = poisoned(self.attack, self.received, task.cpu_state_dict(net),
                            torch.Generator().manual_seed(seed))
        net.load_state_dict(sent)


def _colluder_data(attack: NodeAttack, client: ClientRound) -> list[tuple[int, ImageTensors]]:
    """Training data the colluding attackers pool: each attacking partition's in
    simulation, shards of this node's own data on a deployed node."""
    own = client.train_data
    if attack.colluders:
        node_config = dict(client.node_config)
        pooled = []
        for partition in attack.colluders:
            node_config["partition-id"] = partition
            pooled.append((partition, node_data(client.config, node_config)[0].to(own.device)))
        return pooled
    shards = torch.arange(len(own), device=own.device).chunk(LIE_SHARDS)
    return [(index, own.subset(shard)) for index, shard in enumerate(shards)]
