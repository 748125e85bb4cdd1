"""pfl-research on fedcifar's cross-device workload, through pfl's public API.

    pip install -e ".[pfl]"    # pfl[pytorch] 0.6 (it pins dp-accounting < 0.6)
    python benchmarks/peers/pfl_cross_device.py --dataset $DATA --out result.json
    python -m torch.distributed.run --nproc_per_node 2 \
        benchmarks/peers/pfl_cross_device.py --dataset $DATA --out result.json --threads 1

The workload of ``benchmarks/cross_device.py`` (its module docstring): the same 1,000
users (fedcifar's IID partitions of the training split, seed 42), a cohort of 50 per
round (pfl's ``minimize_reuse`` sampler), one local epoch of batch 10, local SGD lr
0.1 without momentum, central SGD lr 1 (FedAvg), updates weighted by examples, the
tutorial CNN (``fedcifar_app.task.Net``), test accuracy on the 10,000 test images at
rounds 100 and 200. Each user's images are normalised once, up front, as pfl's own
benchmarks prepare theirs. Under torchrun pfl splits each cohort between the
processes (gloo); the first process writes ``--out``: seconds per round (median over
rounds without evaluation, the first two left out) and the accuracies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel

from fedcifar_app import task
from fedcifar_app.data import PartitionScheme, load_partitions, load_split

class PflNet(task.Net):
    """The tutorial CNN with the ``loss`` and ``metrics`` pfl's PyTorchModel calls."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor, eval: bool = False  # noqa: A002
             ) -> torch.Tensor:
        self.eval() if eval else self.train()
        return F.cross_entropy(self(images), labels)

    @torch.no_grad()
    def metrics(self, images: torch.Tensor, labels: torch.Tensor, eval: bool = False  # noqa: A002
                ) -> dict[str, Weighted]:
        self.eval() if eval else self.train()
        logits = self(images)
        return {"loss": Weighted(F.cross_entropy(logits, labels, reduction="sum").item(),
                                 len(labels)),
                "accuracy": Weighted((logits.argmax(1) == labels).sum().item(), len(labels))}


class RoundClock(TrainingProcessCallback):
    """When each round ended, and the test accuracy after rounds that are multiples of
    ``every`` (pfl's central iterations count from 0: iteration i ends round i + 1)."""

    def __init__(self, test_data: Dataset, every: int) -> None:
        self.test_data = test_data
        self.every = every
        self.ended: list[float] = []
        self.accuracy: dict[int, float] = {}

    def on_train_begin(self, *, model: PyTorchModel) -> Metrics:
        self.ended.append(time.perf_counter())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics: Metrics, model: PyTorchModel, *,
                                central_iteration: int) -> tuple[bool, Metrics]:
        round_ = central_iteration + 1
        if round_ % self.every == 0:
            metrics = model.evaluate(self.test_data,
                                     eval_params=NNEvalHyperParams(local_batch_size=10_000))
            self.accuracy[round_] = next(value.overall_value for name, value in metrics
                                         if str(name) == "accuracy")
        self.ended.append(time.perf_counter())
        return False, Metrics()


def normalised(data: task.ImageTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data``, in order, normalised as fedcifar's loader does (one batch)."""
    return next(iter(task.BatchLoader(data, len(data))))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dataset = str(Path(args.dataset).resolve())
    cache = Path(args.cache_dir).expanduser().resolve()
    scheme = PartitionScheme("iid", args.users, 1.0, 10, 0.0, args.seed)
    users = {str(u): normalised(train) for u, (train, _) in
             enumerate(load_partitions(dataset, cache, scheme, list(range(args.users))))}
    federated = FederatedDataset(lambda user: Dataset(users[user], user_id=user),
                                 get_user_sampler("minimize_reuse", list(users)))
    net = PflNet()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), 1.0))
    clock = RoundClock(Dataset(normalised(load_split(dataset, "test", cache))),
                       args.evaluate_every)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds,
                                           evaluation_frequency=args.evaluate_every,
                                           train_cohort_size=args.cohort, val_cohort_size=0),
        backend=SimulatedBackend(training_data=federated, val_data=None,
                                 postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=args.learning_rate,
                                              local_num_epochs=1,
                                              local_batch_size=args.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=10_000),
        callbacks=[clock])
    durations = {round_: later - earlier for round_, (earlier, later)
                 in enumerate(itertools.pairwise(clock.ended), start=1)}
    unevaluated = [seconds for round_, seconds in durations.items()
                   if round_ not in clock.accuracy]
    steady = unevaluated[2:] or unevaluated  # short smoke runs: every round there is
    return {"processes": int(os.environ.get("WORLD_SIZE", 1)), "threads": args.threads,
            "rounds": args.rounds, "s_per_round": statistics.median(steady),
            "test_accuracy": clock.accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cache-dir", default="~/.cache/fedcifar")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--evaluate-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    result = run(args)
    if int(os.environ.get("RANK", 0)) == 0:
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
