"""Cross-device CIFAR-10 at the compute limit: pfl-research's benchmark workload.

    python benchmarks/cross_device.py --dataset /abs/path/to/cifar10 [--rounds 200]
        [--parts bare multiplexed per-node large]

The workload (pfl-research's cross-device CIFAR-10 benchmark): 1,000 IID users of
50 images, a cohort of 50 users per round, one local epoch of batch 10, local SGD
lr 0.1 without momentum, server learning rate 1 (FedAvg), the tutorial CNN, no
augmentation, no client-side evaluation. Parts, run one after another:

* ``bare``: the same rounds with no federation at all, a plain PyTorch loop over
  the cohort's 2,500 images (no loader, no metrics: the compute limit): one
  process with 1 thread, with 2 threads, and two
  processes of 1 thread each training half the cohort (the parent averages), as
  pfl-research runs with torchrun;
* ``multiplexed``: fedcifar, ``virtual-clients=1000`` on as many SuperNodes as
  cores (one CPU each);
* ``per-node``: fedcifar, 1,000 simulated SuperNodes, ``fraction-train`` 0.05;
* ``large``: 10,000 virtual clients of 5 images, a cohort of 500, multiplexed:
  seconds per round and the peak RSS of the whole process tree (SuperLink,
  simulation, Ray and its workers; shared pages counted once per process).

Server-side evaluation on the 10,000 test images runs only at rounds 100 and 200
(``evaluate-every`` 100); seconds per round are the median over the rounds that
did not evaluate (the first round, which starts the Ray workers, is left out).
Results go to cross_device.json under --out after each part; parts already there
are skipped (delete the file, or a part's entry, to measure again).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PeakRss, add_data_arguments, data_config, flwr_run, load, machine, save

from fedcifar_app import task
from fedcifar_app.data import PartitionScheme, load_partitions
from fedcifar_app.ops.local_simulation import managed_superlink_pids

BATCH, LEARNING_RATE, SEED = 10, 0.1, 42
WORKLOAD = (f"partitioner='iid' validation-fraction=0.0 fraction-evaluate=0.0 local-epochs=1 "
            f"batch-size={BATCH} learning-rate={LEARNING_RATE} momentum=0.0 augment=false "
            f"strategy='fedavg' model='tutorial-cnn' seed={SEED} evaluate-every=100 "
            "min-available-nodes=1")
CORES = os.cpu_count() or 1


# -- bare PyTorch loop ----------------------------------------------------------------

def _user_data(args: argparse.Namespace) -> list[task.ImageTensors]:
    scheme = PartitionScheme("iid", args.users, 1.0, 10, 0.0, SEED)
    cache = Path(args.cache_dir).expanduser().resolve()
    return [train for train, _ in load_partitions(str(Path(args.dataset).resolve()), cache,
                                                  scheme, list(range(args.users)))]


def _train_users(global_state: dict, users: list[task.ImageTensors], server_round: int
                 ) -> tuple[dict[str, torch.Tensor], int]:
    """Train each user from ``global_state`` with a plain PyTorch loop (normalise once,
    shuffle, batches of BATCH, cross-entropy, SGD); return the example-weighted sum of
    their models and the number of examples."""
    net = task.Net()
    mean = torch.tensor(task.CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(task.CIFAR10_STD).view(1, 3, 1, 1) * 255
    total: dict[str, torch.Tensor] = {}
    examples = 0
    for index, data in enumerate(users):
        net.load_state_dict(global_state)
        optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
        images = (data.images.float() - mean) / std
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(
            server_round * 100_003 + index))
        for start in range(0, len(data), BATCH):
            batch = order[start:start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(images[batch]), data.labels[batch]).backward()
            optimizer.step()
        for name, tensor in net.state_dict().items():
            term = tensor * len(data)
            total[name] = total[name] + term if name in total else term
        examples += len(data)
    return total, examples


# Each worker process's users, loaded once by the pool's initializer.
_WORKER_USERS: list[task.ImageTensors] = []


def _worker_init(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER_USERS.extend(_user_data(args))


def _worker_round(job: tuple[dict, list[int], int]) -> tuple[dict, int]:
    global_state, users, server_round = job
    return _train_users(global_state, [_WORKER_USERS[u] for u in users], server_round)


def bare_loop(args: argparse.Namespace, threads: int, processes: int) -> dict:
    """Seconds per round of plain FedAvg rounds in this process (``threads``) or in
    ``processes`` worker processes of one thread, each training a share of the cohort."""
    users = _user_data(args)
    rng = random.Random(SEED)
    global_state = task.Net().state_dict()
    pool = None
    if processes > 1:
        pool = multiprocessing.get_context("fork").Pool(processes, _worker_init, (args,))
    torch.set_num_threads(threads)
    times = []
    try:
        for server_round in range(1, args.bare_rounds + 3):
            cohort = rng.sample(range(args.users), args.cohort)
            started = time.perf_counter()
            if pool is None:
                total, examples = _train_users(global_state, [users[u] for u in cohort],
                                               server_round)
            else:
                shares = [cohort[i::processes] for i in range(processes)]
                parts = pool.map(_worker_round,
                                 [(global_state, share, server_round) for share in shares])
                total = {k: sum(part[0][k] for part in parts) for k in parts[0][0]}
                examples = sum(part[1] for part in parts)
            global_state = {k: v / examples for k, v in total.items()}
            if server_round > 2:  # two warm-up rounds
                times.append(time.perf_counter() - started)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = statistics.median(times)
    samples = sum(len(users[u]) for u in cohort)
    return {"threads": threads, "processes": processes, "rounds": len(times),
            "s_per_round": seconds, "samples_per_s": samples / seconds}


# -- fedcifar ---------------------------------------------------------------------------

def fedcifar(args: argparse.Namespace, out: Path, users: int, cohort: int, rounds: int,
             multiplexed: bool) -> dict:
    nodes = CORES if multiplexed else users
    run_config = (f"{data_config(args, out / 'runs' / 'cross-device')} {WORKLOAD} "
                  f"num-server-rounds={rounds} fraction-train={cohort / users} "
                  + (f"virtual-clients={users}" if multiplexed else ""))
    with PeakRss(managed_superlink_pids) as rss:
        wall, run_dir, _ = flwr_run(run_config,
                                    f"num-supernodes={nodes} client-resources-num-cpus=1")
    entries = load(run_dir / "results.json")["entries"]
    round_s = {b["round"]: b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])}
    steady = [round_s[e["round"]] for e in entries[2:] if not e.get("evaluated")]
    seconds = statistics.median(steady)
    samples = entries[-1]["samples_trained"] / rounds
    accuracy = {e["round"]: e["test_accuracy"] for e in entries if e.get("evaluated")}
    return {"users": users, "cohort": cohort, "supernodes": nodes, "rounds": rounds,
            "wall_s": wall, "run_dir": str(run_dir), "s_per_round": seconds,
            "mean_s_per_round_all": (entries[-1]["elapsed_s"] - entries[0]["elapsed_s"]) / rounds,
            "samples_per_s": samples / seconds,
            "test_accuracy": accuracy, "peak_rss_gib": round(rss.peak / 2**30, 2),
            "trained_per_round": statistics.median(e["train_replies"] for e in entries[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--bare-rounds", type=int, default=20,
                        help="timed rounds of each bare loop, after two warm-up rounds")
    parser.add_argument("--large-users", type=int, default=10_000)
    parser.add_argument("--large-cohort", type=int, default=500)
    parser.add_argument("--large-rounds", type=int, default=20)
    parser.add_argument("--parts", nargs="+", default=["bare", "multiplexed", "per-node", "large"],
                        choices=["bare", "multiplexed", "per-node", "large"])
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "cross_device.json"
    report = load(report_path) or {"machine": machine(), "workload": WORKLOAD,
                                   "users": args.users, "cohort": args.cohort, "parts": {}}
    jobs = {
        "bare": lambda: [bare_loop(args, 1, 1), bare_loop(args, 2, 1), bare_loop(args, 1, 2)],
        "multiplexed": lambda: fedcifar(args, out, args.users, args.cohort, args.rounds, True),
        "per-node": lambda: fedcifar(args, out, args.users, args.cohort, args.rounds, False),
        "large": lambda: fedcifar(args, out, args.large_users, args.large_cohort,
                                  args.large_rounds, True),
    }
    for part in args.parts:
        if part in report["parts"]:
            print(f"{part}: measured before, skipped")
            continue
        print(f"{part}: running", flush=True)
        report["parts"][part] = jobs[part]()
        save(report_path, report)
        print(f"{part}: {report['parts'][part]}", flush=True)


if __name__ == "__main__":
    main()
