"""Same seed, same numbers: run five configurations and compare their per-round results
with another checkout's.

    python benchmarks/same_results.py run --dataset DATA --out DIR
    python benchmarks/same_results.py compare DIR_BEFORE DIR_AFTER

``run`` writes DIR/<name>/results.json for the default run and one run each with a
robust aggregator, an attack, SCAFFOLD and multiplexed clients (short: 3 rounds, one
local epoch, 10 simulated SuperNodes), plus a DP run whose noise must differ and whose
epsilon history must not. Each ``run`` restarts this user's local SuperLink with this checkout on PYTHONPATH: the
simulation's Ray workers import fedcifar_app by name, from wherever the SuperLink that
started them found it, so a SuperLink left from another checkout would run that one.
``compare`` prints, per configuration, whether the per-round entries are identical once
what measures time or names a host is left out (or, with ``--rtol``, equal within that
relative tolerance, with the largest difference), and the first difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_data_arguments, data_config, flwr_run,  # noqa: E402
                    superlink_of_this_checkout)

SHORT = "num-server-rounds=3 local-epochs=1 seed=42"
FEDERATION = "num-supernodes=10 client-resources-num-cpus=1"
CONFIGS = {
    "default": "",
    "robust": "strategy='krum' num-malicious-nodes=1",
    "attack": "attack='little-is-enough' malicious-fraction=0.2 strategy='fedmedian'",
    "scaffold": "strategy='scaffold' partitioner='dirichlet'",
    "multiplexed": "virtual-clients=20 fraction-train=0.25 fraction-evaluate=0.25",
    "dp": "dp='server' dp-noise-multiplier=1.0 dp-clipping-norm=1.0 fraction-train=0.5",
}
# What depends on the machine's speed or name, not on the computation.
VARYING = ("seconds", "elapsed", "workers", "started", "finished", "run_id", "output",
           "dir", "checkpoint",
           # each training job's timeline: when it was sent and arrived, in arrival order
           "jobs")
# A DP run's numbers depend on its private noise; its accounting does not.
DP_KEPT = ("round", "dp_epsilon", "dp_delta", "dp_clipping_norm", "dp_noise_std")


# Flower draws node IDs afresh in every simulation (64-bit); partition and virtual
# client IDs are small and stay.
NODE_ID_FROM = 2**32


def stable(value: Any) -> Any:
    """``value`` without the keys whose values vary from run to run of the same seed;
    a list of node IDs becomes their count."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items()
                if not any(word in k for word in VARYING)}
    if isinstance(value, list) and value and all(isinstance(v, int) and v >= NODE_ID_FROM
                                                 for v in value):
        return f"{len(value)} node IDs"
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def comparable(name: str, results: dict) -> list[dict]:
    entries = stable(results["entries"])
    if name == "dp":
        return [{k: v for k, v in e.items() if k in DP_KEPT} for e in entries]
    return entries


def run(args: argparse.Namespace) -> None:
    superlink_of_this_checkout()
    names = args.only or list(CONFIGS)
    for name in names:
        target = args.out / name / "results.json"
        if target.exists():
            print(f"{name}: done before", flush=True)
            continue
        runs = args.out / name / "runs"
        run_config = f"{SHORT} {CONFIGS[name]} {data_config(args, runs)}"
        wall, run_dir, _ = flwr_run(run_config, FEDERATION)
        shutil.copy(run_dir / "results.json", target)
        print(f"{name}: {wall:.0f} s, {target}", flush=True)


def largest_difference(old: Any, new: Any) -> float:
    """The largest relative difference between two results' numbers (inf where their
    structure or anything that is not a number differs)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            return float("inf")
        return max((largest_difference(old[k], new[k]) for k in old), default=0.0)
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return float("inf")
        return max((largest_difference(a, b) for a, b in zip(old, new, strict=True)),
                   default=0.0)
    if isinstance(old, float | int) and isinstance(new, float | int) \
            and not isinstance(old, bool):
        return abs(old - new) / max(abs(old), abs(new)) if old != new else 0.0
    return 0.0 if old == new else float("inf")


def compare(before: Path, after: Path, rtol: float = 0.0) -> int:
    differing = 0
    for name in CONFIGS:
        paths = before / name / "results.json", after / name / "results.json"
        if not all(p.exists() for p in paths):
            print(f"{name}: missing ({', '.join(str(p) for p in paths if not p.exists())})")
            differing += 1
            continue
        old, new = (comparable(name, json.loads(p.read_text())) for p in paths)
        if old == new:
            print(f"{name}: identical ({len(old)} entries)")
            continue
        difference = largest_difference(old, new)
        if difference <= rtol:
            print(f"{name}: equal within rtol {rtol:g} ({len(old)} entries; largest "
                  f"relative difference {difference:.2g})")
            continue
        differing += 1
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
        if first is None:
            print(f"{name}: DIFFERENT: {len(old)} entries before, {len(new)} after")
        else:
            print(f"{name}: DIFFERENT at entry {first}:\n  before {old[first]}\n  after  "
                  f"{new[first]}")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the configurations")
    add_data_arguments(run_parser)
    run_parser.add_argument("--only", nargs="+", choices=list(CONFIGS))
    compare_parser = commands.add_parser("compare", help="compare two run folders")
    compare_parser.add_argument("before", type=Path)
    compare_parser.add_argument("after", type=Path)
    compare_parser.add_argument("--rtol", type=float, default=0.0,
                                help="numbers may differ by this relative amount (float "
                                     "rounding of another formulation; default 0: identical)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        sys.exit(1 if compare(args.before, args.after, args.rtol) else 0)


if __name__ == "__main__":
    main()
