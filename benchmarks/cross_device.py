"""Cross-device CIFAR-10 at the compute limit: pfl-research's benchmark workload,
fedcifar against pfl-research side by side.

    python benchmarks/cross_device.py --dataset /abs/path/to/cifar10 [--rounds 200]
        [--cycles 2] [--pfl-python /path/to/python-with-pfl]
        [--parts training bare multiplexed multiplexed-sequential pfl pfl-torchrun
                 pfl-torchrun-reused-memory per-node large]

The workload (pfl-research's cross-device CIFAR-10 benchmark): 1,000 IID users of
50 images, a cohort of 50 users per round, one local epoch of batch 10, local SGD
lr 0.1 without momentum, server learning rate 1 (FedAvg), the tutorial CNN, no
augmentation, no client-side evaluation. Parts:

* ``training``: local training alone, in this process: a node's clients trained
  together (``task.train_together``, batched) against one after another
  (``task.train``), clients per second, for the tutorial CNN (25 users, as a
  SuperNode gets here) and the ResNet-9-GN (4 users), at 1 and 2 threads, on
  ``--device`` (default cpu; on a GPU the thread count does not matter);
* ``bare``: the same rounds with no federation at all, a plain PyTorch loop over
  the cohort's 2,500 images (no loader, no metrics): one process with 1 thread,
  with 2 threads, and two processes of 1 thread each training half the cohort (the
  parent averages), as pfl-research runs with torchrun;
* ``multiplexed``: fedcifar, ``virtual-clients=1000`` on as many SuperNodes as
  cores (one CPU each), each node training its clients together (batched);
  ``multiplexed-sequential``: the same with ``batched-clients=1``;
* ``pfl`` and ``pfl-torchrun``: pfl-research 0.6 on the same users
  (``benchmarks/peers/pfl_cross_device.py``): one process with all cores' threads,
  and torchrun with one process of one thread per core. They run with
  ``--pfl-python`` (default: this Python), which must have ``pfl[pytorch]``
  (``pip install -e ".[pfl]"``); ``pfl-torchrun-reused-memory``: torchrun with
  glibc's allocator set through its environment as a fedcifar node sets it in process
  (``task.reuse_freed_memory``);
* ``per-node``: fedcifar, 1,000 simulated SuperNodes, ``fraction-train`` 0.05;
* ``large``: 10,000 virtual clients of 5 images, a cohort of 500, multiplexed:
  seconds per round and the peak RSS of the whole process tree (SuperLink,
  simulation, Ray and its workers; shared pages counted once per process).

The compared parts (bare, the two multiplexed, the two pfl) run ``--cycles`` times,
alternating, so that the machine's drift falls on all of them alike; the others
once. Server-side evaluation on the 10,000 test images runs only at rounds 100 and
200 (``evaluate-every`` 100); seconds per round are the median over the rounds that
did not evaluate (the first two left out), then the median over the cycles; the
summary gives each one's ratio to pfl's best. Results go to cross_device.json under
--out after each run; runs already there are skipped (delete the file, or a part's
entry, to measure again).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (ROOT, PeakRss, add_data_arguments, data_config, flwr_run, load,
                    machine, save)

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


# -- local training: together or one after another --------------------------------------

def training(args: argparse.Namespace) -> list[dict]:
    """Clients per second of a node's local training, batched and one after another,
    alternating (``--training-repeats`` times each), per model and thread count."""
    device = task.resolve_device(args.device)
    task.reuse_freed_memory()  # as a node does
    users = [data.to(device) for data in _user_data(args)]
    results = []
    for model, clients in (("tutorial-cnn", 25), ("resnet9-gn", 4)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"together": [], "one after another": []}
            for _ in range(args.training_repeats):
                for way in times:
                    times[way].append(_time_local_training(model, users[:clients],
                                                           way == "together"))
            seconds = {way: statistics.median(t) for way, t in times.items()}
            results.append({"model": model, "clients": clients, "threads": threads,
                            "device": str(device),
                            "images_per_client": len(users[0]),
                            **{f"clients_per_s_{way.replace(' ', '_')}": clients / t
                               for way, t in seconds.items()},
                            "speedup": seconds["one after another"] / seconds["together"]})
            print(f"training: {results[-1]}", flush=True)
    return results


def _time_local_training(model: str, users: list[task.ImageTensors], together: bool) -> float:
    """Seconds to train each user's copy of a fresh model for one epoch, as a node does
    (its own shuffling stream, batch BATCH, SGD lr LEARNING_RATE)."""
    device = users[0].device
    start = task.build_model(model).to(device)
    nets = [copy.deepcopy(start) for _ in users]
    loaders = [task.BatchLoader(data, BATCH, shuffle=True,
                                generator=torch.Generator(device=device).manual_seed(index))
               for index, data in enumerate(users)]
    started = time.perf_counter()
    if together:
        task.train_together(nets, loaders, 1, LEARNING_RATE, 0.0)
    else:
        for net, loader in zip(nets, loaders, strict=True):
            task.train(net, loader, 1, LEARNING_RATE, 0.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


# -- fedcifar ---------------------------------------------------------------------------

def fedcifar(args: argparse.Namespace, out: Path, users: int, cohort: int, rounds: int,
             multiplexed: bool, extra: str = "") -> dict:
    nodes = CORES if multiplexed else users
    run_config = (f"{data_config(args, out / 'runs' / 'cross-device')} {WORKLOAD} "
                  f"num-server-rounds={rounds} fraction-train={cohort / users} "
                  + (f"virtual-clients={users} " if multiplexed else "") + extra)
    with PeakRss(managed_superlink_pids) as rss:
        wall, run_dir, _ = flwr_run(run_config,
                                    f"num-supernodes={nodes} client-resources-num-cpus=1")
    entries = load(run_dir / "results.json")["entries"]
    round_s = {b["round"]: b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])}
    unevaluated = [round_s[e["round"]] for e in entries[1:] if not e.get("evaluated")]
    steady = unevaluated[2:] or unevaluated  # short smoke runs: every round there is
    seconds = statistics.median(steady)
    samples = entries[-1]["samples_trained"] / rounds
    accuracy = {e["round"]: e["test_accuracy"] for e in entries if e.get("evaluated")}
    return {"users": users, "cohort": cohort, "supernodes": nodes, "rounds": rounds,
            "wall_s": wall, "run_dir": str(run_dir), "s_per_round": seconds,
            "mean_s_per_round_all": (entries[-1]["elapsed_s"] - entries[0]["elapsed_s"]) / rounds,
            "samples_per_s": samples / seconds,
            "test_accuracy": accuracy, "peak_rss_gib": round(rss.peak / 2**30, 2),
            "trained_per_round": statistics.median(e["train_replies"] for e in entries[1:]),
            "client_train_s": statistics.median(e["client_train_seconds"]
                                                for e in entries[1:])}


# -- pfl-research -----------------------------------------------------------------------

# What task.reuse_freed_memory sets in a fedcifar node, for pfl-research's processes
# through glibc's environment variables.
REUSED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(task.MALLOC_MMAP_THRESHOLD),
                     "MALLOC_TRIM_THRESHOLD_": str(task.MALLOC_TRIM_THRESHOLD)}


def pfl(args: argparse.Namespace, out: Path, processes: int,
        environment: dict[str, str] | None = None) -> dict:
    """benchmarks/peers/pfl_cross_device.py with ``--pfl-python``: one process using
    every core, or torchrun with ``processes`` processes of one thread; ``environment``
    added to theirs."""
    result_file = out / f"pfl-{processes}{'-env' if environment else ''}.json"
    peer = [str(ROOT / "benchmarks" / "peers" / "pfl_cross_device.py"), "--dataset",
            str(Path(args.dataset).resolve()), "--cache-dir", args.cache_dir, "--out",
            str(result_file), "--rounds", str(args.rounds), "--users", str(args.users),
            "--cohort", str(args.cohort), "--seed", str(SEED)]
    if processes == 1:
        command = [args.pfl_python, *peer, "--threads", str(CORES)]
    else:
        command = [args.pfl_python, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(processes), "--master_port", str(_free_port()), *peer, "--threads", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, **(environment or {})})
    if done.returncode != 0:
        raise RuntimeError(f"pfl-research run failed (is pfl installed for {args.pfl_python}? "
                           f"pip install -e \".[pfl]\"):\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    return {**json.loads(result_file.read_text()), "wall_s": time.perf_counter() - started}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the invocation -----------------------------------------------------------------------

COMPARED = ("bare", "multiplexed", "multiplexed-sequential", "pfl", "pfl-torchrun",
            "pfl-torchrun-reused-memory")


def summary(runs: dict[str, list]) -> dict[str, dict]:
    """Per compared part: median seconds per round over its cycles, its ratio to the
    best pfl-research part, and its accuracies (the last cycle's)."""
    rows = {}
    for part in COMPARED:
        for run in _flattened(runs.get(part, [])):
            name = part if part != "bare" else ("bare {processes}x{threads}".format(**run))
            rows.setdefault(name, []).append(run)
    table = {name: {"s_per_round": statistics.median(r["s_per_round"] for r in cycle),
                    "cycles": len(cycle),
                    "test_accuracy": cycle[-1].get("test_accuracy", {})}
             for name, cycle in rows.items()}
    pfl_best = min((row["s_per_round"] for name, row in table.items()
                    if name.startswith("pfl")), default=None)
    for row in table.values():
        row["ratio_to_pfl_best"] = row["s_per_round"] / pfl_best if pfl_best else None
    return table


def _flattened(cycles: list) -> list[dict]:
    return [run for cycle in cycles for run in (cycle if isinstance(cycle, list) else [cycle])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=2,
                        help="runs of each compared part, alternating (default 2)")
    parser.add_argument("--bare-rounds", type=int, default=20,
                        help="timed rounds of each bare loop, after two warm-up rounds")
    parser.add_argument("--training-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu",
                        help="where the training part trains (cpu, cuda, ...; default cpu)")
    parser.add_argument("--pfl-python", default=sys.executable,
                        help="a Python with pfl[pytorch] installed (default: this one)")
    parser.add_argument("--large-users", type=int, default=10_000)
    parser.add_argument("--large-cohort", type=int, default=500)
    parser.add_argument("--large-rounds", type=int, default=20)
    parts = ["training", *COMPARED, "per-node", "large"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "cross_device.json"
    report = load(report_path) or {"machine": machine(), "workload": WORKLOAD,
                                   "users": args.users, "cohort": args.cohort, "runs": {}}
    jobs = {
        "training": lambda: training(args),
        "bare": lambda: [bare_loop(args, 1, 1), bare_loop(args, 2, 1), bare_loop(args, 1, 2)],
        "multiplexed": lambda: fedcifar(args, out, args.users, args.cohort, args.rounds, True),
        "multiplexed-sequential": lambda: fedcifar(args, out, args.users, args.cohort,
                                                   args.rounds, True, "batched-clients=1"),
        "pfl": lambda: pfl(args, out, 1),
        "pfl-torchrun": lambda: pfl(args, out, CORES),
        "pfl-torchrun-reused-memory": lambda: pfl(args, out, CORES, REUSED_MEMORY_ENV),
        "per-node": lambda: fedcifar(args, out, args.users, args.cohort, args.rounds, False),
        "large": lambda: fedcifar(args, out, args.large_users, args.large_cohort,
                                  args.large_rounds, True),
    }
    for cycle in range(args.cycles):
        for part in args.parts:
            done = report["runs"].setdefault(part, [])
            if len(done) > cycle or (part not in COMPARED and done):
                continue
            print(f"{part} (cycle {cycle + 1}): running", flush=True)
            done.append(jobs[part]())
            report["summary"] = summary(report["runs"])
            save(report_path, report)
            print(f"{part}: {done[-1]}", flush=True)
    for name, row in report.get("summary", {}).items():
        ratio = row["ratio_to_pfl_best"]
        print(f"{name:24} {row['s_per_round']:.3f} s/round"
              + (f"  {ratio:.2f}x pfl's best" if ratio else "")
              + f"  accuracy {row['test_accuracy']}")


if __name__ == "__main__":
    main()
