"""Figures for BENCHMARKS.md from the JSON the benchmark scripts wrote.

    python benchmarks/figures.py [--results benchmarks/results] [--out docs/figures]

Draws whatever results exist: speed.png (samples/s against the compute limit),
scale.png (seconds per round and peak RSS against clients), niid_bench.png (test
accuracy per round of each NIID-Bench row, mean and spread over its seeds),
robustness.png (final accuracy of each attack against each defence),
heterogeneity.png (test accuracy against simulated seconds and against client updates
of sync FedAvg, over-selection and FedBuff, mean and spread over seeds),
heterogeneity_timeline.png (the first simulated minute of sync FedAvg and FedBuff,
seed 42, IID: who trained when), heterogeneity_deployment.png (test accuracy against
wall-clock seconds in the namespace deployment) and, given
--centralized and --federated run folders, centralized_vs_federated.png (test
accuracy per epoch of data).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import ROOT, finished_seeds, load  # noqa: E402

from fedcifar_app.compare import describe  # noqa: E402
from fedcifar_app.results import draw_timeline, load_results, plot_runs  # noqa: E402


def speed_figure(report: dict, path: Path) -> None:
    ratios = report["ratios_to_limit"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(ratios), [100 * r for r in ratios.values()], color="tab:blue")
    ax.axvline(100, color="black", linewidth=0.8)
    ax.set_xlabel("training throughput, % of the compute limit")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scale_figure(report: dict, path: Path) -> None:
    sizes = sorted(report["sizes"].values(), key=lambda s: s["clients"])
    clients = [s["clients"] for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(clients, [s["steady_round_s"] for s in sizes], marker="o")
    left.set_xscale("log")
    left.set_xlabel("virtual clients (10 % train per round)")
    left.set_ylabel("seconds per round")
    right.plot(clients, [s["peak_rss_gib"] for s in sizes], marker="o", color="tab:red")
    right.set_xscale("log")
    right.set_xlabel("virtual clients")
    right.set_ylabel("peak RSS of the process tree (GiB)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def niid_figure(report: dict, path: Path) -> None:
    """Left: test accuracy by round (from round 10 on in long runs), each row's mean over
    its seeds with a ±1 std band. Right: each row's best accuracy and the mean of
    its last 10 rounds, mean ± 1 std over its seeds (runs kept as figures only, without a
    curve, count here but not on the left)."""
    fig, (curves_ax, spread_ax) = plt.subplots(
        1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    runs = {name: finished_seeds(row) for name, row in sorted(report["runs"].items())}
    runs = {name: seeds for name, seeds in runs.items() if seeds}
    for name, seeds in runs.items():
        curves = [run["accuracy_by_round"] for run in seeds if run.get("accuracy_by_round")]
        if curves:
            mean, std = seed_spread([[100 * (a if a is not None else np.nan)
                                      for a in curve] for curve in curves])
            # The rows differ by tenths of a point, after a common 50-point rise.
            start = 10 if len(mean) > 20 else 0
            rounds = np.arange(start, len(mean))
            (line,) = curves_ax.plot(rounds, mean[start:],
                                     label=f"{name} ({seeds_label(len(curves))})")
            curves_ax.fill_between(rounds, (mean - std)[start:], (mean + std)[start:],
                                   alpha=0.2, color=line.get_color())
    for offset, (label, value) in zip((-0.12, 0.12), (
            ("best", lambda run: run["best"]["test_accuracy"]),
            ("mean of the last 10 rounds", lambda run: run["last10_mean"]))):
        means, stds = zip(*(seed_spread([[100 * value(run)] for run in seeds])
                            for seeds in runs.values()))
        spread_ax.errorbar(np.arange(len(runs)) + offset, np.ravel(means), yerr=np.ravel(stds),
                           fmt="o", capsize=4, label=label)
    spread_ax.set_xticks(range(len(runs)), [f"{name}\n({seeds_label(len(seeds))})"
                                            for name, seeds in runs.items()])
    spread_ax.set_ylabel("test accuracy (%), mean ± 1 std over seeds")
    spread_ax.legend()
    curves_ax.set_xlabel("round")
    curves_ax.set_ylabel("test accuracy (%), mean ± 1 std over seeds")
    curves_ax.legend()
    for ax in (curves_ax, spread_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seeds_label(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def seed_spread(by_seed: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over seeds (rows), per column; the spread is 0
    for one seed. Curves of different lengths are cut to the shortest."""
    length = min(len(values) for values in by_seed)
    values = np.array([row[:length] for row in by_seed], dtype=float)
    std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(length)
    return np.nanmean(values, axis=0), std


def robustness_figure(report: dict, path: Path) -> None:
    """Heat maps of final test accuracy: attacks (rows) against defences (columns), one
    colour scale up to the best cell; runs that diverged are grey."""
    splits = list(report["cells"])
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False,
                             sharey=True)
    grids = {}
    for split in splits:
        rows = report["cells"][split]
        defences = list(dict.fromkeys(d for row in rows.values() for d in row))
        grids[split] = (list(rows), defences, np.array(
            [[100 * (rows[a].get(d, {}).get("final_accuracy") or np.nan) for d in defences]
             for a in rows]))
    top = max(np.nanmax(grid) for _, _, grid in grids.values())
    colours = plt.get_cmap("viridis").copy()
    colours.set_bad("lightgrey")
    for ax, split in zip(axes[0], splits):
        attacks, defences, grid = grids[split]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0, vmax=top)
        for (i, j), value in np.ndenumerate(grid):
            status = report["cells"][split][attacks[i]].get(defences[j], {}).get("status")
            if status == "failed":
                ax.text(j, i, "diverged", ha="center", va="center", fontsize=8)
            elif not np.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if value < 0.6 * top else "black")
        ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(f"{split}: final test accuracy (%)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def privacy_figure(report: dict, path: Path) -> None:
    """Final test accuracy against the epsilon spent, and the run without DP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    draws: dict[float, list[tuple[float, float]]] = {}  # target: (epsilon, accuracy) per draw
    for run in runs.values():
        if run.get("epsilon") is not None and run.get("final_accuracy"):
            draws.setdefault(run["target_epsilon"], []).append(
                (run["epsilon"], 100 * run["final_accuracy"]))
    private = [(max(e for e, _ in group), statistics.fmean(a for _, a in group),
                statistics.stdev(a for _, a in group) if len(group) > 1 else 0.0)
               for _, group in sorted(draws.items())]
    fig, ax = plt.subplots(figsize=(6, 4))
    if private:
        epsilons, means, stds = zip(*private)
        ax.errorbar(epsilons, means, yerr=stds, marker="o", capsize=4,
                    label="DP-FedAvg (dp='server'), mean ± std over draws")
    baseline = runs.get("no DP", {}).get("final_accuracy")
    if baseline:
        ax.axhline(100 * baseline, color="grey", linestyle="--", label="no DP")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([e for e, _, _ in private], [f"{e:.3g}" for e, _, _ in private])
    ax.set_xlabel("epsilon after the run (delta 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['users']} clients, {report['rounds']} rounds")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def heterogeneity_figure(report: dict, path: Path) -> None:
    """Per recipe and split (rows): test accuracy against simulated seconds and against
    client updates, a line per method (mean over seeds, shaded: ± std)."""
    runs = [r for r in report["runs"].values() if r["status"] == "completed"]
    panels = list(dict.fromkeys((r.get("augment", False), r["split"]) for r in runs))
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    for row, (augment, split) in enumerate(panels):
        methods = list(dict.fromkeys(r["method"] for r in runs))
        for method in methods:
            curves = [r["curve"] for r in runs
                      if (r.get("augment", False), r["split"], r["method"])
                      == (augment, split, method)]
            if not curves:
                continue
            accuracy, spread = seed_spread([[100 * p["accuracy"] for p in c] for c in curves])
            seconds, _ = seed_spread([[p["simulated_s"] for p in c] for c in curves])
            updates, _ = seed_spread([[p["updates"] for p in c] for c in curves])
            label = f"{method} ({seeds_label(len(curves))})"
            for ax, xs in ((axes[row][0], seconds), (axes[row][1], updates)):
                ax.plot(xs, accuracy, label=label, linewidth=1.2)
                ax.fill_between(xs, accuracy - spread, accuracy + spread, alpha=0.2)
        recipe = "augmented" if augment else "default recipe"
        for ax, unit in zip(axes[row], ("simulated seconds", "client updates aggregated"),
                            strict=True):
            ax.set_xlabel(unit)
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(30, 65)
            ax.axhline(60, color="grey", linewidth=0.5, linestyle="--")
            ax.set_title(f"{split}, {recipe}: 100 clients, a quarter 5-10x slower",
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        axes[row][0].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heterogeneity_deployment_figure(report: dict, path: Path) -> None:
    """The namespace deployment: test accuracy against wall-clock seconds, a line per
    method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, run in report["runs"].items():
        curve = run["curve"]
        ax.plot([p["real_s"] for p in curve], [100 * p["accuracy"] for p in curve],
                marker="o", markersize=3, label=method)
    ax.set_xlabel("wall-clock seconds since the ServerApp started")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("5 SuperNodes in namespaces: a weak node, a paused node", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TIMELINE_SECONDS = 60.0


def heterogeneity_timeline(report: dict, path: Path) -> None:
    """The first simulated minute of sync FedAvg and of FedBuff (seed 42, IID)."""
    runs = [report["runs"].get(f"iid-{method}-42") for method in ("sync", "fedbuff")]
    if not all(runs):
        return
    fig, axes = plt.subplots(2, 1, figsize=(10, 12), sharex=True)
    for ax, run in zip(axes, runs, strict=True):
        draw_timeline(ax, load_results(Path(run["run_dir"])), until=TIMELINE_SECONDS)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--centralized", type=Path, nargs="*", default=[],
                        help="centralized run folders for centralized_vs_federated.png")
    parser.add_argument("--federated", type=Path, nargs="*", default=[],
                        help="federated run folders for centralized_vs_federated.png")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, draw in (("speed", speed_figure), ("scale", scale_figure),
                       ("niid_bench", niid_figure), ("robustness", robustness_figure),
                       ("privacy", privacy_figure), ("heterogeneity", heterogeneity_figure),
                       ("heterogeneity_deployment", heterogeneity_deployment_figure)):
        report = load(args.results / f"{name}.json")
        if report:
            draw(report, args.out / f"{name}.png")
            drawn.append(f"{name}.png")
    heterogeneity = load(args.results / "heterogeneity.json")
    if heterogeneity:
        heterogeneity_timeline(heterogeneity, args.out / "heterogeneity_timeline.png")
        drawn.append("heterogeneity_timeline.png")
    runs = [load_results(path) for path in [*args.centralized, *args.federated]]
    if runs:
        plot_runs(runs, args.out / "centralized_vs_federated.png",
                  labels=[describe(run) for run in runs], x_axes=("data",))
        drawn.append("centralized_vs_federated.png")
    print(f"wrote {', '.join(drawn) or 'nothing (no results yet)'} to {args.out}")


if __name__ == "__main__":
    main()
