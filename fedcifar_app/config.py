"""The run configuration: one typed, validated object for every entry point.

``RunConfig.from_mapping`` takes what Flower hands the apps (``context.run_config``:
the ``[tool.flwr.app.config]`` table of pyproject.toml plus ``--run-config``
overrides) or what the centralized CLI parsed, rejects unknown keys, wrong types
and out-of-range values with a message naming the key, and fills in defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcifar_app.errors import AnticipatedError
from fedcifar_app.task import BATCHED_CLIENTS, MODELS

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "fedmedian",
              "fedtrimmedavg", "krum", "multikrum", "bulyan", "fedbuff")
ATTACKS = ("none", "label-flip", "sign-flip", "scale", "gaussian", "little-is-enough")
# The Byzantine-robust aggregators, which assume up to num-malicious-nodes attackers.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
PARTITIONERS = ("iid", "dirichlet", "pathological")
DP_MODES = ("none", "server", "client")
DP_CLIPPING = ("fixed", "adaptive")
DP_ACCOUNTANTS = ("pld", "rdp")
DEVICES = ("none", "drawn", "fedscale")
STALENESS_WEIGHTINGS = ("inverse-sqrt", "inverse", "none")
TRACKERS = ("tensorboard", "mlflow", "wandb")
# DP-FedAvg's noise and accounting assume the server releases the plain average.
DP_STRATEGIES = ("fedavg", "fedprox")


class ConfigError(AnticipatedError, ValueError):
    """A run configuration value is unknown, of the wrong type or out of range."""


class NodeConfigError(ConfigError):
    """The SuperNode's node config does not say where its data is, or says it wrongly."""




def _setting(default: Any, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be >= {low}"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _unit_closed(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _unit_right_open(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda value: None if low <= value <= high else f"must be in [{low}, {high}]"


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _tracker_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _trackers_problem(value: str) -> str | None:
    names = _tracker_names(value)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        return f"names {', '.join(unknown)}: the trackers are {', '.join(TRACKERS)}"
    if len(set(names)) < len(names):
        return "names a tracker twice"
    return None


def device_problem(value: str) -> str | None:
    """Whether ``value`` names a device kind (not whether this machine has it)."""
    if value in ("auto", "cpu", "cuda", "mps"):
        return None
    if value.startswith("cuda:") and value[5:].isdigit():
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


# The node-config keys this app reads (others are left alone): their type and check.
NODE_KEYS: dict[str, tuple[type, Callable[[Any], str | None]]] = {
    "data-path": (str, _not_empty),
    "partition-id": (int, _at_least(0)),
    "num-partitions": (int, _at_least(1)),
    "device": (str, device_problem),
    "torch-threads": (int, _at_least(1)),
    "attack": (str, _one_of(ATTACKS[1:])),
}


def node_config_problems(node_config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the keys of ``node_config`` this app reads, each naming its key."""
    problems = []
    for key, (kind, check) in NODE_KEYS.items():
        if key not in node_config:
            continue
        value = node_config[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"node config '{key}' expects {_type_name(kind.__name__)}, got "
                            f"{value!r} ({type(value).__name__})")
        elif (problem := check(value)) is not None:
            problems.append(f"node config '{key}' {problem}, got {value!r}")
    if not problems and "partition-id" in node_config and "num-partitions" in node_config \
            and node_config["partition-id"] >= node_config["num-partitions"]:
        problems.append(f"node config 'partition-id' {node_config['partition-id']} must be "
                        f"below 'num-partitions' {node_config['num-partitions']}")
    return problems


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Keys are the field names with '-' for '_'."""

    num_server_rounds: int = _setting(14, "Federated rounds.", _at_least(1))
    fraction_train: float = _setting(0.5, "Fraction of nodes that train each round.", _fraction)
    fraction_evaluate: float = _setting(
        0.5, "Fraction of nodes that evaluate on their validation split each round "
        "(0: no client-side evaluation).", _unit_closed)
    min_available_nodes: int = _setting(
        2, "Nodes that must be connected before a round starts.", _at_least(1))
    node_wait_timeout: float = _setting(
        120.0, "Seconds a round waits for min-available-nodes before the run fails.",
        _positive)
    round_timeout: float = _setting(
        600.0, "Seconds a node has to reply to an instruction; one that has not replied by "
        "then counts as failed (and is replaced, see round-retries).", _positive)
    round_retries: int = _setting(
        3, "Replacements per round phase: an instruction whose node fails (error, "
        "disconnect, round-timeout) goes to a connected node not yet tried in the phase, "
        "at most this many times (0: none).", _at_least(0))
    resume_from: str = _setting(
        "", "A checkpoint.pt (or the run folder holding it) to continue from; empty: start "
        "afresh.")
    # --- Multiplexed clients (extensions/multiplex) --------------------------------
    virtual_clients: int = _setting(
        0, "Multiplexed simulation: this many virtual clients (partitions of the data set), "
        "served by the connected SuperNodes, each node training the clients it is given one "
        "after another and replying once per round; fraction-train and fraction-evaluate "
        "then sample virtual clients (0: per-node mode, one client per SuperNode).",
        _at_least(0))
    serving_nodes: int = _setting(
        0, "Multiplexed mode: SuperNodes that serve the virtual clients, the first ones in "
        "partition order (0: as many as can train at once, the CPUs of the simulation's "
        "Ray cluster; more nodes than that add messages, not speed).", _at_least(0))
    batched_clients: int = _setting(
        0, "Multiplexed mode: a node trains up to this many of its clients of a round "
        "together, in one batched computation (each keeps its own weights, data order, "
        "augmentation and optimizer state: the same models as one after another, to float "
        "rounding); it bounds the client copies a node holds at once. 1: one after "
        "another; 0: the model's default (" + ", ".join(
            f"{name} {count}" for name, count in BATCHED_CLIENTS.items()) + ").",
        _at_least(0))
    # --- Evaluation, model, local training ------------------------------------------
    evaluate_every: int = _setting(
        1, "Server-side evaluation on the test split every this many rounds, and after "
        "the last round (1: every round).", _at_least(1))
    evaluate_in_train: bool = _setting(
        False, "Nodes sampled for training first evaluate the model they received on their "
        "validation split and send that with the training reply; no separate evaluation "
        "phase (fraction-evaluate is not used). Halves a deployment round's messages.")
    model: str = _setting(
        "tutorial-cnn", "Network: " + ", ".join(MODELS) + " (the PyTorch tutorial's CNN; "
        "ResNet-9 with GroupNorm, 6.6 M parameters, worth a GPU).", _one_of(tuple(MODELS)))
    device: str = _setting(
        "auto", "Where models and data live: auto (CUDA if present, else MPS, else CPU), "
        "cpu, cuda, cuda:N or mps. A SuperNode's node config 'device' overrides it for "
        "that node.", device_problem)
    local_epochs: int = _setting(2, "Epochs each node trains per round.", _at_least(1))
    batch_size: int = _setting(32, "Training and evaluation batch size.", _at_least(1))
    learning_rate: float = _setting(0.01, "SGD learning rate (client side).", _positive)
    momentum: float = _setting(0.9, "SGD momentum (client side).", _unit_right_open)
    weight_decay: float = _setting(0.0, "SGD weight decay (client side).", _at_least(0))
    augment: bool = _setting(
        False, "Random crop (4 px padding) and horizontal flip on training batches.")
    # --- Strategies (Flower's; SCAFFOLD: extensions/scaffold) ----------------------
    strategy: str = _setting("fedavg", "Server strategy: " + ", ".join(STRATEGIES) + ".",
                             _one_of(STRATEGIES))
    fedprox_mu: float = _setting(0.01, "FedProx proximal term weight mu.", _positive)
    fedavgm_server_lr: float = _setting(1.0, "FedAvgM server learning rate.", _positive)
    fedavgm_momentum: float = _setting(0.9, "FedAvgM server momentum.", _unit_right_open)
    fedadam_eta: float = _setting(0.01, "FedAdam server learning rate (eta).", _positive)
    fedadam_tau: float = _setting(
        0.001, "FedAdam adaptivity (tau): larger is closer to plain FedAvg steps.", _positive)
    # --- Robust aggregation (extensions/robust) ------------------------------------
    trimmed_beta: float = _setting(
        0.2, "FedTrimmedAvg: fraction of the updates trimmed at each end, per coordinate.",
        lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)")
    num_malicious_nodes: int = _setting(
        0, "Krum, MultiKrum, Bulyan: attackers assumed among the sampled nodes (f).",
        _at_least(0))
    multikrum_keep: int = _setting(
        0, "MultiKrum: updates averaged after selection (0: sampled nodes minus "
        "num-malicious-nodes).", _at_least(0))
    update_norm_bound: float = _setting(
        0.0, "Clip each training update (its difference from the global model) to this L2 "
        "norm before aggregating, with any strategy; no noise (0: off).", _at_least(0))
    # --- Differential privacy (extensions/privacy) ---------------------------------
    dp: str = _setting(
        "none", "User-level differential privacy (DP-FedAvg with Poisson sampling, see "
        "docs/privacy.md): 'server' clips each update on the server, 'client' on the "
        "client; none: off. Rounds with DP replace no failed node (round-retries is not used).",
        _one_of(DP_MODES))
    dp_noise_multiplier: float = _setting(
        1.0, "DP: Gaussian noise standard deviation over the clipping norm (z).",
        _at_least(0))
    dp_clipping_norm: float = _setting(
        1.0, "DP: L2 norm each client update is clipped to (C); with adaptive clipping, "
        "its first value.", _positive)
    dp_clipping: str = _setting(
        "fixed", "DP: 'fixed' keeps dp-clipping-norm; 'adaptive' moves it each round "
        "towards dp-target-quantile of the update norms (Andrew et al. 2021).",
        _one_of(DP_CLIPPING))
    dp_target_quantile: float = _setting(
        0.5, "DP, adaptive clipping: fraction of the updates the norm should leave "
        "unclipped.", _unit_closed)
    dp_clip_learning_rate: float = _setting(
        0.2, "DP, adaptive clipping: step of the geometric update of the clipping norm.",
        _positive)
    dp_clipped_count_stddev: float = _setting(
        0.0, "DP, adaptive clipping: noise on the count of unclipped updates (0: expected "
        "clients per round / 20, as Andrew et al. recommend).", _at_least(0))
    dp_delta: float = _setting(
        1e-5, "DP: the delta epsilon is reported at; keep it below 1 / number of clients.",
        lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    dp_accountant: str = _setting(
        "pld", "DP: how epsilon is computed, with dp-accounting: 'pld' (privacy loss "
        "distribution, the tighter bound) or 'rdp' (Renyi DP, looser).",
        _one_of(DP_ACCOUNTANTS))
    dp_max_epsilon: float = _setting(
        0.0, "DP: the run ends cleanly before a round that would take epsilon past this "
        "(0: no cap).", _at_least(0))
    # --- Secure aggregation (extensions/secagg) ------------------------------------
    secure_aggregation: bool = _setting(
        False, "Run training rounds through Flower's SecAgg+: the server learns only the sum "
        "of the updates of the nodes that finish a round (see docs/secure-aggregation.md).")
    secagg_num_shares: float = _setting(
        3.0, "SecAgg+: nodes each node shares its secret with, itself included (a count "
        ">= 3), or a fraction (<= 1) of the round's nodes.", _positive)
    secagg_reconstruction_threshold: float = _setting(
        2.0, "SecAgg+: shares needed to rebuild a node's secret (a count >= 2 below "
        "secagg-num-shares, or a fraction <= 1 of them); a node's neighbours may drop "
        "out as long as this many of its shares survive.", _positive)
    secagg_max_weight: float = _setting(
        50000.0, "SecAgg+: the largest weight (training examples) of any node's update; "
        "nodes with more refuse the round. Ignored with DP (every client weighs 1).",
        _positive)
    # --- Simulated attacks (extensions/attacks) ------------------------------------
    attack: str = _setting(
        "none", "Simulated attack of the malicious nodes: " + ", ".join(ATTACKS) + " (see "
        "docs/attacks.md).", _one_of(ATTACKS))
    malicious_fraction: float = _setting(
        0.0, "Simulation: fraction of the partitions whose nodes attack, drawn from the seed.",
        _unit_right_open)
    attack_scale: float = _setting(
        10.0, "sign-flip sends minus this times the update, scale plus this times it.",
        _positive)
    attack_noise_std: float = _setting(
        1.0, "gaussian: standard deviation of the noise sent instead of an update.", _positive)
    attack_z: float = _setting(
        0.0, "little-is-enough: standard deviations to shift by (0: Baruch et al.'s z_max "
        "for the simulated nodes and attackers).", _at_least(0))
    # --- Heterogeneous devices, simulated clock (extensions/heterogeneity) -----------
    devices: str = _setting(
        "none", "Simulation: each client on a device of its own, on a simulated clock (see "
        "docs/heterogeneity.md): 'drawn' from the seed (device-* and straggler-* keys), "
        "'fedscale' from FedScale trace files (device-trace, behaviour-trace); none: off.",
        _one_of(DEVICES))
    device_seconds_per_sample: float = _setting(
        0.000125, "devices='drawn': a median device's training seconds per sample (about "
        "this machine's for the tutorial CNN, 8,000 samples/s).", _positive)
    device_kbps: float = _setting(
        20000.0, "devices='drawn': a median device's link, kbit/s each way.", _positive)
    device_spread: float = _setting(
        0.5, "devices='drawn': sigma of the log-normal spread of compute and links.",
        _at_least(0))
    straggler_fraction: float = _setting(
        0.0, "devices='drawn': fraction of the clients that are stragglers.", _unit_closed)
    straggler_slowdown_min: float = _setting(
        5.0, "devices='drawn': a straggler computes this many times slower, at least...",
        _at_least(1))
    straggler_slowdown_max: float = _setting(
        10.0, "... and at most (drawn uniformly in between).", _at_least(1))
    device_trace: str = _setting(
        "", "devices='fedscale': FedScale's client_device_capacity file (absolute path).")
    behaviour_trace: str = _setting(
        "", "devices='fedscale': FedScale's client_behave_trace file (absolute path); "
        "empty: every device always available.")
    over_selection_keep: int = _setting(
        0, "Synchronous rounds on the simulated clock (devices) aggregate only the first "
        "this many updates to arrive, dropping later ones as late; sample more with "
        "fraction-train (0: wait for every update).", _at_least(0))
    # --- Asynchronous training (extensions/fedbuff) ---------------------------------
    fedbuff_concurrency: int = _setting(
        10, "strategy='fedbuff': clients training at once (replaces fraction-train); a "
        "freed client's slot goes to another free client at once.", _at_least(1))
    fedbuff_buffer_size: int = _setting(
        5, "strategy='fedbuff': updates buffered per server step (num-server-rounds counts "
        "these steps).", _at_least(1))
    fedbuff_server_lr: float = _setting(
        1.0, "strategy='fedbuff': server learning rate of a step.", _positive)
    fedbuff_staleness: str = _setting(
        "inverse-sqrt", "strategy='fedbuff': weight of an update trained on a model tau "
        "steps old: 'inverse-sqrt' 1/sqrt(1+tau) (the paper's), 'inverse' 1/(1+tau), 'none' 1.",
        _one_of(STALENESS_WEIGHTINGS))
    fedbuff_max_staleness: int = _setting(
        0, "strategy='fedbuff': drop updates more than this many steps old, counted as stale "
        "(0: keep all).", _at_least(0))
    # --- Partitions and data -------------------------------------------------------
    partitioner: str = _setting(
        "iid", "How the training split is divided among simulated nodes: "
        + ", ".join(PARTITIONERS) + ".", _one_of(PARTITIONERS))
    dirichlet_alpha: float = _setting(
        0.5, "Concentration of the label Dirichlet (partitioner=dirichlet); smaller is "
        "more skewed.", _positive)
    classes_per_partition: int = _setting(
        2, "Labels each node holds (partitioner=pathological).", _between(1, 10))
    dirichlet_min_partition_size: int = _setting(
        10, "Smallest partition the Dirichlet partitioner accepts; it redraws (up to 10 "
        "times) until every partition is at least this large.", _at_least(0))
    dirichlet_self_balancing: bool = _setting(
        False, "Stop giving a label to partitions that already hold more than an equal "
        "share (flwr-datasets' self_balancing).")
    validation_fraction: float = _setting(
        0.1, "Part of each node's data held out for its client-side evaluation (0: none; "
        "then fraction-evaluate must be 0).", _unit_right_open)
    dataset: str = _setting(
        "uoft-cs/cifar10", "Hugging Face Hub id, or a local directory holding "
        "train.parquet and test.parquet in the same schema (use an absolute path).",
        _not_empty)
    seed: int = _setting(42, "Seed for model initialisation, partitioning, node sampling, "
                         "aggregation order and shuffling.", _at_least(0))
    output_dir: str = _setting(
        "~/fedcifar-outputs", "Directory under which each run writes its own folder.",
        _not_empty)
    cache_dir: str = _setting(
        "~/.cache/fedcifar", "Where decoded images and partition indices are cached.",
        _not_empty)
    # --- Tracking (fedcifar_app/tracking) ---------------------------------------------
    tracking: str = _setting(
        "", "Experiment trackers, comma-separated: " + ", ".join(TRACKERS) + " (run-config "
        "values are scalars, so a list is a string; empty: none). Needs the 'tracking' "
        "extra.", _trackers_problem)
    tracking_uri: str = _setting(
        "", "MLflow's tracking URI (http://host:port, or sqlite:////absolute/path.db); "
        "empty: sqlite:///<output-dir>/mlflow.db, one store for every run. TensorBoard and "
        "W&B always write into the run folder.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a validated config; raise ConfigError naming every bad key."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        errors = [f"unknown key '{key}' (known keys: {', '.join(fields)})"
                  for key in values if key not in fields]
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                continue
            spec = fields[key]
            coerced = _coerce(value, spec.type)
            if coerced is None:
                errors.append(f"'{key}' expects {_type_name(spec.type)}, got {value!r} "
                              f"({type(value).__name__})")
                continue
            # TOML has inf and nan; no key gives them a meaning (wait forever: a large number).
            if spec.type == "float" and not math.isfinite(coerced):
                errors.append(f"'{key}' must be a finite number, got {value!r}")
                continue
            if spec.type == "float" and coerced != value:  # an integer past 2**53
                errors.append(f"'{key}' {value!r} has no exact floating-point value")
                continue
            check = spec.metadata["check"]
            problem = check(coerced) if check else None
            if problem:
                errors.append(f"'{key}' {problem}, got {value!r}")
                continue
            parsed[spec.name] = coerced
        if not errors:
            config = cls(**parsed)
            errors = config._inconsistencies()
        if errors:
            raise ConfigError("invalid run config: " + "; ".join(errors))
        return config

    def _inconsistencies(self) -> list[str]:
        """Problems of combinations of keys, each valid on its own."""
        problems = []
        if self.validation_fraction == 0 and self.fraction_evaluate > 0 \
                and not self.evaluate_in_train:
            problems.append("'validation-fraction' is 0, so nodes hold no validation data: "
                            "set 'fraction-evaluate' to 0 as well")
        if (self.attack == "none") != (self.malicious_fraction == 0):
            problems.append("'attack' and 'malicious-fraction' go together: set both (an "
                            "attack and a fraction > 0) or neither")
        if self.validation_fraction == 0 and self.evaluate_in_train:
            problems.append("'evaluate-in-train' needs validation data: 'validation-fraction' "
                            "must be > 0")
        if self.dp != "none":
            problems += self._dp_inconsistencies()
        if self.secure_aggregation:
            problems += self._secure_aggregation_inconsistencies()
        if self.devices != "none":
            problems += self._device_inconsistencies()
        elif self.over_selection_keep:
            problems.append("'over-selection-keep' keeps the first updates to arrive on the "
                            "simulated clock: set 'devices'")
        if self.strategy == "fedbuff":
            problems += self._fedbuff_inconsistencies()
        if self.batched_clients and not self.virtual_clients:
            problems.append("'batched-clients' sets how many virtual clients a node trains "
                            "together: set 'virtual-clients' too (in per-node mode each "
                            "node trains one client)")
        if self.virtual_clients and self.min_available_nodes > self.virtual_clients:
            problems.append(f"'min-available-nodes' ({self.min_available_nodes}) counts "
                            "SuperNodes and cannot exceed 'virtual-clients' "
                            f"({self.virtual_clients})")
        return problems

    def _dp_inconsistencies(self) -> list[str]:
        problems = []
        if self.strategy not in DP_STRATEGIES:
            problems.append(f"'dp' needs 'strategy' {' or '.join(DP_STRATEGIES)} (the noise "
                            "and the accounting assume the server releases the average "
                            f"of the clipped updates), got {self.strategy!r}")
        if self.dp_max_epsilon > 0 and self.dp_noise_multiplier == 0:
            problems.append("'dp-max-epsilon' with 'dp-noise-multiplier' 0: without noise "
                            "epsilon is infinite from the first round")
        if self.update_norm_bound > 0:
            problems.append("'dp' clips updates to 'dp-clipping-norm'; set "
                            "'update-norm-bound' to 0")
        count_stddev = self.dp_clipped_count_stddev
        if (self.dp_clipping == "adaptive" and count_stddev > 0
                and self.dp_noise_multiplier >= 2 * count_stddev):
            problems.append(
                f"adaptive clipping: 'dp-noise-multiplier' {self.dp_noise_multiplier:g} "
                f"must be below 2 x 'dp-clipped-count-stddev' ({2 * count_stddev:g}): the "
                "noised count alone would spend more privacy than the whole round may")
        return problems

    def _device_inconsistencies(self) -> list[str]:
        """What the simulated clock cannot (yet) honour, or lacks."""
        clashes = [
            (self.virtual_clients > 0, "multiplexed mode ('virtual-clients') replies once "
             "for many clients, whose times the clock needs one by one; set it to 0"),
            (self.secure_aggregation, "'secure-aggregation' runs its own rounds, off the "
             "clock; set it to false"),
            (self.devices == "fedscale" and not self.device_trace,
             "devices='fedscale' needs 'device-trace' (client_device_capacity)"),
            (self.devices == "drawn" and bool(self.device_trace or self.behaviour_trace),
             "'device-trace' and 'behaviour-trace' are read with devices='fedscale'"),
            (self.straggler_slowdown_min > self.straggler_slowdown_max,
             "'straggler-slowdown-min' must not exceed 'straggler-slowdown-max'")]
        return [f"'devices': {message}" for clash, message in clashes if clash]

    def _fedbuff_inconsistencies(self) -> list[str]:
        """What FedBuff cannot (yet) honour soundly."""
        clashes = [
            (self.secure_aggregation, "'secure-aggregation' masks a round's updates with "
             "the round's other nodes; set it to false"),
            (self.dp != "none", "'dp' accounts rounds of Poisson-sampled clients; set it to "
             "'none'"),
            (self.update_norm_bound > 0, "'update-norm-bound' is not applied to buffered "
             "updates; set it to 0"),
            (self.virtual_clients > 0, "multiplexed mode ('virtual-clients') answers for "
             "many clients at once; set it to 0"),
            (self.over_selection_keep > 0, "'over-selection-keep' is for synchronous "
             "rounds; set it to 0"),
            (self.evaluate_in_train, "'evaluate-in-train' folds evaluation into rounds; "
             "set it to false")]
        return [f"strategy 'fedbuff': {message}" for clash, message in clashes if clash]

    def _secure_aggregation_inconsistencies(self) -> list[str]:
        """What SecAgg+ cannot combine with: the server sees only the sum of updates."""
        problems = []
        clashes = [
            (self.strategy in (*ROBUST_STRATEGIES, "scaffold"),
             f"'strategy' {self.strategy!r} needs each node's update (or SCAFFOLD's control "
             "variates, which would travel unmasked); use fedavg, fedprox, fedavgm or fedadam"),
            (self.dp == "server", "dp='server' clips single updates on the server, which no "
             "longer sees them: use dp='client'"),
            (self.dp != "none" and self.dp_clipping == "adaptive",
             "adaptive clipping needs each client's clipped bit, which would reach the server "
             "in the clear: use dp-clipping='fixed'"),
            (self.update_norm_bound > 0, "'update-norm-bound' clips single updates on the "
             "server; set it to 0 (dp='client' clips on the nodes)"),
            (self.virtual_clients > 0, "multiplexed mode ('virtual-clients') sends one reply "
             "per node for many clients; set it to 0")]
        problems += [f"'secure-aggregation': {message}" for clash, message in clashes if clash]
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares > 1 and (shares != int(shares) or shares < 3):
            problems.append(f"'secagg-num-shares' {shares:g} must be a fraction <= 1 or a "
                            "whole number >= 3")
        if threshold > 1 and threshold != int(threshold):
            problems.append(f"'secagg-reconstruction-threshold' {threshold:g} must be a "
                            "fraction <= 1 or a whole number")
        elif shares > 1 and threshold > 1 and threshold >= shares:
            problems.append(f"'secagg-reconstruction-threshold' {threshold:g} must be below "
                            f"'secagg-num-shares' {shares:g}")
        return problems

    def is_evaluation_round(self, run_round: int) -> bool:
        """Whether the server tests the global model after ``run_round`` (0: the
        starting model): every evaluate-every rounds, and the final model."""
        return run_round % self.evaluate_every == 0 or run_round == self.num_server_rounds

    def to_dict(self) -> dict[str, Any]:
        """The config as run-config keys (hyphenated), e.g. for results.json."""
        return {f.name.replace("_", "-"): getattr(self, f.name)
                for f in dataclasses.fields(self)}

    @staticmethod
    def docs() -> dict[str, tuple[Any, str]]:
        """Key -> (default, description), for the configuration table
        (docs/configuration.md) and the CLI help."""
        return {f.name.replace("_", "-"): (f.default, f.metadata["doc"])
                for f in dataclasses.fields(RunConfig)}

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(_tracker_names(self.tracking))

    @property
    def mlflow_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.output_root / 'mlflow.db'}"

    @property
    def output_root(self) -> Path:
        return expand_path(self.output_dir)

    @property
    def cache_root(self) -> Path:
        return expand_path(self.cache_dir)


def expand_path(path: str) -> Path:
    """Absolute path with ~ expanded (relative paths resolve against the cwd)."""
    return Path(path).expanduser().resolve()


def _coerce(value: Any, type_name: str) -> Any:
    """Return value as the field's type, or None when it is not of that type.

    bool is a subclass of int in Python, so it is rejected explicitly for numbers.
    """
    if type_name == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if type_name == "int":
        return value if isinstance(value, int) else None
    if type_name == "float":
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, str) else None


def _type_name(type_name: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string"}[type_name]
