"""Intervals, paired comparisons and FDR adjustment of the audit's metrics, against independent
computations written here: a seeded numpy bootstrap (within Monte Carlo tolerance), deltas from
the raw rows, p-values by enumerating every within-seed swap, and Benjamini-Hochberg by hand."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from audit_fixtures import BLOCKS, CLASSES, fixture_rows, make_row, write_store

from biasmap.audit import metrics, stats

REPLICATES = 20000  # the independent bootstrap's resamples


def _store_groups(tmp_path, rows, **options):
    write_store(tmp_path, rows, parts=2)
    table = metrics.read_store(tmp_path).table
    per_profession = metrics.profession_metrics(table)
    pooled = metrics.pooled_metrics(per_profession)
    return stats.attach_statistics(table, per_profession, pooled, **options)


def _find(groups, method, profession, lambda_=0.0, axis="gender"):
    (found,) = [
        g
        for g in groups
        if (g.axis, g.method, g.lambda_, g.profession) == (axis, method, lambda_, profession)
    ]
    return found


def _random_rows(seeds=12, professions=("doctor", "pilot")):
    """gender x professions x {sd, biasmap@100, fd} x seeds, random values and labels."""
    rng = random.Random(3)
    rows = []
    for profession in professions:
        for method, lambda_ in (("sd", 0), ("biasmap", 100), ("fd", 0)):
            for seed in range(seeds):
                rows.append(
                    make_row(
                        profession,
                        "gender",
                        seed,
                        method,
                        lambda_=lambda_,
                        iou=rng.random(),
                        biou=[rng.random() for _ in BLOCKS],
                        label=rng.choice(CLASSES["gender"]),
                    )
                )
    return rows


# ----------------------------------------------------------------- independent computations


def _seed_values(rows, method, profession, metric, lambda_=0.0):
    """{seed: value} of one group straight from the rows; RD's values are labels."""
    values = {}
    for row in rows:
        if (row["axis"], row["method"], row["lambda_"], row["profession"]) != (
            "gender",
            method,
            lambda_,
            profession,
        ):
            continue
        if metric == "rd":
            if row["clip_label"] is not None:
                values[row["seed"]] = CLASSES["gender"].index(row["clip_label"])
        elif metric == "miou":
            values[row["seed"]] = row["iou"]
        elif metric == "mbiou":
            values[row["seed"]] = row["biou_mean"]
        else:
            values[row["seed"]] = row["biou_values"][BLOCKS.index(metric)]
    return values


def _statistic(metric, values):
    """Statistic of values [..., n] along the last axis: a mean, or RD of gender labels."""
    if metric != "rd":
        return values.mean(axis=-1)
    female = (values == 1).mean(axis=-1)
    return np.abs(2 * female - 1)  # |p_female - p_male|


def _bootstrap_distribution(samples, statistic, seed=11):
    """REPLICATES draws of the mean over professions of statistic(resampled profession), each
    profession's seeds resampled within it."""
    rng = np.random.default_rng(seed)
    per_profession = []
    for sample in samples:
        n = sample.shape[-1]
        index = rng.integers(0, n, size=(REPLICATES, n))
        per_profession.append(statistic(sample[..., index]))
    return np.mean(per_profession, axis=0)


def _assert_percentile_interval(low, high, distribution):
    """A 95% percentile interval from 2000 resamples sits, on the independent distribution,
    between the 1st and 4th percentiles (low) and the 96th and 99th (high): a Monte Carlo
    tolerance of about 4 standard errors of a 2.5% tail frequency."""
    lo_range = np.percentile(distribution, [1.0, 4.0])
    hi_range = np.percentile(distribution, [96.0, 99.0])
    slack = 1e-9
    assert lo_range[0] - slack <= low <= lo_range[1] + slack, (low, lo_range)
    assert hi_range[0] - slack <= high <= hi_range[1] + slack, (high, hi_range)


def _exact_swap_p(pairs, metric):
    """Two-sided p of the mean over professions of stat(method) - stat(sd), enumerating every
    swap of the two arms within seeds (pairs: [(method values, sd values)] per profession)."""
    method = np.concatenate([m for m, _ in pairs])
    sd = np.concatenate([s for _, s in pairs])
    bounds = np.cumsum([0] + [len(m) for m, _ in pairs])

    def observed_stat(x, y):
        return np.mean(
            [
                _statistic(metric, x[a:b]) - _statistic(metric, y[a:b])
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )

    observed = observed_stat(method, sd)
    null = []
    for flips in itertools.product([False, True], repeat=len(method)):
        flips = np.array(flips)
        null.append(observed_stat(np.where(flips, sd, method), np.where(flips, method, sd)))
    null = np.array(null)
    tol = 1e-12
    less = np.mean(null <= observed + tol)
    greater = np.mean(null >= observed - tol)
    return min(1.0, 2 * min(less, greater))


def _bh(pvalues):
    """Benjamini-Hochberg by hand: p_(i) * m / i, made monotone from the largest down."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        index = order[rank - 1]
        running = min(running, pvalues[index] * m / rank)
        adjusted[index] = running
    return adjusted


def _paired(rows, method, profession, metric, lambda_):
    """(method values, sd values) on the seeds both have."""
    ours = _seed_values(rows, method, profession, metric, lambda_)
    base = _seed_values(rows, "sd", profession, metric)
    seeds = sorted(set(ours) & set(base))
    return np.array([ours[s] for s in seeds]), np.array([base[s] for s in seeds])


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("metric", ["miou", "mbiou", "rd", "down-8"])
def test_intervals_match_an_independent_bootstrap(tmp_path, metric):
    rows = _random_rows()
    per_profession, pooled = _store_groups(tmp_path, rows)
    professions = ("doctor", "pilot")

    def estimate(group):
        return group.block_estimate(metric) if metric in BLOCKS else group.estimate(metric)

    for method, lambda_ in (("sd", 0.0), ("biasmap", 100.0)):
        samples = []
        for profession in professions:
            values = _seed_values(rows, method, profession, metric, lambda_)
            sample = np.array([values[s] for s in sorted(values)])
            samples.append(sample)
            found = estimate(_find(per_profession, method, profession, lambda_))
            assert found.value == pytest.approx(_statistic(metric, sample))
            distribution = _bootstrap_distribution([sample], lambda x: _statistic(metric, x))
            _assert_percentile_interval(found.ci_low, found.ci_high, distribution)
        # Pooled: every profession's seeds resampled within it, jointly, then averaged.
        found = estimate(_find(pooled, method, None, lambda_))
        distribution = _bootstrap_distribution(samples, lambda x: _statistic(metric, x))
        _assert_percentile_interval(found.ci_low, found.ci_high, distribution)


@pytest.mark.parametrize("metric", ["miou", "mbiou", "rd", "up-16"])
def test_paired_deltas_intervals_and_exact_p_values(tmp_path, metric):
    rows = _random_rows(seeds=10)
    # 1024 swaps per profession: with 2048 permutations scipy enumerates them all (exact).
    per_profession, pooled = _store_groups(tmp_path, rows, n_resamples=2048)

    def estimate(group):
        return group.block_estimate(metric) if metric in BLOCKS else group.estimate(metric)

    family = []
    for profession in ("doctor", "pilot"):
        method_values, sd_values = _paired(rows, "biasmap", profession, metric, 100.0)
        found = estimate(_find(per_profession, "biasmap", profession, 100.0))
        sd = estimate(_find(per_profession, "sd", profession))
        expected = _statistic(metric, method_values) - _statistic(metric, sd_values)
        assert found.delta == pytest.approx(expected, abs=1e-12)
        assert found.delta == pytest.approx(found.value - sd.value, abs=1e-12)
        assert sd.delta is None and sd.p is None and sd.p_bh is None  # sd is the baseline
        pairs = np.stack([method_values, sd_values])

        def paired_statistic(x):
            return _statistic(metric, x[..., 0, :]) - _statistic(metric, x[..., 1, :])

        distribution = _bootstrap_distribution(
            [pairs], lambda x: paired_statistic(np.moveaxis(x, 0, -2))
        )
        _assert_percentile_interval(found.delta_ci_low, found.delta_ci_high, distribution)
        assert found.p == pytest.approx(_exact_swap_p([(method_values, sd_values)], metric))
        family.append(found)
    if metric in ("miou", "mbiou", "rd"):  # BH across professions
        expected_bh = _bh([f.p for f in family])
        assert [f.p_bh for f in family] == pytest.approx(expected_bh)
    else:  # BH across professions x blocks
        everything = [
            (g, b) for g in per_profession if g.method == "biasmap" for b in g.block_estimates
        ]
        adjusted = _bh([g.block_estimate(b).p for g, b in everything])
        for (g, b), p_bh in zip(everything, adjusted, strict=True):
            assert g.block_estimate(b).p_bh == pytest.approx(p_bh)


def test_fixture_store_pooled_comparisons_are_exact(tmp_path):
    """The fixture store (2 professions x 4 seeds): pooled deltas, p-values by enumerating all
    256 swaps, BH across the methods of the pooled table, and RD's delta on the seeds labelled
    in both arms (chef's sd seed 3 has no label)."""
    rows = fixture_rows()
    per_profession, pooled = _store_groups(tmp_path, rows)
    pooled_p = {}
    for method, lambda_ in (("biasmap", 100.0), ("biasmap", 200.0), ("fd", 0.0)):
        for metric in ("miou", "rd"):
            pairs = [_paired(rows, method, p, metric, lambda_) for p in ("chef", "nurse")]
            found = _find(pooled, method, None, lambda_).estimate(metric)
            expected = np.mean([_statistic(metric, m) - _statistic(metric, s) for m, s in pairs])
            assert found.delta == pytest.approx(expected, abs=1e-12)
            assert found.p == pytest.approx(_exact_swap_p(pairs, metric))
            pooled_p[(method, lambda_, metric)] = found
    for metric in ("miou", "rd"):
        family = [v for k, v in pooled_p.items() if k[2] == metric]
        assert [f.p_bh for f in family] == pytest.approx(_bh([f.p for f in family]))
    # biasmap shifts every seed's IoU by -0.1: all 8 differences negative, p = 2 / 256.
    assert pooled_p[("biasmap", 100.0, "miou")].p == pytest.approx(2 / 256)
    assert pooled_p[("biasmap", 100.0, "miou")].significant
    assert not pooled_p[("fd", 0.0, "miou")].significant
    # chef: biasmap labels M M F M vs sd M M F (seed 3 unlabelled): paired on seeds 0-2.
    chef = _find(per_profession, "biasmap", "chef", 100.0).estimate("rd")
    assert chef.value == pytest.approx(0.5) and chef.delta == pytest.approx(0.0)


def test_statistics_are_reproducible_and_absent_below_two_seeds(tmp_path):
    rows = fixture_rows()
    first = _store_groups(tmp_path / "a", rows)
    second = _store_groups(tmp_path / "b", rows)
    assert first == second
    one_seed = [r for r in rows if r["seed"] == 0]
    per_profession, pooled = _store_groups(tmp_path / "c", one_seed)
    for group in [*per_profession, *pooled]:
        for estimate in [*group.estimates.values(), *group.block_estimates.values()]:
            assert estimate.ci_low is None and estimate.ci_high is None
            assert estimate.delta_ci_low is None and estimate.p is None and estimate.p_bh is None
    found = _find(per_profession, "biasmap", "nurse", 100.0).estimate("miou")
    assert found.delta == pytest.approx(-0.1)  # the paired difference itself is still given
    assert found.text() == "0.300 Δ -0.100"


def test_estimate_text_and_csv_values():
    estimate = stats.Estimate(0.215, 0.201, 0.229, -0.05, -0.08, -0.02, 0.001, 0.004)
    assert estimate.text() == "0.215 [0.201, 0.229] Δ -0.050 [-0.080, -0.020] *"
    assert estimate.csv_values() == [0.215, 0.201, 0.229, -0.05, -0.08, -0.02, 0.001, 0.004]
    assert stats.Estimate(0.215, 0.201, 0.229).text() == "0.215 [0.201, 0.229]"
    assert not stats.Estimate(0.2, delta=0.1, p=0.01, p_bh=0.06).significant
    assert stats.Estimate(None).text() == "–"
