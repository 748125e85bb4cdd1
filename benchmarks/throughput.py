"""Training throughput of fedcifar against the compute limit.

    python benchmarks/throughput.py --dataset /abs/path/to/cifar10 [--epochs 1] [--repeats 3]
                                    [--model tutorial-cnn] [--device auto]

The compute limit is a bare PyTorch loop over pre-decoded uint8 tensors: index a
random batch, convert and normalise it, forward, backward, SGD step; nothing
else. It is timed against fedcifar's own ``task.train`` over ``BatchLoader``
(what ``python -m fedcifar_app.centralized`` runs), with the same model, batch
size, optimiser and thread count, alternating the two so that both see the
same machine state. On an accelerator both keep the whole data set on the device
(copied once) and are synchronised before the clock stops. Prints a table and
writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fedcifar_app import task
from fedcifar_app.config import expand_path
from fedcifar_app.data import load_split
from fedcifar_app.task import BatchLoader, ImageTensors


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bare_loop(data: ImageTensors, batch_size: int, epochs: int,
              model: str = "tutorial-cnn") -> float:
    """Seconds for ``epochs`` passes of the minimal training loop, on ``data``'s device."""
    device = data.device
    net = task.build_model(model).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    mean = torch.tensor(task.CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(task.CIFAR10_STD, device=device).view(1, 3, 1, 1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data), device=device)
        for first in range(0, len(data), batch_size):
            batch = order[first:first + batch_size]
            images = (data.images[batch].float() / 255 - mean) / std
            optimizer.zero_grad()
            criterion(net(images), data.labels[batch]).backward()
            optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def fedcifar_train(data: ImageTensors, batch_size: int, epochs: int,
                   model: str = "tutorial-cnn") -> float:
    """Seconds for the same work through fedcifar's train() and BatchLoader."""
    net = task.build_model(model).to(data.device)
    loader = BatchLoader(data, batch_size, shuffle=True,
                         generator=torch.Generator(device=data.device))
    synchronize(data.device)
    start = time.perf_counter()
    task.train(net, loader, epochs, learning_rate=0.01, momentum=0.9)
    synchronize(data.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cache-dir", default="~/.cache/fedcifar")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--model", default="tutorial-cnn", choices=list(task.MODELS))
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--output", type=Path, default=Path("throughput.json"))
    args = parser.parse_args()
    device = task.resolve_device(args.device)

    data = load_split(args.dataset, "train", expand_path(args.cache_dir))
    if args.limit:
        data = data.subset(torch.arange(min(args.limit, len(data))))
    # Materialise in RAM (or on the device) so neither loop pays for page faults of the
    # mapped cache.
    data = ImageTensors(data.images.clone(), data.labels.clone()).to(device)
    samples = len(data) * args.epochs
    timings: dict[str, list[float]] = {"bare loop (limit)": [], "fedcifar train": []}
    warm_up = data.subset(torch.arange(min(2000, len(data)), device=device))
    bare_loop(warm_up, args.batch_size, 1, args.model)
    for repeat in range(args.repeats):
        timings["bare loop (limit)"].append(
            bare_loop(data, args.batch_size, args.epochs, args.model))
        timings["fedcifar train"].append(
            fedcifar_train(data, args.batch_size, args.epochs, args.model))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {samples / seconds[-1]:,.0f} samples/s" for name, seconds in timings.items()),
            flush=True)

    rates = {name: samples / statistics.median(seconds) for name, seconds in timings.items()}
    limit = rates["bare loop (limit)"]
    print(f"\n{args.model} on {device}, batch {args.batch_size}")
    print(f"{'path':<20} {'samples/s':>10} {'of limit':>9}")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10,.0f} {rate / limit:>8.1%}")
    report = {
        "machine": {"cores": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(device),
                    "device_name": device_name(device)},
        "model": args.model, "batch_size": args.batch_size, "samples_per_measurement": samples,
        "seconds": timings, "samples_per_s": rates,
        "ratio_to_limit": {name: rate / limit for name, rate in rates.items()},
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"written to {args.output.resolve()}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


if __name__ == "__main__":
    main()
