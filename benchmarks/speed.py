"""Speed against the compute limit, all measured in one run.

    python benchmarks/speed.py --dataset /abs/path/to/cifar10 [--rounds 4] [--out DIR]
                               [--model tutorial-cnn] [--device auto] [--gpus-per-client 0]

1. the compute limit: a bare PyTorch loop over pre-decoded uint8 tensors (batch
   32), one process using all cores, the data on the device;
2. the centralized entry point, ``python -m fedcifar_app.centralized``, end to end;
3. a federated simulation, ``flwr run .`` with 10 clients that all train one local
   epoch per round, so that the rounds add up to about as many training samples;
   with --gpus-per-client F the clients share the GPUs, F of one each.

All three use --model on --device.

Prints samples/s and the ratio of each to the limit, and splits the federated run
into fixed start-up cost (flwr, SuperLink, Ray, first ClientApps) and per-round cost.
Writes speed.json under --out. Needs the simulation set up with
``python -m fedcifar_app.ops.local_simulation`` (any number of SuperNodes: this passes
its own --federation-config).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, add_data_arguments, data_config, flwr_run, load, machine, save
from throughput import bare_loop, device_name

from fedcifar_app import task
from fedcifar_app.config import expand_path
from fedcifar_app.data import load_split
from fedcifar_app.task import ImageTensors

CLIENTS = 10


def measure_limit(dataset: str, cache_dir: Path, epochs: int, model: str,
                  device: torch.device) -> dict:
    split = load_split(dataset, "train", cache_dir)
    data = ImageTensors(split.images.clone(), split.labels.clone()).to(device)
    seconds = bare_loop(data, 32, epochs, model)
    return {"samples": epochs * len(data), "seconds": seconds,
            "samples_per_s": epochs * len(data) / seconds}


def measure_centralized(dataset: str, cache_dir: Path, out: Path, epochs: int,
                        model: str, device: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedcifar_app.centralized", "--epochs",
                           str(epochs), "--dataset", dataset, "--cache-dir", str(cache_dir),
                           "--output-dir", str(out / "runs"), "--model", model,
                           "--device", device], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - start
    run_dir = Path(done.stdout.split("outputs of this run: ", 1)[1].split("\n", 1)[0])
    entries = load(run_dir / "results.json")["entries"]
    samples = entries[-1]["samples_trained"]
    # Per-epoch time includes that epoch's test-set evaluation.
    epoch_seconds = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    train_seconds = sum(e["train_seconds"] for e in entries[1:])
    return {"samples": samples, "wall_s": wall, "samples_per_s_end_to_end": samples / wall,
            "epoch_s": epoch_seconds,
            "samples_per_s_in_epochs": samples / sum(epoch_seconds),
            "samples_per_s_training": samples / train_seconds}


def measure_federated(args: argparse.Namespace, out: Path, rounds: int) -> dict:
    wall, run_dir, _ = flwr_run(
        f"{data_config(args, out / 'runs')} num-server-rounds={rounds} fraction-train=1.0 "
        f"local-epochs=1 model='{args.model}' device='{args.device}'",
        federation_config=f"num-supernodes={CLIENTS} client-resources-num-cpus=1 "
                          f"client-resources-num-gpus={args.gpus_per_client}")
    entries = load(run_dir / "results.json")["entries"]
    round_seconds = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    samples_per_round = entries[1]["samples_trained"]
    steady = statistics.median(round_seconds[1:]) if len(round_seconds) > 1 else round_seconds[0]
    return {"rounds": rounds, "samples": entries[-1]["samples_trained"], "wall_s": wall,
            "round_s": round_seconds, "steady_round_s": steady,
            "startup_s": wall - rounds * steady,
            "samples_per_s_end_to_end": entries[-1]["samples_trained"] / wall,
            "samples_per_s_steady": samples_per_round / steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="tutorial-cnn", choices=list(task.MODELS))
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="share of a GPU each simulated client reserves (default 0)")
    args = parser.parse_args()
    device = task.resolve_device(args.device)
    dataset = str(Path(args.dataset).resolve()) if Path(args.dataset).exists() else args.dataset
    cache_dir = expand_path(args.cache_dir)
    out = args.out.resolve()
    epochs = args.rounds  # one CIFAR-10 epoch per federated round (90 % of it trains)
    torch.manual_seed(0)

    report = {"machine": {**machine(), "device": str(device),
                          "device_name": device_name(device)},
              "command": " ".join(sys.argv), "model": args.model,
              "limit": measure_limit(dataset, cache_dir, epochs, args.model, device),
              "centralized": measure_centralized(dataset, cache_dir, out, epochs, args.model,
                                                 str(device)),
              "federated": measure_federated(args, out, args.rounds)}
    limit = report["limit"]["samples_per_s"]
    rows = [("compute limit (bare loop)", limit, report["limit"]["samples"]),
            ("centralized, end to end", report["centralized"]["samples_per_s_end_to_end"],
             report["centralized"]["samples"]),
            ("centralized, epochs", report["centralized"]["samples_per_s_in_epochs"],
             report["centralized"]["samples"]),
            ("centralized, training only", report["centralized"]["samples_per_s_training"],
             report["centralized"]["samples"]),
            ("federated, end to end", report["federated"]["samples_per_s_end_to_end"],
             report["federated"]["samples"]),
            ("federated, steady rounds", report["federated"]["samples_per_s_steady"],
             report["federated"]["samples"])]
    report["ratios_to_limit"] = {name: rate / limit for name, rate, _ in rows}
    save(out / "speed.json", report)
    print(f"{args.model} on {device}")
    print(f"{'path':<28} {'samples':>9} {'samples/s':>10} {'of limit':>9}")
    for name, rate, samples in rows:
        print(f"{name:<28} {samples:>9,} {rate:>10,.0f} {rate / limit:>8.1%}")
    federated = report["federated"]
    print(f"\nfederated: start-up {federated['startup_s']:.1f} s, steady round "
          f"{federated['steady_round_s']:.2f} s ({CLIENTS} clients, evaluation included)")
    print(f"written to {out / 'speed.json'}")


if __name__ == "__main__":
    main()
