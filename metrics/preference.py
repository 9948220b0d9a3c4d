"""Statistics of side-by-side human votes: win rates with confidence intervals, a Bradley–Terry ranking and rater
agreement (pipeline/human_eval.py results).

A vote is one rater's answer to one aspect of one pair of images: the winning system, or a tie. Sides are not part
of the statistics (they were randomised per showing; the database keeps them to check for side bias).

- Win rate of A over B on an aspect: (wins + ½ ties) / votes, the convention of side-by-side tables such as the
  notes' human-evaluation table; its 95% interval is Wilson's score interval (Wilson 1927) on that many successes,
  which stays inside [0, 1] and is not degenerate at 0 or 1 (counting a tie as half a success makes it a little wide).
  Votes are treated as independent; several raters judging the same pair are not.
- Ranking of several systems: the Bradley–Terry model P(i beats j) = p_i / (p_i + p_j) (Bradley & Terry 1952), fitted
  by Hunter's (2004) MM iterations, ties as half a win each way, with a weak prior (``prior`` virtual ties against a
  reference of strength 1) so that a system that won or lost everything still has a finite score; 95% intervals by a
  bootstrap over votes.
- Agreement between raters: Krippendorff's α for nominal data (Krippendorff 2011) over the pairs judged by two or
  more raters, per aspect, each vote coded relative to its pair (first system, second system, tie), with the raw share
  of agreeing rater pairs beside it. α is about 0 for raters who answer at random, 1 for raters who always agree, and
  undefined (None) where every answer is the same (no disagreement to expect).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np

TIE = "tie"


@dataclass(frozen=True)
class Vote:
    rater: str
    pair: int  # the pair of images (one prompt and seed, two systems)
    systems: tuple[str, str]  # the pair's two systems, in study order (not the sides shown)
    aspect: str
    winner: str  # one of ``systems``, or TIE


def wilson(successes: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes/n (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The interval always holds p; in floating point its bound can land an ulp on the wrong side of p = 0 or 1
    # (e.g. 0.9999999999999999 for a unanimous 1.0), which a plot's error bars refuse (issue 29): put it back.
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


def win_rates(votes: list[Vote], systems: list[str], aspects: list[str]) -> list[dict]:
    """One row per aspect and pair of systems (A before B in study order): A's wins, ties, losses, win rate and its
    95% interval."""
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for v in votes:
        a, b = sorted(v.systems, key=systems.index)
        counts[(v.aspect, a, b)]["win" if v.winner == a else "loss" if v.winner == b else "tie"] += 1
    rows = []
    for aspect in aspects:
        for a, b in combinations(systems, 2):
            c = counts.get((aspect, a, b))
            if not c:
                continue
            n = sum(c.values())
            rate = (c["win"] + 0.5 * c["tie"]) / n
            lo, hi = wilson(c["win"] + 0.5 * c["tie"], n)
            rows.append({"aspect": aspect, "system": a, "opponent": b, "wins": c["win"], "ties": c["tie"],
                         "losses": c["loss"], "votes": n, "win_rate": rate, "ci_low": lo, "ci_high": hi})
    return rows


def bradley_terry(outcomes: np.ndarray, num: int, prior: float = 1.0, iters: int = 1000, tol: float = 1e-10):
    """Bradley–Terry log-strengths (num,), mean 0, from ``outcomes`` (M, 3) rows (i, j, s): i met j and scored s
    (1 win, ½ tie, 0 loss). Hunter's MM update p_i ← W_i / Σ_j n_ij / (p_i + p_j), with ``prior`` virtual ties
    against a fixed reference of strength 1 per system (0: the plain maximum-likelihood fit)."""
    i, j, s = outcomes[:, 0].astype(int), outcomes[:, 1].astype(int), outcomes[:, 2]
    wins = np.full(num, 0.5 * prior)
    np.add.at(wins, i, s)
    np.add.at(wins, j, 1 - s)
    games = np.zeros((num, num))
    np.add.at(games, (i, j), 1)
    np.add.at(games, (j, i), 1)
    p = np.ones(num)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1) + prior / (p + 1.0)
        new = wins / np.maximum(denom, 1e-300)
        if prior == 0:
            new /= np.exp(np.log(new).mean())  # the plain fit is defined up to a common factor
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    scores = np.log(p)
    return scores - scores.mean()


def ranking(votes: list[Vote], systems: list[str], aspect: str, bootstrap: int = 200, seed: int = 0) -> list[dict]:
    """Systems ranked by Bradley–Terry score on one aspect, with a 95% bootstrap interval (votes resampled)."""
    index = {s: i for i, s in enumerate(systems)}
    rows = [(index[v.systems[0]], index[v.systems[1]],
             1.0 if v.winner == v.systems[0] else 0.0 if v.winner == v.systems[1] else 0.5)
            for v in votes if v.aspect == aspect]
    if not rows:
        return []
    data = np.array(rows, dtype=np.float64)
    scores = bradley_terry(data, len(systems))
    rng = np.random.default_rng(seed)
    draws = np.stack([bradley_terry(data[rng.integers(0, len(data), len(data))], len(systems))
                      for _ in range(bootstrap)]) if bootstrap else None
    order = np.argsort(-scores, kind="stable")
    out = []
    for rank, i in enumerate(order, 1):
        row = {"aspect": aspect, "rank": rank, "system": systems[i], "bt_score": float(scores[i]),
               "votes": int(((data[:, 0] == i) | (data[:, 1] == i)).sum())}
        if draws is not None:
            row["ci_low"], row["ci_high"] = (float(q) for q in np.percentile(draws[:, i], [2.5, 97.5]))
        out.append(row)
    return out


def krippendorff_alpha(units: list[list]) -> float | None:
    """Krippendorff's α for nominal values; ``units`` holds each unit's values (one per rater who judged it). Units
    with fewer than two values are not pairable and are left out. None where no disagreement is possible to expect
    (fewer than two pairable values, or a single category)."""
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in ((values[i], values[j]) for i in range(m) for j in range(m) if i != j):
            coincidence[(a, b)] += 1.0 / (m - 1)
    totals: Counter = Counter()
    for (a, _), w in coincidence.items():
        totals[a] += w
    n = sum(totals.values())
    if n < 2:
        return None
    observed = sum(w for (a, b), w in coincidence.items() if a != b) / n
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n * (n - 1))
    return None if expected == 0 else 1.0 - observed / expected


def relative(vote: Vote) -> str:
    """A vote coded relative to its pair: "first" (the pair's first system in study order won), "second" or TIE."""
    return "first" if vote.winner == vote.systems[0] else "second" if vote.winner == vote.systems[1] else TIE


def agreement(votes: list[Vote], aspects: list[str]) -> list[dict]:
    """Per aspect: Krippendorff's α and the share of agreeing rater pairs over pairs judged by two or more raters.
    Votes are coded relative to their pair (first / second / tie), not by the winner's name: by name, the values
    pooled over pairs of different systems would make a rater judging A against B expected to disagree by naming
    C, inflating α for three or more systems (random raters: 0.08 with 3 systems, 0.17 with 5; issue 29)."""
    rows = []
    for aspect in aspects:
        by_pair: dict[int, list[str]] = defaultdict(list)
        for v in votes:
            if v.aspect == aspect:
                by_pair[v.pair].append(relative(v))
        units = [w for w in by_pair.values() if len(w) > 1]
        pairs = [(a, b) for w in units for a, b in combinations(w, 2)]
        rows.append({"aspect": aspect, "pairs_with_2_or_more_raters": len(units),
                     "krippendorff_alpha": krippendorff_alpha(units),
                     "percent_agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None})
    return rows
