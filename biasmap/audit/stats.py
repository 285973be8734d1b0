"""Uncertainty of the audit's metrics: bootstrap intervals and paired comparisons with `sd`.

Seeds are the sampling unit (DESIGN.md section 2, "Uncertainty"). Everything here is computed
from the store's rows with scipy, from a fixed random seed, so a report is reproducible:

- **Intervals** (95%, percentile bootstrap, `scipy.stats.bootstrap`): for one profession, its
  seeds are resampled; for a pooled value (the mean over professions), the seeds of every
  profession are resampled jointly, each profession within itself, and the per-profession
  values are averaged. mIoU, mBIoU and per-block BIoU are means over seeds; RD is recomputed
  from the resampled seeds' CLIP labels.
- **Paired comparisons** of a method with `sd` (same axis and profession) on the seeds both
  have a value for: delta = metric(method) - metric(sd) on those seeds (for a pooled row, the
  mean of the professions' deltas over the professions both have), its interval from the
  paired bootstrap (resampling seeds, each seed keeping both arms), and a two-sided p-value
  from a paired permutation test (`scipy.stats.permutation_test`, permutation_type="samples":
  the method/sd labels are swapped within seeds; exact when 2^n is at most the resample
  count). That test is the sign-flip test for the means and is defined for RD too, which is a
  statistic of a group, not of a seed.
- **Benjamini-Hochberg** (`scipy.stats.false_discovery_control`) within families: for one
  (axis, method, lambda), its professions (mIoU, mBIoU and RD each), and its professions x
  blocks (per-block BIoU); for pooled rows, the (method, lambda)s of one axis (each metric) and
  their (method, lambda)s x blocks.

With fewer than 2 seeds in a group (or in any profession of a pooled group), its intervals and
p-values are None. RD uses the seeds that have a CLIP label; a paired RD uses the seeds labelled
in both arms, so with unlabelled images its delta can differ from the difference of the RDs
shown.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from .metrics import GroupMetrics

BASELINE = "sd"  # the method every other method is compared with
CONFIDENCE = 0.95
FDR = 0.05  # significance level of the Benjamini-Hochberg adjusted p-values
N_RESAMPLES = 2000  # bootstrap resamples and (at most) permutations per statistic
SEED = 0  # every interval and test draws from its own generator seeded with this
METRICS = ("miou", "mbiou", "rd")  # GroupMetrics attributes that carry an Estimate

Statistic = Callable[..., np.ndarray]  # statistic(values [..., n], axis=-1) -> [...]


@dataclass(frozen=True)
class Estimate:
    """A table value with its uncertainty; None where it is not defined.

    value: the metric; ci_low / ci_high: its 95% bootstrap interval; delta: value minus sd's
    on the same seeds; delta_ci_low / delta_ci_high: the paired bootstrap interval of delta;
    p: the paired permutation test's two-sided p-value; p_bh: p adjusted by
    Benjamini-Hochberg within its family (see the module docstring).
    """

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    delta: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None
    p: float | None = None
    p_bh: float | None = None

    # CSV column suffixes after the value's own column, in field order.
    CSV_SUFFIXES = ("ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "p", "p_bh")

    def csv_values(self) -> list[float | None]:
        """[value, ci_low, ci_high, delta, delta_ci_low, delta_ci_high, p, p_bh]."""
        return [self.value, *(getattr(self, suffix) for suffix in self.CSV_SUFFIXES)]

    @property
    def significant(self) -> bool:
        """Whether delta differs from 0 at false discovery rate FDR (adjusted p < FDR)."""
        return self.p_bh is not None and self.p_bh < FDR

    def text(self, digits: int = 3) -> str:
        """The HTML cell: value [interval], then Δ delta [interval] on compared rows, and "*"
        when significant at FDR 0.05; e.g. "0.215 [0.201, 0.229] Δ -0.050 [-0.080, -0.020] *".
        "–" for a missing value."""
        if self.value is None:
            return "–"
        text = f"{self.value:.{digits}f}" + _interval_text(self.ci_low, self.ci_high, digits)
        if self.delta is not None:
            text += f" Δ {self.delta:+.{digits}f}"
            text += _interval_text(self.delta_ci_low, self.delta_ci_high, digits)
            text += " *" if self.significant else ""
        return text


def _interval_text(low: float | None, high: float | None, digits: int) -> str:
    if low is None or high is None:
        return ""
    return f" [{low:.{digits}f}, {high:.{digits}f}]"


# --------------------------------------------------------------------------- statistics


def mean_statistic(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over seeds: values [..., n] -> [...]."""
    return np.mean(values, axis=axis)


def rd_statistic(num_classes: int) -> Statistic:
    """RD of class indices [..., n] (each in [0, num_classes)): max_g p_g - min_g p_g -> [...]."""

    def rd(labels: np.ndarray, axis: int = -1) -> np.ndarray:
        labels = np.moveaxis(np.asarray(labels), axis, -1)
        one_hot = labels[..., None] == np.arange(num_classes)  # [..., n, G]
        frequencies = one_hot.mean(axis=-2)  # [..., G]
        return frequencies.max(axis=-1) - frequencies.min(axis=-1)

    return rd


def _pooled(samples: Sequence[np.ndarray], statistic: Statistic) -> Statistic:
    """statistic over seed indices, one index array per profession, averaged over professions:
    pooled(idx_1 [..., n_1], ..., idx_P [..., n_P]) -> [...]. Resampling indices rather than
    values lets one seed carry both arms of a paired comparison."""

    def pooled(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        per_profession = [
            statistic(_resample(sample, index), axis=-1)
            for sample, index in zip(samples, indices, strict=True)
        ]
        return np.mean(per_profession, axis=0)

    return pooled


def _resample(sample: np.ndarray, index: np.ndarray) -> np.ndarray:
    """sample [n] or [2, n] at seed indices [..., n] -> [..., n] or [..., 2, n]."""
    index = np.asarray(index, dtype=np.intp)
    if sample.ndim == 1:
        return sample[index]
    return np.stack([row[index] for row in sample], axis=-2)


def bootstrap_interval(
    samples: Sequence[np.ndarray],
    statistic: Statistic,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[float | None, float | None]:
    """95% percentile bootstrap interval of the mean over professions of statistic(sample).

    samples: one array per profession; the last axis is the seeds (a paired sample is
    [2, n]: method and sd values of the same seeds). Each profession's seeds are resampled
    within it, all professions jointly. Returns (None, None) when any profession has fewer
    than 2 seeds.
    """
    from scipy import stats

    if not samples or any(sample.shape[-1] < 2 for sample in samples):
        return None, None
    result = stats.bootstrap(
        [np.arange(sample.shape[-1]) for sample in samples],
        _pooled(samples, statistic),
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        axis=-1,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def paired_difference(statistic: Statistic) -> Statistic:
    """statistic(method) - statistic(sd) of a paired sample [..., 2, n] -> [...]."""

    def difference(pairs: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(pairs[..., 0, :], axis=-1) - statistic(pairs[..., 1, :], axis=-1)

    return difference


def paired_permutation_p(
    pairs: Sequence[np.ndarray],
    statistic: Statistic,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> float | None:
    """Two-sided p-value of "method and sd are exchangeable within every seed".

    pairs: one [2, n_p] array per profession (row 0 the method, row 1 sd, same seeds). The
    test statistic is the mean over professions of statistic(method) - statistic(sd); the null
    distribution swaps the two arms of each seed (scipy's permutation_type="samples"). None
    when any profession has fewer than 2 seeds.
    """
    from scipy import stats

    if not pairs or any(pair.shape[-1] < 2 for pair in pairs):
        return None
    bounds = np.cumsum([0, *(pair.shape[-1] for pair in pairs)])
    sections = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]

    def mean_difference(method: np.ndarray, sd: np.ndarray, axis: int = -1) -> np.ndarray:
        differences = [
            statistic(method[..., part], axis=-1) - statistic(sd[..., part], axis=-1)
            for part in sections
        ]
        return np.mean(differences, axis=0)

    method_values = np.concatenate([pair[0] for pair in pairs])
    sd_values = np.concatenate([pair[1] for pair in pairs])
    result = stats.permutation_test(
        (method_values, sd_values),
        mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        axis=-1,
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values, in the order given."""
    from scipy import stats

    if not pvalues:
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(pvalues), method="bh")]


# --------------------------------------------------------------------------- the store's seeds


@dataclass
class _Seeds:
    """One (axis, method, lambda_, profession) group's per-seed values."""

    values: dict[str, dict[int, float]] = dataclasses.field(
        default_factory=lambda: defaultdict(dict)
    )  # metric ("miou", "mbiou" or a block name) -> seed -> value
    labels: dict[int, str] = dataclasses.field(default_factory=dict)  # seed -> CLIP label
    classes: list[str] = dataclasses.field(default_factory=list)  # the axis's CLIP classes


def _seed_table(rows: pa.Table) -> dict[tuple, _Seeds]:
    """(axis, method, lambda_, profession) -> its seeds' values, from the store's rows."""
    columns = [
        "axis",
        "method",
        "lambda_",
        "profession",
        "seed",
        "iou",
        "biou_mean",
        "biou_blocks",
        "biou_values",
        "clip_label",
        "clip_classes",
    ]
    groups: dict[tuple, _Seeds] = defaultdict(_Seeds)
    for row in rows.select(columns).to_pylist():
        group = groups[(row["axis"], row["method"], float(row["lambda_"]), row["profession"])]
        seed = row["seed"]
        for metric, value in (("miou", row["iou"]), ("mbiou", row["biou_mean"])):
            if value is not None and np.isfinite(value):
                group.values[metric][seed] = float(value)
        for block, value in zip(row["biou_blocks"] or [], row["biou_values"] or [], strict=True):
            if value is not None and np.isfinite(value):
                group.values[block][seed] = float(value)
        if row["clip_label"] is not None:
            group.labels[seed] = row["clip_label"]
        for name in row["clip_classes"] or []:
            if name not in group.classes:
                group.classes.append(name)
    return groups


@dataclass(frozen=True)
class _Arms:
    """How to read one metric from two groups: values per seed and the statistic."""

    method: dict[int, Any]
    sd: dict[int, Any] | None
    statistic: Statistic


def _arms(metric: str, group: _Seeds, baseline: _Seeds | None) -> _Arms:
    """The per-seed values of `metric` ("miou", "mbiou", "rd" or a block) in both arms.

    RD's values are class indices over the union of both arms' classes.
    """
    if metric != "rd":
        sd = baseline.values.get(metric, {}) if baseline else None
        return _Arms(group.values.get(metric, {}), sd, mean_statistic)
    classes = list(group.classes)
    for name in baseline.classes if baseline else []:
        if name not in classes:
            classes.append(name)
    index = {name: i for i, name in enumerate(classes)}

    def indices(seeds: _Seeds) -> dict[int, int]:
        # A label outside the classes is an error that profession_metrics reports first.
        return {seed: index[label] for seed, label in seeds.labels.items() if label in index}

    sd = indices(baseline) if baseline else None
    return _Arms(indices(group), sd, rd_statistic(max(len(classes), 1)))


def _sample(values: dict[int, Any]) -> np.ndarray:
    return np.asarray([values[seed] for seed in sorted(values)])


def _pairs(arms: _Arms) -> np.ndarray:
    """[2, n]: method and sd values on the seeds both have, in seed order."""
    seeds = sorted(set(arms.method) & set(arms.sd or {}))
    return np.asarray([[arms.method[s] for s in seeds], [arms.sd[s] for s in seeds]])


# --------------------------------------------------------------------------- estimates


@dataclass
class _Pending:
    """Estimates being built, and which family each p-value is adjusted in."""

    estimates: dict[tuple, dict[str, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )  # group key -> metric -> Estimate fields
    families: dict[tuple, list[tuple[tuple, str]]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )  # family -> [(group key, metric)]


def _estimate_fields(
    arms_per_profession: Sequence[_Arms], compared: bool, n_resamples: int, seed: int
) -> dict[str, Any]:
    """Interval and, when compared, delta / its interval / p for one metric of one row
    (a profession's, or a pooled row's with one _Arms per profession)."""
    statistic = arms_per_profession[0].statistic
    samples = [_sample(arms.method) for arms in arms_per_profession if arms.method]
    fields: dict[str, Any] = {}
    if len(samples) == len(arms_per_profession):
        low, high = bootstrap_interval(samples, statistic, n_resamples=n_resamples, seed=seed)
        fields.update(ci_low=low, ci_high=high)
    if not compared:
        return fields
    pairs = [_pairs(arms) for arms in arms_per_profession if arms.sd is not None]
    pairs = [pair for pair in pairs if pair.shape[-1] > 0]
    if not pairs:
        return fields
    difference = paired_difference(statistic)
    fields["delta"] = float(np.mean([difference(pair) for pair in pairs]))
    low, high = bootstrap_interval(pairs, difference, n_resamples=n_resamples, seed=seed)
    fields.update(delta_ci_low=low, delta_ci_high=high)
    fields["p"] = paired_permutation_p(pairs, statistic, n_resamples=n_resamples, seed=seed)
    return fields


def attach_statistics(
    rows: pa.Table,
    per_profession: Sequence[GroupMetrics],
    pooled: Sequence[GroupMetrics],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[list[GroupMetrics], list[GroupMetrics]]:
    """The groups of metrics.profession_metrics / pooled_metrics with their `estimates`
    (mIoU, mBIoU, RD) and `block_estimates` (per-block BIoU) filled in.

    rows: the store's rows (StoreRows.table) the groups were computed from. Each Estimate's
    value is the group's own (the table's number); see the module docstring for the rest.
    """
    seeds = _seed_table(rows)
    # sd runs at lambda 0; whatever its lambda, it is the baseline of its axis and profession.
    baselines = {
        (axis, profession): group
        for (axis, method, _, profession), group in seeds.items()
        if method == BASELINE
    }
    pending = _Pending()
    groups = [*per_profession, *pooled]
    for group in groups:
        compared = group.method != BASELINE
        professions = (
            [group.profession]
            if group.profession is not None
            else sorted({g.profession for g in per_profession if _same_arm(g, group)})
        )
        key = _key(group)
        for metric in [*METRICS, *group.block_biou]:
            arms = [
                _arms(
                    metric,
                    seeds[(group.axis, group.method, group.lambda_, profession)],
                    baselines.get((group.axis, profession)),
                )
                for profession in professions
            ]
            fields = _estimate_fields(arms, compared, n_resamples, seed)
            pending.estimates[key][metric] = fields
            if fields.get("p") is not None:
                kind = metric if metric in METRICS else "blocks"
                family = (
                    (group.axis, group.method, group.lambda_, kind)
                    if group.profession is not None
                    else (group.axis, "pooled", kind)
                )
                pending.families[family].append((key, metric))
    for members in pending.families.values():
        adjusted = benjamini_hochberg([pending.estimates[k][m]["p"] for k, m in members])
        for (key, metric), p_bh in zip(members, adjusted, strict=True):
            pending.estimates[key][metric]["p_bh"] = p_bh

    def with_estimates(group: GroupMetrics) -> GroupMetrics:
        fields = pending.estimates[_key(group)]
        estimates = {m: Estimate(getattr(group, m), **fields[m]) for m in METRICS}
        blocks = {b: Estimate(v, **fields[b]) for b, v in group.block_biou.items()}
        return dataclasses.replace(group, estimates=estimates, block_estimates=blocks)

    return (
        [with_estimates(g) for g in per_profession],
        [with_estimates(g) for g in pooled],
    )


def _key(group: GroupMetrics) -> tuple:
    return (group.axis, group.method, group.lambda_, group.profession)


def _same_arm(group: GroupMetrics, pooled: GroupMetrics) -> bool:
    return (group.axis, group.method, group.lambda_) == (pooled.axis, pooled.method, pooled.lambda_)
