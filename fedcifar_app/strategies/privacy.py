"""User-level differential privacy: DP-FedAvg (McMahan et al. 2018) with a budget.

With ``dp`` set, a round is the Gaussian mechanism on a Poisson-sampled cohort:

* every client joins the round independently with probability q = fraction-train
  (``poisson_cohort``), not Flower's fixed-size draw: the event the accountant
  knows how to amplify;
* each client's update (its model minus the global model) is clipped to L2 norm C
  (``dp-clipping-norm``): by the server after the update filter (``dp='server'``),
  or by the client before it sends (``dp='client'``; the server then rejects
  updates longer than C); a multiplexed node clips each of its clients;
* the server sums the clipped updates and divides by the expected cohort q·N, not
  by the number that arrived (``noised_update``), and adds N(0, (zC / qN)²) noise to
  every coordinate. The fixed denominator keeps the sensitivity at C / qN whatever
  the cohort's size, and a client that fails only leaves its term out (it is not
  replaced: a replacement would be a client the Poisson draw did not pick);
* with ``dp-clipping='adaptive'``, C follows a quantile of the update norms
  (``AdaptiveClipping``, Andrew et al. 2021): clients report whether their update
  was within C, the server adds noise to that count, and moves C geometrically
  towards the ``dp-target-quantile``; the update noise is raised so that the pair
  (noised sum, noised count) is as private as one Gaussian mechanism of multiplier
  z, which is what the ledger composes;
* ``PrivacyLedger`` composes one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
  per round with dp-accounting (add-or-remove-one neighbours, i.e. user-level DP):
  its privacy loss distribution (``dp-accountant='pld'``, the tighter bound) or
  its Renyi DP (``'rdp'``), and reports epsilon at ``dp-delta``; a round that would
  take epsilon past ``dp-max-epsilon`` is not run.

Every draw the guarantee rests on (the cohort, the update noise, the count noise)
comes from ``private_generator``: a generator seeded from the OS's cryptographic
source for that one draw, never from the run's seed or a global generator other
code seeds. Were the noise a function of the seed, anyone holding the released
model and results.json (which records the seed and the noise's scale) could
regenerate and subtract it. Flower's ``add_gaussian_noise_inplace`` draws from
NumPy's global generator, which the ServerApp seeds, so it is not used.

Flower's own DP wrappers are not used: their fixed-size sampling has no
amplification their accountant can use, they average by the number of replies,
they clip before the update filter, and their accountant refuses strategies that
override ``aggregate_train`` (the safeguards do). Their adaptive clipping moves C the
wrong way: it counts the *clipped* updates where Andrew et al. count the unclipped
ones (``b = 1`` if the norm is at most C) in the same update rule, so C runs away
from the target quantile instead of settling on it (with 100 log-normal norms and
target 0.5 it grew from the median to 3.4 times it in 25 rounds, all updates
unclipped). Their noise-scale and noise-splitting functions are used as they are.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

ACCOUNTING = {  # by dp-accountant (config.DP_ACCOUNTANTS)
    "pld": "PLD (dp-accounting's privacy loss distribution, pessimistic estimate), user "
           "level, add-or-remove-one neighbours, one Poisson-sampled Gaussian mechanism "
           "per round",
    "rdp": "RDP (dp-accounting), user level, add-or-remove-one neighbours, one "
           "Poisson-sampled Gaussian mechanism per round"}


class PrivacyBudgetSpent(RuntimeError):
    """The next round would spend more than dp-max-epsilon; the run ends before it."""


def private_generator() -> np.random.Generator:
    """A generator for one draw a privacy guarantee rests on, seeded with 256 bits
    from the OS's cryptographic source: no seed, file or other draw replays it."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))


def poisson_cohort(nodes: list[int], rate: float) -> list[int]:
    """Each of ``nodes`` with probability ``rate``, independently, from a private draw."""
    joins = private_generator().random(len(nodes)) < rate
    return [node for node, joined in zip(nodes, joins, strict=True) if joined]


@dataclass
class PrivacyLedger:
    """Epsilon at ``delta`` after the rounds composed so far."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    max_epsilon: float = 0.0  # 0: no cap
    accountant: str = "pld"  # one of config.DP_ACCOUNTANTS
    rounds: int = 0
    epsilon_by_round: dict[int, float] = field(default_factory=dict)
    _epsilon_after: dict[int, float] = field(default_factory=dict, init=False, repr=False,
                                             compare=False)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (infinite without noise); each
        count computed once (check_next asks for the one spend then records)."""
        if rounds not in self._epsilon_after:
            self._epsilon_after[rounds] = self._composed_epsilon(rounds)
        return self._epsilon_after[rounds]

    def _composed_epsilon(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        if self.accountant == "pld":
            return float(self._round_loss_distribution.self_compose(rounds)
                         .get_epsilon_for_delta(self.delta))
        return self._rdp_epsilon(rounds)

    @functools.cached_property
    def _round_loss_distribution(self):  # noqa: ANN202 - dp-accounting's PLD of one round
        """One round's privacy loss distribution, built once (the costly part); composing
        it k times is what dp-accounting's PLDAccountant does for k rounds."""
        from dp_accounting.pld import privacy_loss_distribution

        return privacy_loss_distribution.from_gaussian_mechanism(
            self.noise_multiplier, sampling_prob=self.sampling_rate)

    def _rdp_epsilon(self, rounds: int) -> float:
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant()
        # At large sampling rates the lowest RDP orders do not converge; dp-accounting
        # leaves them out and warns each time (to the 'absl' logger): kept quiet here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)),
                rounds)
            return float(accountant.get_epsilon(self.delta))
        finally:
            absl_logger.setLevel(level)

    def check_next(self, run_round: int) -> None:
        """Raise PrivacyBudgetSpent if running ``run_round`` would exceed the cap."""
        after = self.epsilon(self.rounds + 1)
        if self.max_epsilon > 0 and after > self.max_epsilon:
            raise PrivacyBudgetSpent(
                f"round {run_round} would take epsilon from "
                f"{self.epsilon(self.rounds):.4g} to {after:.4g}, past dp-max-epsilon "
                f"{self.max_epsilon:g} (delta {self.delta:g}); the run ends after round "
                f"{run_round - 1}")

    def spend(self, run_round: int) -> float:
        """Compose one round; return epsilon so far."""
        self.rounds += 1
        self.epsilon_by_round[run_round] = self.epsilon(self.rounds)
        return self.epsilon_by_round[run_round]

    def state(self) -> dict:
        """What a checkpoint keeps: the mechanism, the accountant and the spending."""
        return {"accountant": self.accountant, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "delta": self.delta,
                "rounds": self.rounds, "epsilon_by_round": dict(self.epsilon_by_round)}

    def continue_from(self, state: dict) -> None:
        """Take over a checkpoint's spending (its mechanism is checked to be this one)."""
        self.rounds = int(state["rounds"])
        self.epsilon_by_round = {int(k): float(v)
                                 for k, v in state["epsilon_by_round"].items()}


def noised_update(global_arrays: ArrayRecord, mean_arrays: ArrayRecord | None,
                  clients: int, expected_clients: float, noise_std: float) -> ArrayRecord:
    """The new global model: the global one plus the sum of the ``clients`` clipped
    updates whose mean ``mean_arrays`` holds, divided by ``expected_clients`` (q·N),
    plus Gaussian noise of ``noise_std`` on every coordinate."""
    keys = list(global_arrays)
    start = global_arrays.to_numpy_ndarrays()
    if mean_arrays is None or clients == 0:
        update = [np.zeros_like(s) for s in start]
    else:
        update = [(mean_arrays[k].numpy() - s) * (clients / expected_clients)
                  for k, s in zip(keys, start, strict=True)]
    noise = private_generator()
    for values in update:
        values += noise.normal(0.0, noise_std, values.shape)
    return ArrayRecord({k: Array((s + u).astype(s.dtype, copy=False))
                        for k, s, u in zip(keys, start, update, strict=True)})


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping":
    after each round C <- C * exp(-learning_rate * (b - target_quantile)), where b is
    the noised fraction of the round's updates whose norm was at most C."""

    target_quantile: float  # fraction of updates C should leave unclipped
    learning_rate: float
    count_stddev: float  # noise on the count of unclipped updates; 0: cohort / 20

    def noise(self, noise_multiplier: float, expected_clients: float) -> tuple[float, float]:
        """(count noise std, update noise multiplier) for an overall multiplier z:
        the count's sensitivity is 1/2 (bits centred on 0), so the two Gaussian
        mechanisms together are one of multiplier z when z^-2 = z_update^-2 +
        (2 * count_std)^-2. ValueError if the count noise leaves no room for z."""
        return compute_adaptive_noise_params(noise_multiplier, expected_clients,
                                             self.count_stddev or None)

    def next_norm(self, norm: float, unclipped: int, clients: int, expected_clients: float,
                  count_stddev: float) -> tuple[float, float]:
        """(next C, the noised unclipped fraction it was moved by). The centred count
        sum(b - 1/2) is noised and divided by the expected cohort, as the update sum is."""
        noised = float(private_generator().normal(unclipped - clients / 2, count_stddev))
        fraction = noised / expected_clients + 0.5
        return norm * math.exp(-self.learning_rate * (fraction - self.target_quantile)), fraction
