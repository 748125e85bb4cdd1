"""Accuracy against epsilon: user-level DP at cross-device scale.

    python benchmarks/privacy.py --dataset /abs/path/to/cifar10 [--rounds 200]
        [--epsilons 1 2 4 8] [--clipping-norm 0.2] [--accountant pld|rdp] [--repeats 1]

The cross-device workload of ``cross_device.py`` (1,000 virtual clients of 50 IID
images, multiplexed; each joins a round with probability 0.05, one local epoch of
batch 10, SGD lr 0.1, the tutorial CNN), run without DP and with ``dp='server'`` at
each target epsilon (delta 1e-5, below 1/1,000). For a target, the noise multiplier
is the smallest that keeps epsilon after --rounds rounds at or below it (bisection
on the accountant the runs use, PLD unless --accountant says rdp; ``dp-max-epsilon``
is the target, so no run can overshoot). Same seed, rounds and clipping norm for every
run. DP's cohorts and noise are private draws, not functions of the seed, so each target
runs --repeats times ("epsilon 8", "epsilon 8, draw 2", ...) and the summary gives mean
and sample std of the final accuracy. Results go to privacy.json under --out after each
run; finished runs are skipped.
"""

from __future__ import annotations

import argparse
import statistics

from common import add_data_arguments, data_config, load, machine, run_resumable, save
from cross_device import WORKLOAD

from fedcifar_app.config import DP_ACCOUNTANTS
from fedcifar_app.extensions.privacy.server import PrivacyLedger

USERS, SAMPLING_RATE, DELTA = 1000, 0.05, 1e-5


def noise_for(epsilon: float, rounds: int, sampling_rate: float, delta: float,
              accountant: str) -> float:
    """The smallest noise multiplier (to 0.1 %) whose epsilon after ``rounds`` rounds is
    at most ``epsilon``."""
    low, high = 0.1, 100.0
    while high / low > 1.001:
        middle = (low * high) ** 0.5
        ledger = PrivacyLedger(middle, sampling_rate, delta, accountant=accountant)
        if ledger.epsilon(rounds) > epsilon:
            low = middle
        else:
            high = middle
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--clipping-norm", type=float, default=0.2,
                        help="C (default 0.2: first-round client updates here have "
                        "norms 0.10-0.16)")
    parser.add_argument("--delta", type=float, default=DELTA)
    parser.add_argument("--accountant", choices=DP_ACCOUNTANTS, default="pld")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per target epsilon (their noise differs)")
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "privacy.json"
    report = load(report_path) or {"machine": machine(), "workload": WORKLOAD,
                                   "users": args.users, "rounds": args.rounds,
                                   "accountant": args.accountant, "runs": {}}
    if report.get("accountant", "rdp") != args.accountant:
        raise SystemExit(f"{report_path} holds runs calibrated with the "
                         f"{report.get('accountant', 'rdp')} accountant: give another --out")
    settings = (f"{WORKLOAD} virtual-clients={args.users} fraction-train={SAMPLING_RATE} "
                f"num-server-rounds={args.rounds}")
    for target, name in run_names(args.epsilons, args.repeats):
        run = report["runs"].setdefault(name, {})
        if run.get("status") == "completed":
            continue
        config = settings
        if target is not None:
            noise = noise_for(target, args.rounds, SAMPLING_RATE, args.delta, args.accountant)
            run.update(noise_multiplier=noise, target_epsilon=target)
            config += (f" dp='server' dp-noise-multiplier={noise} dp-clipping-norm="
                       f"{args.clipping_norm} dp-delta={args.delta} dp-max-epsilon={target}"
                       f" dp-accountant='{args.accountant}'")
        run_root = out / "runs" / "privacy" / name.replace(" ", "-")
        run_dir, wall = run_resumable(f"{data_config(args, run_root)} {config}", run_root,
                                      name)
        results = load(run_dir / "results.json")
        entries = results["entries"]
        run.update(status=results["status"], run_dir=str(run_dir), wall_s=wall,
                   rounds=entries[-1]["round"],
                   final_accuracy=entries[-1].get("test_accuracy"),
                   accuracy_by_round={e["round"]: e["test_accuracy"] for e in entries
                                      if e.get("test_accuracy") is not None},
                   epsilon=entries[-1].get("dp_epsilon"))
        save(report_path, report)
        print(f"{name}: {run}", flush=True)
    summarise(report["runs"])


def run_names(epsilons: list[float], repeats: int) -> list[tuple[float | None, str]]:
    """(target epsilon, run name) of every run: no DP once, each target ``repeats`` times."""
    names: list[tuple[float | None, str]] = [(None, "no DP")]
    for target in epsilons:
        names += [(target, f"epsilon {target:g}" + (f", draw {draw}" if draw > 1 else ""))
                  for draw in range(1, repeats + 1)]
    return names


def summarise(runs: dict) -> None:
    """Per target: noise, epsilon spent, and the final accuracy's mean ± std over draws."""
    by_target: dict = {}
    for run in runs.values():
        by_target.setdefault(run.get("target_epsilon"), []).append(run)
    print(f"\n{'target':<10}{'noise z':>10}{'epsilon':>10}{'draws':>7}{'test accuracy':>22}")
    for target, group in by_target.items():
        accuracies = [100 * run["final_accuracy"] for run in group
                      if run.get("final_accuracy") is not None]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        noise, epsilon = group[0].get("noise_multiplier"), group[0].get("epsilon")
        print(f"{'no DP' if target is None else f'{target:g}':<10}"
              f"{'-' if noise is None else f'{noise:.3f}':>10}"
              f"{'-' if epsilon is None else f'{epsilon:.3f}':>10}{len(accuracies):>7}"
              f"{statistics.fmean(accuracies) if accuracies else 0:>14.2f}{spread:<8}")


if __name__ == "__main__":
    main()
