"""DD-Ranking's label-robust and augmentation-robust scores (docs/evaluation.md#robust-scores).

All accuracies here are fractions in [0, 1]; the evaluation code works in percent and converts
with `fraction`. With fractions every difference lies in [-1, 1], so alpha and beta do too and
the normalisation (e^x - e^-1) / (e - e^-1) maps them onto [0, 1], which is what it was designed
for. DD-Ranking's own code passes percentages (e.g. alpha = 12.5) into exp(), where a score above
1 (or a tiny one) results; our scores are therefore not comparable to numbers printed by its code,
only to the definitions of its paper.

    HLR   = full - syn_hard                       hard-label recovery (lower is better)
    IOR   = syn - random                          improvement over random, own evaluation
    alpha = w IOR - (1 - w) HLR                   w = 0.5
    LRS   = (e^alpha - e^-1) / (e - e^-1)
    beta  = gamma (syn_aug - random_aug) + (1 - gamma) (syn_naug - random_naug)   gamma = 0.5
    ARS   = (e^beta - e^-1) / (e - e^-1)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from utils.io import UserError

LRS_WEIGHT = 0.5  # w of alpha, DD-Ranking's default
ARS_WEIGHT = 0.5  # gamma of beta, DD-Ranking's default
# The accuracies a robust-score evaluation measures, per network (docs/evaluation.md#robust-scores)
SCORE_ROWS = ("syn", "syn_hard", "random", "random_hard", "syn_naug", "random_naug")


def fraction(percent: float) -> float:
    """An accuracy in percent as a fraction in [0, 1]."""
    return percent / 100.0


def check_full_accuracy(percent: float) -> float:
    """The full-data accuracy given with --full_accuracy: a percentage in (0, 100]."""
    if not (math.isfinite(percent) and 0 < percent <= 100):
        raise UserError(
            f"--full_accuracy {percent:g} is outside (0, 100]: give the full-data test accuracy "
            "in percent, e.g. --full_accuracy 84.8"
        )
    return percent


def _check_fractions(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(
                f"accuracy {name}={value!r} is not a fraction in [0, 1]: divide percentages by 100"
            )


def normalised(x: float) -> float:
    """(e^x - e^-1) / (e - e^-1): 0 at x = -1, 1 at x = 1."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def hlr(full: float, syn_hard: float) -> float:
    """Hard-label recovery: how far the distilled set with hard labels is from the full data."""
    _check_fractions(full=full, syn_hard=syn_hard)
    return full - syn_hard


def ior(syn: float, random: float) -> float:
    """Improvement over random: distilled set vs a random real subset, same evaluation."""
    _check_fractions(syn=syn, random=random)
    return syn - random


def lrs_alpha(
    full: float, syn_hard: float, syn: float, random: float, w: float = LRS_WEIGHT
) -> float:
    return w * ior(syn, random) - (1 - w) * hlr(full, syn_hard)


def lrs(full: float, syn_hard: float, syn: float, random: float, w: float = LRS_WEIGHT) -> float:
    """Label-robust score in [0, 1]."""
    return normalised(lrs_alpha(full, syn_hard, syn, random, w))


def ars_beta(
    syn_aug: float, random_aug: float, syn_naug: float, random_naug: float,
    gamma: float = ARS_WEIGHT,
) -> float:  # fmt: skip
    _check_fractions(syn_aug=syn_aug, random_aug=random_aug, syn_naug=syn_naug,
                     random_naug=random_naug)  # fmt: skip
    return gamma * (syn_aug - random_aug) + (1 - gamma) * (syn_naug - random_naug)


def ars(
    syn_aug: float, random_aug: float, syn_naug: float, random_naug: float,
    gamma: float = ARS_WEIGHT,
) -> float:  # fmt: skip
    """Augmentation-robust score in [0, 1]."""
    return normalised(ars_beta(syn_aug, random_aug, syn_naug, random_naug, gamma))


def _summary(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "values": list(values)}  # fmt: skip


def robust_scores(accs: Mapping[str, Sequence[float]], full_percent: float) -> dict:
    """HLR, IOR, LRS and ARS per network k from the paired accuracies (percent) of SCORE_ROWS,
    as DD-Ranking scores each evaluation round, then their mean and population std over the
    networks. `full_percent`: the full-data accuracy in percent. Returned as fractions."""
    missing = [row for row in SCORE_ROWS if row not in accs]
    if missing:
        raise ValueError(f"robust_scores needs the accuracies {missing}")
    counts = {len(accs[row]) for row in SCORE_ROWS}
    if len(counts) != 1:
        raise ValueError(f"robust_scores needs as many networks in every row, got {counts}")
    full = fraction(check_full_accuracy(full_percent))
    per_network = [{row: fraction(accs[row][k]) for row in SCORE_ROWS} for k in range(counts.pop())]
    columns = {
        "hlr": [hlr(full, a["syn_hard"]) for a in per_network],
        "ior": [ior(a["syn"], a["random"]) for a in per_network],
        "lrs": [lrs(full, a["syn_hard"], a["syn"], a["random"]) for a in per_network],
        "ars": [ars(a["syn"], a["random"], a["syn_naug"], a["random_naug"]) for a in per_network],
    }
    return {name: _summary(values) for name, values in columns.items()}
