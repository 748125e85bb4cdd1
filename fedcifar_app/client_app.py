"""fedcifar ClientApp: thin Flower handlers over task.py.

A node's data comes from its node config: either its own directory
(``data-path``, how a real site runs) or a slice of the configured data set
(``partition-id`` and ``num-partitions``, which the simulation engine sets).
Its node config ``device`` overrides the run config's; the node's data goes to
that device once per call, and training and evaluation run there.
"""

from __future__ import annotations

import socket
import time
from logging import WARNING

import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Array, Code, EvaluateRes, FitRes, Status, log, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as legacy

from fedcifar_app import task
from fedcifar_app.config import NodeConfigError, RunConfig, node_config_problems
from fedcifar_app.errors import AnticipatedError
from fedcifar_app.data import PartitionScheme, load_node_data, load_partition, load_partitions
from fedcifar_app.secure_updates import (LEGACY_EVALUATE_PARAMETERS, LEGACY_FIT_PARAMETERS,
                                         masked_update, max_weight)
from fedcifar_app.task import BatchLoader, ImageTensors
from fedcifar_app.virtual_clients import (DP_CLIPPED, DP_WEIGHT, EACH, SEPARATOR, VIRTUAL_CLIENTS,
                                          ClientMean, clip_update, non_finite)

app = ClientApp()


class MalformedInstruction(AnticipatedError, ValueError):
    """A message from the server that this ClientApp cannot act on."""


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


def node_device(config: RunConfig, node_config: dict) -> torch.device:
    """The node config's ``device`` if it sets one (node_config_problems checked it), else
    the run config's."""
    return task.resolve_device(str(node_config.get("device", config.device)))


def _data_on(device: torch.device, config: RunConfig,
             context: Context) -> tuple[ImageTensors, ImageTensors]:
    """This node's (train, validation) data on ``device``."""
    train_data, validation_data = node_data(config, context.node_config)
    return train_data.to(device), validation_data.to(device)


def _node_setup(context: Context) -> tuple[RunConfig, torch.device]:
    """The validated run and node configs; this node's device."""
    config = RunConfig.from_mapping(context.run_config)
    problems = node_config_problems(context.node_config)
    if problems:
        raise NodeConfigError("invalid node config: " + "; ".join(problems))
    limit_torch_threads(context.node_config)
    return config, node_device(config, context.node_config)


def _received_model(msg: Message, config: RunConfig, device: torch.device) -> torch.nn.Module:
    """The global model the instruction carries, checked before anything else is done."""
    net = task.build_model(config.model)
    received = checked_arrays(msg, net.state_dict(), config.model)
    net.load_state_dict(received)
    return net.to(device)


def checked_arrays(msg: Message, expected: dict[str, torch.Tensor],
                   model: str) -> dict[str, torch.Tensor]:
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


def _instruction_problem(msg: Message, expected: dict[str, torch.Tensor],
                         model: str) -> str | None:
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


def _reply(msg: Message, metrics: dict, net: torch.nn.Module | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if net is not None:
        content["arrays"] = ArrayRecord(task.cpu_state_dict(net))
    return Message(content=content, reply_to=msg)


def secure_aggregation_mod(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    """SecAgg+'s protocol messages go through Flower's secaggplus_mod (key exchange,
    masking, unmasking; it calls the train handler once per round, for the update it
    masks); every other message passes untouched."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's training data (multiplexed: on each
    virtual client's data the message lists; with secure aggregation, reply with the
    update for SecAgg+ to mask)."""
    if VIRTUAL_CLIENTS in msg.content.config_records:
        return _serve_virtual_clients(msg, context)
    if LEGACY_FIT_PARAMETERS in msg.content.array_records:
        return _secure_fit(msg, context)
    config, device = _node_setup(context)
    net = _received_model(msg, config, device)
    train_data, validation_data = _data_on(device, config, context)
    received = task.cpu_state_dict(net) if config.dp == "client" else {}
    metrics, control_delta = _train_client(net, config, msg, context, context.node_config,
                                           train_data, validation_data)
    if received:  # dp='client': the update leaves the node clipped
        weights = task.cpu_state_dict(net)
        metrics[DP_CLIPPED] = int(clip_update(weights, received, _dp_clipping_norm(msg)))
        net.load_state_dict(weights)
    reply = _reply(msg, metrics, net)
    reply.content["worker"] = worker_identity()
    if control_delta is not None:
        reply.content["control-delta"] = _parameter_record(net, control_delta)
    return reply


def _from_legacy(msg: Message, config: RunConfig) -> list:
    """Turn a legacy fit or evaluate instruction (what flwr 1.42's SecAgg+ workflow
    sends) into this app's format in place, so that the same handler serves it;
    return the received weights as NumPy arrays."""
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


def _secure_fit(msg: Message, context: Context) -> Message:
    """One round under secure aggregation: train as always, then reply with the
    checked update and its weight as a legacy FitRes, which secaggplus_mod masks."""
    config = RunConfig.from_mapping(context.run_config)
    received = _from_legacy(msg, config)
    trained = train(msg, context).content
    metrics = dict(trained["metrics"])
    weight = metrics.get(DP_WEIGHT, metrics["num-examples"])
    update = masked_update(trained["arrays"].to_numpy_ndarrays(), received, weight,
                           max_weight(config.dp, config.secagg_max_weight))
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(weight), metrics)
    return Message(legacy.fitres_to_recorddict(result, keep_input=False), reply_to=msg)


def _secure_evaluate(msg: Message, context: Context) -> Message:
    """Evaluation under secure aggregation (not masked; the workflow is legacy): the
    same handler, its metrics as a legacy EvaluateRes."""
    _from_legacy(msg, RunConfig.from_mapping(context.run_config))
    metrics = dict(evaluate(msg, context).content["metrics"])
    result = EvaluateRes(Status(Code.OK, ""), float(metrics["eval-loss"]),
                         int(metrics["num-examples"]), metrics)
    return Message(legacy.evaluateres_to_recorddict(result), reply_to=msg)


def _dp_clipping_norm(msg: Message) -> float:
    """The round's DP clipping norm, which the server sends (adaptive clipping moves it)."""
    return float(msg.content["config"]["dp-clipping-norm"])


def _train_client(net: torch.nn.Module, config: RunConfig, msg: Message, context: Context,
                  node_config: dict, train_data: ImageTensors, validation_data: ImageTensors,
                  control_key: str = "client-control"
                  ) -> tuple[dict[str, float], list[torch.Tensor] | None]:
    """One client's round: train ``net`` in place (and, for an attacker, replace it
    with what it sends); return its metrics and, with SCAFFOLD, its control delta.
    ``node_config`` says which client (partition) this is; its SCAFFOLD control
    ``c_i`` is kept in the node state under ``control_key``."""
    # evaluate-in-train: the received model's evaluation rides on the training reply.
    evaluation = _evaluation(net, validation_data) if config.evaluate_in_train else {}
    attack = _node_attack(config, node_config)  # None: an honest client
    received = task.cpu_state_dict(net) if attack is not None else {}
    if attack is not None and attack.poisons_data:
        from fedcifar_app.attacks import flip_labels
        train_data = flip_labels(train_data)
    node = node_config.get("partition-id", context.node_id)
    scaffold = ScaffoldControls.receive(msg, context, net, control_key)
    started = time.perf_counter()
    train_loss, steps = _local_training(net, train_data, config, msg, node, scaffold)
    metrics = {"train-loss": train_loss, "num-examples": len(train_data),
               "train-seconds": time.perf_counter() - started,
               **{f"eval-{name}": value for name, value in evaluation.items()}}
    if config.dp != "none":
        metrics[DP_WEIGHT] = 1  # DP-FedAvg weighs every client the same
    if attack is not None and not attack.poisons_data:
        _poison(net, attack, received, config, msg, node_config, node, train_data)
    if scaffold is None:
        return metrics, None
    return metrics, scaffold.update(context, net, steps=steps,
                                    learning_rate=config.learning_rate)


def _local_training(net: torch.nn.Module, data: ImageTensors, config: RunConfig,
                    msg: Message, node: int, scaffold: ScaffoldControls | None = None
                    ) -> tuple[float, int]:
    """Train ``net`` in place; return (mean loss, SGD steps)."""
    server_round = int(msg.content["config"]["server-round"])
    device = next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(
        _round_seed(config, server_round, node))
    loader = BatchLoader(data, config.batch_size, shuffle=True, augment=config.augment,
                         generator=generator)
    loss = task.train(
        net, loader, config.local_epochs, config.learning_rate, config.momentum,
        config.weight_decay,
        # FedProx puts its mu into the round's config; other strategies don't.
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        drift_correction=None if scaffold is None else scaffold.drift_correction(),
    )
    return loss, config.local_epochs * len(loader)


def _round_seed(config: RunConfig, server_round: int, node: int) -> int:
    """A distinct, reproducible random stream per (seed, round, node): ints hash the
    same in every process, whatever PYTHONHASHSEED."""
    return hash((config.seed, server_round, node)) % 2**63


def _node_attack(config: RunConfig, node_config: dict):  # noqa: ANN202 - NodeAttack | None
    """This node's simulated attack, or None. The attack code is imported only when an
    attack is configured: honest runs never load it."""
    if config.attack == "none" and "attack" not in node_config:
        return None
    from fedcifar_app.attacks import node_attack
    return node_attack(config, node_config)


def _poison(net: torch.nn.Module, attack, received: dict[str, torch.Tensor],  # noqa: ANN001
            config: RunConfig, msg: Message, node_config: dict, node: int,
            own: ImageTensors) -> None:
    """Replace the trained weights in ``net`` with what the attacker sends; ``own`` is
    the node's training data, on its device."""
    from fedcifar_app import attacks

    if attack.kind == "little-is-enough":
        honest = []
        for colluder_id, data in _colluder_data(attack, config, node_config, own):
            colluder = task.build_model(config.model).to(next(net.parameters()).device)
            colluder.load_state_dict(received)
            _local_training(colluder, data, config, msg, colluder_id)
            honest.append(task.cpu_state_dict(colluder))
        sent = attacks.little_is_enough(received, honest, attack.z)
    else:
        round_seed = _round_seed(config, int(msg.content["config"]["server-round"]), node)
        sent = attacks.poisoned(attack, received, task.cpu_state_dict(net),
                                torch.Generator().manual_seed(round_seed))
    net.load_state_dict(sent)


def _colluder_data(attack, config: RunConfig, node_config: dict,  # noqa: ANN001
                   own: ImageTensors) -> list[tuple[int, ImageTensors]]:
    """Training data the colluding attackers pool: each attacking partition's in
    simulation, shards of this node's own data (``own``) on a deployed node."""
    if attack.colluders:
        node_config = dict(node_config)
        pooled = []
        for partition in attack.colluders:
            node_config["partition-id"] = partition
            pooled.append((partition, node_data(config, node_config)[0].to(own.device)))
        return pooled
    from fedcifar_app.attacks import LIE_SHARDS

    shards = torch.arange(len(own), device=own.device).chunk(LIE_SHARDS)
    return [(index, own.subset(shard)) for index, shard in enumerate(shards)]


class ScaffoldControls:
    """The SCAFFOLD round of one node: the server's control ``c`` from the message,
    the node's own ``c_i`` from its node state (zero at first), and the weights
    training started from. Parameters are taken in ``net.named_parameters()`` order."""

    def __init__(self, server: list[torch.Tensor], client: list[torch.Tensor],
                 global_weights: list[torch.Tensor], control_key: str) -> None:
        self.server, self.client, self.global_weights = server, client, global_weights
        self.control_key = control_key

    @classmethod
    def receive(cls, msg: Message, context: Context, net: torch.nn.Module,
                control_key: str) -> ScaffoldControls | None:
        """The controls for this round, or None if the strategy is not SCAFFOLD; the
        client's own is in the node state under ``control_key``."""
        if "server-control" not in msg.content.array_records:
            return None
        server = _parameter_tensors(msg.content["server-control"], net)
        if control_key in context.state.array_records:
            client = _parameter_tensors(context.state[control_key], net)
        else:
            client = [torch.zeros_like(t) for t in server]
        return cls(server, client, [p.detach().clone() for p in net.parameters()],
                   control_key)

    def drift_correction(self) -> list[torch.Tensor]:
        return [c - c_i for c, c_i in zip(self.server, self.client, strict=True)]

    def update(self, context: Context, net: torch.nn.Module, steps: int,
               learning_rate: float) -> list[torch.Tensor]:
        """Store the new ``c_i`` in the node state; return its change for the server."""
        new_client = task.scaffold_client_control(
            self.client, self.server, self.global_weights,
            [p.detach() for p in net.parameters()], steps, learning_rate)
        context.state[self.control_key] = _parameter_record(net, new_client)
        return [new - old for new, old in zip(new_client, self.client, strict=True)]


def _parameter_tensors(record: ArrayRecord, net: torch.nn.Module) -> list[torch.Tensor]:
    """A record's tensors in ``net.named_parameters()`` order, on ``net``'s device."""
    tensors = record.to_torch_state_dict()
    return [tensors[name].to(param.device) for name, param in net.named_parameters()]


def _parameter_record(net: torch.nn.Module, tensors: list[torch.Tensor]) -> ArrayRecord:
    names = [name for name, _ in net.named_parameters()]
    return ArrayRecord({name: tensor.cpu() for name, tensor in zip(names, tensors, strict=True)})


def _serve_virtual_clients(msg: Message, context: Context) -> Message:
    """Multiplexed mode: train or evaluate, one after another, the virtual clients
    the message lists, and reply once for all (see strategies/multiplex.py). A client
    that fails is reported, not fatal to the others."""
    if "data-path" in context.node_config:
        raise NodeConfigError(
            "multiplexed mode ('virtual-clients') needs nodes that hold the whole data set "
            "and serve partitions of it (simulation); this node holds its own data-path: "
            "run deployments with virtual-clients=0")
    config, device = _node_setup(context)
    bundle = msg.content[VIRTUAL_CLIENTS]
    clients = [int(c) for c in bundle["partition-ids"]]
    each = bundle["reply"] == EACH
    training = msg.metadata.message_type == MessageType.TRAIN
    net = task.build_model(config.model).to(device)
    received = {name: tensor.to(device) for name, tensor in
                checked_arrays(msg, net.state_dict(), config.model).items()}
    net.load_state_dict(received)
    data = load_partitions(config.dataset, config.cache_root,
                           partition_scheme(config, config.virtual_clients), clients)
    results = _ServedClients(each, [name for name, _ in net.named_parameters()],
                             DP_WEIGHT if config.dp != "none" else "num-examples")
    # With DP the node clips each client's update: the server sees only their mean.
    bound = (_dp_clipping_norm(msg) if config.dp != "none" and training
             else config.update_norm_bound)
    start = [received[name] for name in net.state_dict()]
    for client, (train_data, validation_data) in zip(clients, data, strict=True):
        _reset(net, start)
        node_config = {**context.node_config, "partition-id": client,
                       "num-partitions": config.virtual_clients}
        try:
            if training:
                metrics, control_delta = _train_client(
                    net, config, msg, context, node_config, train_data.to(device),
                    validation_data.to(device), control_key=f"client-control/{client}")
            else:
                metrics, control_delta = _client_evaluation(net, validation_data.to(device),
                                                            config)
        except Exception as err:  # noqa: BLE001 - one client's failure is reported
            results.failed(client, err)
            continue
        # The trained weights as they are (no copy): used before the next client loads.
        weights = {k: v.detach() for k, v in net.state_dict().items()} if training else None
        problem = None if each else _client_problem(metrics, weights)
        if problem is not None:
            results.rejected(client, problem)
            continue
        clipped = (weights is not None and not each and bound > 0
                   and clip_update(weights, received, bound))
        results.served(client, metrics, weights, control_delta, clipped)
    content = results.content()
    content["worker"] = worker_identity()
    return Message(content=content, reply_to=msg)


class _ServedClients:
    """One multiplexed reply in the making: what became of each client, and their
    mean result (or, with ``each``, every client's result)."""

    def __init__(self, each: bool, parameter_names: list[str], weight_key: str) -> None:
        self.each = each
        self.parameter_names = parameter_names
        self.mean = ClientMean(weight_key)
        self.records = RecordDict()
        self.outcome: dict[str, list] = {"served": [], "failed": [], "failure-reasons": [],
                                         "rejected": []}
        self.clipped = 0
        self.train_seconds = 0.0

    def failed(self, client: int, err: Exception) -> None:
        log(WARNING, "virtual client %d failed: %s: %s", client, type(err).__name__, err)
        self.outcome["failed"].append(client)
        self.outcome["failure-reasons"].append(f"{type(err).__name__}: {err}")

    def rejected(self, client: int, problem: str) -> None:
        log(WARNING, "virtual client %d: dropped its result: %s", client, problem)
        self.outcome["rejected"].append(client)

    def served(self, client: int, metrics: dict[str, float],
               weights: dict[str, torch.Tensor] | None,
               control_delta: list[torch.Tensor] | None, clipped: bool) -> None:
        self.outcome["served"].append(client)
        self.clipped += int(clipped)
        self.train_seconds += float(metrics.get("train-seconds", 0.0))
        if self.each:
            self.records[f"arrays{SEPARATOR}{client}"] = ArrayRecord(
                {k: v.cpu() for k, v in weights.items()})
            self.records[f"metrics{SEPARATOR}{client}"] = MetricRecord(metrics)
        else:
            self.mean.add(weights, metrics, None if control_delta is None
                          else dict(zip(self.parameter_names, control_delta, strict=True)))

    def content(self) -> RecordDict:
        if self.mean.clients:
            self.records["metrics"] = MetricRecord(self.mean.metrics())
            model = self.mean.model()
            if model:
                self.records["arrays"] = ArrayRecord({k: v.cpu() for k, v in model.items()})
            control_delta = self.mean.per_client_mean()
            if control_delta:
                self.records["control-delta"] = ArrayRecord(control_delta)
        self.records[VIRTUAL_CLIENTS] = ConfigRecord({
            **self.outcome, "clipped": self.clipped, "train-seconds": self.train_seconds})
        return self.records


@torch.no_grad()
def _reset(net: torch.nn.Module, start: list[torch.Tensor]) -> None:
    """Load the received weights back into ``net`` (its state_dict order) for the next
    client: a copy per tensor, without load_state_dict's checks (already made once)."""
    for tensor, value in zip(net.state_dict().values(), start, strict=True):
        tensor.copy_(value)


def _client_evaluation(net: torch.nn.Module, data: ImageTensors, config: RunConfig
                       ) -> tuple[dict[str, float], None]:
    evaluation = _evaluation(net, data)
    metrics = {"eval-loss": evaluation["loss"], "eval-accuracy": evaluation["accuracy"],
               "num-examples": evaluation["num-examples"]}
    if config.dp != "none":  # the strategy averages every reply by this weight
        metrics[DP_WEIGHT] = 1
    return metrics, None


def _client_problem(metrics: dict[str, float],
                    weights: dict[str, torch.Tensor] | None) -> str | None:
    """Why one virtual client's result must not join its node's mean: the server's
    per-update checks, made on the node because the server sees only the mean."""
    if not metrics["num-examples"] > 0:
        return f"'num-examples' must be positive, got {metrics['num-examples']}"
    return None if weights is None else non_finite(weights)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's one question per node: which partition this node holds
    (simulation), so that its draws follow the seed; a node with its own
    ``data-path`` holds none and answers with no partition id."""
    asked = msg.content["config"].get("query")
    if asked != "partition-id":
        raise ValueError(f"unknown query {asked!r}; this ClientApp answers 'partition-id'")
    partition = context.node_config.get("partition-id")
    return _reply(msg, {} if partition is None else {"partition-id": int(partition)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's validation data (multiplexed: on
    each virtual client's the message lists)."""
    if VIRTUAL_CLIENTS in msg.content.config_records:
        return _serve_virtual_clients(msg, context)
    if LEGACY_EVALUATE_PARAMETERS in msg.content.array_records:
        return _secure_evaluate(msg, context)
    config, device = _node_setup(context)
    net = _received_model(msg, config, device)
    _, validation_data = _data_on(device, config, context)
    metrics, _ = _client_evaluation(net, validation_data, config)
    return _reply(msg, metrics)


def _evaluation(net: torch.nn.Module, data: ImageTensors) -> dict[str, float]:
    loss, accuracy = task.test(net, BatchLoader(data, task.EVAL_BATCH_SIZE))
    return {"loss": loss, "accuracy": accuracy, "num-examples": len(data)}
