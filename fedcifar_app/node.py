"""What a node needs for a round, apart from Flower's handlers: its configs, data and
device, the checked global model, one client's training with the extensions' hooks,
and evaluation.

A node's data comes from its node config: either its own directory (``data-path``,
how a real site runs) or a slice of the configured data set (``partition-id`` and
``num-partitions``, which the simulation engine sets). Its node config ``device``
overrides the run config's; the node's data goes to that device once per call, and
training and evaluation run there.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)

from fedcifar_app import task
from fedcifar_app.config import NodeConfigError, RunConfig, node_config_problems
from fedcifar_app.data import PartitionScheme, load_node_data, load_partition
from fedcifar_app.errors import AnticipatedError
from fedcifar_app.task import BatchLoader, ImageTensors

StateDict = dict[str, torch.Tensor]
# The metric replies are weighted by when every client weighs the same (DP-FedAvg);
# otherwise 'num-examples'. A reply for several clients holds their count.
UNIT_WEIGHT = "dp-weight"


class MalformedInstruction(AnticipatedError, ValueError):
    """A message from the server that this ClientApp cannot act on."""


# --- Configs, device, data -------------------------------------------------------------

def node_setup(context: Context) -> tuple[RunConfig, torch.device]:
    """The validated run and node configs; this node's device (its node config's
    ``device`` if it sets one, else the run config's). Sets this process's torch threads
    and has its allocator reuse freed memory."""
    config = RunConfig.from_mapping(context.run_config)
    problems = node_config_problems(context.node_config)
    if problems:
        raise NodeConfigError("invalid node config: " + "; ".join(problems))
    limit_torch_threads(context.node_config)
    task.reuse_freed_memory()
    return config, task.resolve_device(str(context.node_config.get("device", config.device)))


def node_data(config: RunConfig, node_config: dict) -> tuple[ImageTensors, ImageTensors]:
    """This node's (train, validation) data, as its node config describes."""
    if "data-path" in node_config:
        return load_node_data(str(node_config["data-path"]), config.cache_root,
                              config.validation_fraction, config.seed)
    if "partition-id" in node_config and "num-partitions" in node_config:
        return load_partition(config.dataset, config.cache_root,
                              partition_scheme(config, int(node_config["num-partitions"])),
                              int(node_config["partition-id"]))
    raise NodeConfigError(
        "this SuperNode's node config names no data: start it with "
        "--node-config \"data-path='/abs/path/to/node/data'\" (a directory with "
        "train.parquet) or --node-config \"partition-id=0 num-partitions=N\" "
        f"(got node config {dict(node_config)})")


def node_data_on(device: torch.device, config: RunConfig,
                 node_config: dict) -> tuple[ImageTensors, ImageTensors]:
    train_data, validation_data = node_data(config, node_config)
    return train_data.to(device), validation_data.to(device)


def partition_scheme(config: RunConfig, num_partitions: int) -> PartitionScheme:
    return PartitionScheme(
        partitioner=config.partitioner,
        num_partitions=num_partitions,
        dirichlet_alpha=config.dirichlet_alpha,
        classes_per_partition=config.classes_per_partition,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        dirichlet_min_partition_size=config.dirichlet_min_partition_size,
        dirichlet_self_balancing=config.dirichlet_self_balancing,
    )


def limit_torch_threads(node_config: dict) -> None:
    """Keep concurrent ClientApps from oversubscribing the cores.

    A node config ``torch-threads`` wins; in simulation the default is the CPUs Ray
    assigned to this ClientApp (client-resources-num-cpus), since torch would
    otherwise start one thread per core in every concurrently running client.
    """
    threads = node_config.get("torch-threads")
    if threads is None:
        threads = _ray_assigned_cpus()
    if threads is not None and int(threads) != torch.get_num_threads():
        torch.set_num_threads(max(int(threads), 1))


def _ray_assigned_cpus() -> int | None:
    ray = _ray_if_running()
    if ray is None:
        return None
    return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)) or None


def _ray_if_running():  # noqa: ANN202 - the ray module, or None outside a Ray worker
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None


def worker_identity() -> ConfigRecord:
    """Where this ClientApp ran: the host, and in simulation the Ray node and its IP
    (on a multi-machine Ray cluster, which machine trained)."""
    identity = {"host": socket.gethostname()}
    ray = _ray_if_running()
    if ray is not None:
        identity["ray-node"] = ray.get_runtime_context().get_node_id()
        identity["ray-node-ip"] = ray.util.get_node_ip_address()
    return ConfigRecord(identity)


# --- The server's instruction -----------------------------------------------------------

def received_model(msg: Message, config: RunConfig, device: torch.device) -> torch.nn.Module:
    """The global model the instruction carries, checked before anything else is done."""
    net = task.build_model(config.model)
    net.load_state_dict(checked_arrays(msg, net.state_dict(), config.model))
    return net.to(device)


def checked_arrays(msg: Message, expected: StateDict, model: str) -> StateDict:
    """The instruction's global model as tensors; MalformedInstruction, saying what is
    wrong, unless it is a finite copy of ``expected``'s layout (and, for training, the
    round number is there)."""
    problem = _instruction_problem(msg, expected, model)
    received = {} if problem else msg.content["arrays"].to_torch_state_dict()
    problem = problem or non_finite(received)
    if problem:
        raise MalformedInstruction(f"the server's {msg.metadata.message_type} instruction "
                                   f"cannot be used: {problem}")
    return received


def _instruction_problem(msg: Message, expected: StateDict, model: str) -> str | None:
    content = msg.content
    if "arrays" not in content.array_records:
        return "it holds no ArrayRecord 'arrays' (the global model)"
    config = content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and (
            config is None or not isinstance(config.get("server-round"), int)):
        return "it holds no ConfigRecord 'config' with an integer 'server-round'"
    arrays = content["arrays"]
    if set(arrays) != set(expected):
        return (f"its arrays are not the {model} model's (missing "
                f"{sorted(set(expected) - set(arrays))[:3]}, unexpected "
                f"{sorted(set(arrays) - set(expected))[:3]})")
    for name, tensor in expected.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tuple(arrays[name].shape) != tuple(tensor.shape) or arrays[name].dtype != dtype:
            return (f"'{name}' is {arrays[name].dtype}{list(arrays[name].shape)}, the "
                    f"{model} model's is {dtype}{list(tensor.shape)}")
    return None


def non_finite(weights: StateDict) -> str | None:
    """The first tensor holding NaN or Inf, or None.

    The fast path sums each tensor (a tenth of the cost of isfinite on every value,
    paid once per client): a sum is finite unless a value is NaN or Inf, or the
    values are too large to add up, which no trained model has."""
    floats = [t for t in weights.values() if t.is_floating_point()]
    if math.isfinite(sum(float(t.sum()) for t in floats)):
        return None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"'{name}' holds NaN or Inf"
    return "its weights are too large to add up (over 1e38)"


# --- One client's round -------------------------------------------------------------------

@dataclass
class ClientRound:
    """One client's training round, as the training hooks see and change it: the
    received model (trained in place), its data, the metrics and tensors of its reply."""

    config: RunConfig
    instruction: Message
    net: torch.nn.Module
    train_data: ImageTensors
    validation_data: ImageTensors
    node_config: dict  # which client this is (partition-id in simulation)
    state: RecordDict  # kept on the node between rounds (the Context's state)
    client_id: int  # its partition, else the node's ID: seeds its randomness
    state_suffix: str = ""  # a multiplexed node keeps each client's state apart
    metrics: dict[str, float] = field(default_factory=dict)
    # Reply records beside the model, by name: parameter name -> tensor.
    tensors: dict[str, StateDict] = field(default_factory=dict)
    drift_correction: list[torch.Tensor] | None = None  # SCAFFOLD's c - c_i
    steps: int = 0  # SGD steps taken

    @property
    def server_round(self) -> int:
        return int(self.instruction.content["config"]["server-round"])

    def state_key(self, name: str) -> str:
        return name + self.state_suffix


class TrainingHook:
    """What an extension does around a client's local training (see extensions/)."""

    def before_training(self, client: ClientRound) -> None:
        """Change what the client trains (data, drift correction) before it does."""

    def after_training(self, client: ClientRound) -> None:
        """Change or add to what the client sends (weights, metrics, tensors)."""

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        """Add to an evaluation's metrics."""


def train_client(client: ClientRound, hooks: list[TrainingHook]) -> None:
    """Train ``client.net`` in place: the hooks before, local training, the hooks after.
    With evaluate-in-train, the received model's evaluation rides on the reply."""
    (failure,) = train_clients([(client, hooks)])
    if failure is not None:
        raise failure


def train_clients(clients: Sequence[tuple[ClientRound, list[TrainingHook]]]
                  ) -> list[Exception | None]:
    """Train several clients' nets in place, each with its hooks: every client's hooks
    before, their local training together (``task.train_together``: one batched
    computation, the same result as one after another), every client's hooks after.
    Return what each client failed with (None where it trained): a client whose
    hooks raise or whose training diverges is left out, the others go on. Their
    ``train-seconds`` is the shared training time, split evenly."""
    failures: list[Exception | None] = [None] * len(clients)
    ready = []
    for position, (client, hooks) in enumerate(clients):
        try:
            _before_training(client, hooks)
            ready.append(position)
        except Exception as err:  # noqa: BLE001 - one client's failure is its own
            failures[position] = err
    started = time.perf_counter()
    try:
        losses = local_training_together([clients[position][0] for position in ready])
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: these clients failed
        for position in ready:
            failures[position] = err
        return failures
    seconds = (time.perf_counter() - started) / max(len(ready), 1)
    for position, loss in zip(ready, losses, strict=True):
        client, hooks = clients[position]
        try:
            client.metrics.update({"train-loss": task.checked_loss(loss),
                                   "num-examples": len(client.train_data),
                                   "train-seconds": seconds})
            for hook in hooks:
                hook.after_training(client)
        except Exception as err:  # noqa: BLE001 - one client's failure is its own
            failures[position] = err
    return failures


def _before_training(client: ClientRound, hooks: list[TrainingHook]) -> None:
    if client.config.evaluate_in_train:
        client.metrics.update(evaluation_metrics(client.net, client.validation_data,
                                                 prefix="eval-"))
    for hook in hooks:
        hook.before_training(client)


def local_training_together(clients: Sequence[ClientRound]) -> list[float]:
    """Train the clients' nets in place, together; return each one's mean loss (not
    checked: NaN where it diverged) and set its SGD steps."""
    if not clients:
        return []
    config = clients[0].config
    loaders = [client_loader(c.train_data, config, c.server_round, c.client_id)
               for c in clients]
    for client, loader in zip(clients, loaders, strict=True):
        client.steps = config.local_epochs * len(loader)
    return task.train_together(
        [c.net for c in clients], loaders, config.local_epochs, config.learning_rate,
        config.momentum, config.weight_decay,
        proximal_mu=_proximal_mu(clients[0].instruction),
        drift_corrections=[c.drift_correction for c in clients])


def local_training(net: torch.nn.Module, data: ImageTensors, config: RunConfig,
                   msg: Message, client_id: int,
                   drift_correction: list[torch.Tensor] | None = None) -> tuple[float, int]:
    """Train ``net`` in place; return (mean loss, SGD steps)."""
    server_round = int(msg.content["config"]["server-round"])
    loader = client_loader(data, config, server_round, client_id)
    loss = task.train(net, loader, config.local_epochs, config.learning_rate,
                      config.momentum, config.weight_decay,
                      proximal_mu=_proximal_mu(msg), drift_correction=drift_correction)
    return loss, config.local_epochs * len(loader)


def _proximal_mu(msg: Message) -> float:
    # FedProx puts its mu into the round's config; other strategies don't.
    return float(msg.content["config"].get("proximal-mu", 0.0))


def client_loader(data: ImageTensors, config: RunConfig, server_round: int,
                  client_id: int) -> BatchLoader:
    """A client's training batches: shuffled (and augmented) by its own random stream."""
    generator = torch.Generator(device=data.device).manual_seed(
        round_seed(config, server_round, client_id))
    return BatchLoader(data, config.batch_size, shuffle=True, augment=config.augment,
                       generator=generator)


def round_seed(config: RunConfig, server_round: int, client_id: int) -> int:
    """A distinct, reproducible random stream per (seed, round, client): ints hash the
    same in every process, whatever PYTHONHASHSEED."""
    return hash((config.seed, server_round, client_id)) % 2**63


def evaluation_metrics(net: torch.nn.Module, data: ImageTensors,
                       prefix: str = "eval-") -> dict[str, float]:
    """Loss, accuracy and example count of ``net`` on ``data``, named with ``prefix``."""
    loss, accuracy = task.test(net, BatchLoader(data, task.EVAL_BATCH_SIZE))
    return {f"{prefix}loss": loss, f"{prefix}accuracy": accuracy,
            f"{prefix}num-examples": len(data)}


def client_evaluation(net: torch.nn.Module, data: ImageTensors,
                      hooks: list[TrainingHook]) -> dict[str, float]:
    """What a client's evaluation reply holds."""
    evaluation = evaluation_metrics(net, data)
    metrics = {"eval-loss": evaluation["eval-loss"],
               "eval-accuracy": evaluation["eval-accuracy"],
               "num-examples": evaluation["eval-num-examples"]}
    for hook in hooks:
        hook.after_evaluation(metrics)
    return metrics


def reply(msg: Message, metrics: dict, net: torch.nn.Module | None = None,
          tensors: dict[str, StateDict] | None = None) -> Message:
    """The reply to ``msg``: its metrics, and the trained model and other tensors."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if net is not None:
        content["arrays"] = ArrayRecord(task.cpu_state_dict(net))
    for name, record in (tensors or {}).items():
        content[name] = ArrayRecord({k: v.cpu() for k, v in record.items()})
    return Message(content=content, reply_to=msg)


@dataclass(frozen=True)
class NodeHooks:
    """Where a mod that trains clients itself (multiplexing) gets their hooks."""

    training: Callable[[RunConfig, dict], list[TrainingHook]]
    evaluation: Callable[[RunConfig], list[TrainingHook]]


def clip_update(weights: StateDict, start: StateDict, bound: float) -> bool:
    """Shorten ``weights - start`` to L2 norm ``bound`` in place (the norm over all
    tensors, as Flower's clipping measures it); return whether it was longer."""
    squared = sum(float((weights[k].double() - start[k].double()).pow(2).sum())
                  for k in start)
    norm = math.sqrt(squared)
    if norm <= bound:
        return False
    for name, reference in start.items():
        update = (weights[name].double() - reference.double()) * (bound / norm)
        weights[name] = (reference.double() + update).to(weights[name].dtype)
    return True
