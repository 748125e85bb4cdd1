"""Simulated attacks (``attack``, ``malicious-fraction``; node config ``attack``), for
measuring defences: a training hook on the malicious nodes. Honest nodes never load
the attack code (``attacker``): this module imports it only for a node that attacks.
"""

from __future__ import annotations

from fedcifar_app.config import RunConfig
from fedcifar_app.node import TrainingHook


def training_hooks(config: RunConfig, node_config: dict) -> list[TrainingHook]:
    if config.attack == "none" and "attack" not in node_config:
        return []
    from fedcifar_app.extensions.attacks.attacker import AttackHook, node_attack

    attack = node_attack(config, node_config)
    return [] if attack is None else [AttackHook(attack)]
