"""Ejection-fraction metrics for EchoAI: one function, one `evaluate` module, no downloads.

`compute_ef_metrics` scores EF predictions (%) against reference EF (%) the way EchoNet-Dynamic
(Ouyang et al., Nature 2020) reports them, and adds the Bland–Altman agreement statistics a
cardiologist asks for. `EFMetrics` wraps it as an `evaluate.Metric`, so `add_batch` / `compute` and
distributed gathering work as for any Hugging Face metric; `evaluate.load("mae")` fetches its script
from the Hub and fails offline, this one never touches the network.

Usage::

    from metrics_echoai import compute_ef_metrics, load_ef_metric

    compute_ef_metrics(predictions, references)                 # plain floats, no `evaluate`
    compute_ef_metrics(predictions, references, bootstrap=10_000, seed=0)   # + 95 % intervals

    metric = load_ef_metric()                                   # an `evaluate.Metric`
    for batch in loader:
        metric.add_batch(predictions=model_ef, references=batch["labels"])
    results = metric.compute(bootstrap=10_000)                  # keyword arguments as above

    # or through `evaluate`, from a checkout with the package installed (`pip install -e .`):
    metric = evaluate.load("<repo>/metrics/ef_metrics")        # works with HF_HUB_OFFLINE=1

Single source: the computation and the `evaluate.Metric` subclass live here, in a top-level module
that `pip install` ships. `metrics/ef_metrics/ef_metrics.py` only re-exports `EFMetrics`, because
`evaluate.load(folder)` wants a script named after its folder; `evaluate` copies that script into
its module cache and checks its imports, so it imports `metrics_echoai` as an installed library
(no relative import, no Hub metric, nothing to download). `load_ef_metric()` builds the same class
directly and so needs neither the folder nor the cache.

Output: a flat dict of JSON-serialisable Python numbers (NaN where a statistic is undefined):

    n                      number of videos
    mae, rmse              mean absolute / root-mean-square error (EF points)
    mape                   mean absolute percentage error, 100 * mean(|pred - ref| / |ref|) (%)
    r2                     coefficient of determination, 1 - SS_res / SS_tot, exactly as
                           `sklearn.metrics.r2_score` (constant references: 1.0 if every prediction
                           is exact, else 0.0, sklearn's `force_finite=True`)
    pearson_r, pearson_r2  Pearson correlation and its square; EchoNet-Dynamic's R script
                           reports the latter as "R²", which is not `r2` for a biased model
    bias                   mean of prediction - reference (Bland & Altman 1986)
    diff_sd                standard deviation of the differences (ddof=1)
    loa_lower, loa_upper   95 % limits of agreement, bias ∓ 1.96 * diff_sd
    auc_ef_below_<t>       AUC for detecting reduced EF at each threshold t (reference < t % is
                           positive, lower predicted EF ranks as more likely reduced), e.g.
                           `auc_ef_below_40`; ties count one half, i.e. the Mann–Whitney U
                           statistic / (n_pos * n_neg)

With `bootstrap=B > 0`, every statistic `<k>` above (not `n`) also gets `<k>_ci_low` and
`<k>_ci_high`, the percentile interval over B resamples of the videos with replacement, plus
`bootstrap` (B) and `confidence`. EchoNet-Dynamic bootstraps 10,000 resamples the same way
(`echonet.utils.bootstrap`) but takes the 5th and 95th percentiles, a 90 % interval although the
paper calls it 95 %; `confidence=0.90` reproduces it (up to percentile interpolation).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import numpy as np


__all__ = [  # noqa: F822 (EFMetrics is lazy)
    "DEFAULT_THRESHOLDS",
    "EFMetrics",
    "check_against_mean_predictor",
    "compute_ef_metrics",
    "load_ef_metric",
    "nested_spread",
    "permutation_test",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (35.0, 40.0, 45.0, 50.0)
# Two-sided 95 % normal quantile used by Bland & Altman (1986) for the limits of agreement.
LOA_Z = 1.96
# Bootstrap resamples are evaluated in chunks of about this many (resample, video) cells (32 MB of
# float64), so 10,000 resamples of a large test set never materialise as one huge matrix.
_BOOTSTRAP_CHUNK_CELLS = 1 << 22

_CITATION = """\
@article{ouyang2020video,
  title   = {Video-based {AI} for beat-to-beat assessment of cardiac function},
  author  = {Ouyang, David and He, Bryan and Ghorbani, Amirata and Yuan, Neal and Ebinger, Joseph and
             Langlotz, Curtis P. and Heidenreich, Paul A. and Harrington, Robert A. and Liang, David H.
             and Ashley, Euan A. and Zou, James Y.},
  journal = {Nature},
  volume  = {580},
  pages   = {252--256},
  year    = {2020}
}
@article{bland1986statistical,
  title   = {Statistical methods for assessing agreement between two methods of clinical measurement},
  author  = {Bland, J. Martin and Altman, Douglas G.},
  journal = {The Lancet},
  volume  = {327},
  number  = {8476},
  pages   = {307--310},
  year    = {1986}
}
@article{hanley1982meaning,
  title   = {The meaning and use of the area under a receiver operating characteristic ({ROC}) curve},
  author  = {Hanley, James A. and McNeil, Barbara J.},
  journal = {Radiology},
  volume  = {143},
  number  = {1},
  pages   = {29--36},
  year    = {1982}
}
"""

_DESCRIPTION = """\
Metrics for left-ventricular ejection fraction (EF, %) regression on echocardiogram videos: MAE, RMSE,
MAPE, R² (as sklearn's r2_score) and squared Pearson correlation (as EchoNet-Dynamic reports "R²"),
Bland-Altman bias and 95 % limits of agreement, AUC for detecting reduced EF at clinical thresholds,
and optional percentile-bootstrap confidence intervals. Computed locally with numpy; never downloads.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `float`): predicted EF, in %, one per video.
    references (`list` of `float`): reference EF, in %, one per video.
    thresholds (`Sequence[float]`, defaults to `(35, 40, 45, 50)`): EF thresholds (%) for the
        reduced-EF AUCs; reference < threshold is the positive class.
    bootstrap (`int`, defaults to 0): number of bootstrap resamples for confidence intervals
        (EchoNet-Dynamic uses 10,000); 0 skips them.
    seed (`int`, defaults to 0): seed of the numpy Generator that draws the resamples.
    confidence (`float`, defaults to 0.95): coverage of the percentile intervals.
Returns:
    A flat dict of floats: `n`, `mae`, `rmse`, `mape`, `r2`, `pearson_r`, `pearson_r2`, `bias`,
    `diff_sd`, `loa_lower`, `loa_upper`, `auc_ef_below_<t>` for each threshold t, and with
    `bootstrap > 0` also `<key>_ci_low` / `<key>_ci_high` for each of them, `bootstrap`, `confidence`.
    Undefined statistics are NaN with a warning (Pearson r for constant inputs, an AUC whose threshold
    leaves a single class).
Examples:
    >>> metric = load_ef_metric()
    >>> results = metric.compute(predictions=[50, 60, 30, 45], references=[55, 58, 35, 40])
    >>> round(results["mae"], 2), round(results["r2"], 4), results["auc_ef_below_40"]
    (4.25, 0.791, 1.0)
"""


def _as_ef_vector(values: Any, name: str) -> np.ndarray:
    """`values` as a float64 vector; (n,) and regression logits of shape (n, 1) are accepted."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be numeric EF values in %, got {type(values).__name__}: {error}") from None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array.reshape(-1)  # regression logits are (B, 1); keep any other shape an error
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be a vector of EF values (shape (n,) or (n, 1)), got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(
            f"`{name}` contains {bad.size} non-finite value(s) (NaN or inf) of {array.size}, at index {shown}"
        )
    return array


def _thresholds_tuple(thresholds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not all(np.isfinite(values)):
        raise ValueError(f"`thresholds` must be finite EF values in %, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"`thresholds` must not repeat a value, got {values}")
    return values


def _auc_key(threshold: float) -> str:
    return f"auc_ef_below_{threshold:g}"


def _is_constant(counts: np.ndarray, values: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(B,) True where every video drawn in a resample (count > 0) has the same value.

    Moment formulas leave rounding noise instead of an exact zero variance, so rows whose variance
    is tiny relative to the values' magnitude are re-checked exactly on the drawn values.
    """
    constant = np.zeros(counts.shape[0], dtype=bool)
    suspect = np.flatnonzero(variance <= (1e-6 * np.abs(values).max()) ** 2)
    if suspect.size:
        drawn = counts[suspect] > 0
        low = np.where(drawn, values, np.inf).min(axis=1)
        high = np.where(drawn, values, -np.inf).max(axis=1)
        constant[suspect] = low == high
    return constant


def _weighted_statistics(
    counts: np.ndarray, predictions: np.ndarray, references: np.ndarray, thresholds: tuple[float, ...]
) -> dict[str, np.ndarray]:
    """Every statistic for B weighted copies of the sample at once; NaN where undefined, no warnings.

    A bootstrap resample is the original sample with integer multiplicities, so each statistic is
    written as a function of `counts` (B, n) (row b holds how often each video is drawn; every row
    sums to n): a mean over resample b is `counts[b] @ x / n`. The point estimate is the single row
    of ones. One matrix product therefore evaluates a statistic on all resamples without gathering
    (B, n) copies of the data.
    """
    n = predictions.shape[0]
    diff = predictions - references
    ss_res = counts @ (diff * diff)
    stats: dict[str, np.ndarray] = {"mae": _resample_mean(counts, np.abs(diff)), "rmse": np.sqrt(ss_res / n)}
    if np.any(references == 0):
        stats["mape"] = np.full(counts.shape[0], np.nan)
    else:
        stats["mape"] = 100.0 * _resample_mean(counts, np.abs(diff) / np.abs(references))
    stats.update(_fit_statistics(counts, predictions, references, ss_res))
    stats.update(_agreement_statistics(counts, diff))
    stats.update(_auc_statistics(counts, predictions, references, thresholds))
    return stats


def _resample_mean(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B,) mean of the per-video values `x` (n,) over each weighted copy in `counts` (B, n)."""
    return counts @ x / counts.shape[1]


def _fit_statistics(
    counts: np.ndarray, predictions: np.ndarray, references: np.ndarray, ss_res: np.ndarray
) -> dict[str, np.ndarray]:
    """`r2` (as sklearn) and the Pearson correlation for each weighted copy; `ss_res` (B,) is the residual sum."""
    n = counts.shape[1]
    # Centre on the full-sample means first so that E[x²] - E[x]² does not cancel catastrophically.
    p = predictions - predictions.mean()
    r = references - references.mean()
    mean_p, mean_r = _resample_mean(counts, p), _resample_mean(counts, r)
    var_p = np.maximum(_resample_mean(counts, p * p) - mean_p**2, 0.0)
    var_r = np.maximum(_resample_mean(counts, r * r) - mean_r**2, 0.0)
    cov_pr = _resample_mean(counts, p * r) - mean_p * mean_r
    constant_p = _is_constant(counts, predictions, var_p)
    constant_r = _is_constant(counts, references, var_r)
    # sklearn.metrics.r2_score: 1 - SS_res / SS_tot; with constant references (SS_tot = 0) it returns
    # 1.0 for a perfect fit and 0.0 otherwise (force_finite=True).
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / (n * var_r)
        pearson = np.clip(cov_pr / np.sqrt(var_p * var_r), -1.0, 1.0)
    pearson_r = np.where(constant_p | constant_r, np.nan, pearson)
    r2 = np.where(constant_r, np.where(ss_res == 0, 1.0, 0.0), r2)
    return {"r2": r2, "pearson_r": pearson_r, "pearson_r2": pearson_r**2}


def _agreement_statistics(counts: np.ndarray, diff: np.ndarray) -> dict[str, np.ndarray]:
    """Bland & Altman (1986) for each weighted copy: bias = mean difference, limits = bias ± 1.96 SD (ddof=1)."""
    n = counts.shape[1]
    d = diff - diff.mean()  # centred, as in _fit_statistics
    mean_d = _resample_mean(counts, d)
    bias = _resample_mean(counts, diff)
    diff_sd = np.sqrt(np.maximum(_resample_mean(counts, d * d) - mean_d**2, 0.0) * n / (n - 1))
    return {"bias": bias, "diff_sd": diff_sd, "loa_lower": bias - LOA_Z * diff_sd, "loa_upper": bias + LOA_Z * diff_sd}


def _auc_statistics(
    counts: np.ndarray, predictions: np.ndarray, references: np.ndarray, thresholds: tuple[float, ...]
) -> dict[str, np.ndarray]:
    """`auc_ef_below_<t>` for each threshold and weighted copy: rank-based (Mann–Whitney), score = -prediction.

    U = (sum of the positives' ranks) - n_pos (n_pos + 1) / 2, ranks ascending in score with ties at their
    mid-rank. A video drawn k times is k tied copies, so the mid-ranks of each group of equal predictions
    follow from the group totals of `counts`; they do not depend on the threshold.
    """
    if not thresholds:
        return {}
    n = counts.shape[1]
    order = np.argsort(-predictions, kind="stable")  # ascending score
    sorted_predictions = predictions[order]
    new_group = np.r_[True, sorted_predictions[1:] != sorted_predictions[:-1]]
    group_starts = np.flatnonzero(new_group)
    group_of = np.cumsum(new_group) - 1  # (n,) group index of each sorted video
    sorted_counts = counts[:, order]  # (B, n)
    group_sizes = np.add.reduceat(sorted_counts, group_starts, axis=1)  # (B, G)
    mid_ranks = np.cumsum(group_sizes, axis=1) - (group_sizes - 1) / 2  # (B, G)
    weighted_ranks = sorted_counts * mid_ranks[:, group_of]  # (B, n)
    stats = {}
    for threshold in thresholds:
        positive = (references[order] < threshold).astype(np.float64)
        n_pos = sorted_counts @ positive  # (B,)
        u_statistic = weighted_ranks @ positive - n_pos * (n_pos + 1) / 2
        pairs = n_pos * (n - n_pos)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[_auc_key(threshold)] = np.where(pairs > 0, u_statistic / pairs, np.nan)
    return stats


def _bootstrap_counts(rng: np.random.Generator, num_resamples: int, n: int) -> np.ndarray:
    """(num_resamples, n) multiplicities of n videos drawn with replacement, as float64 for BLAS."""
    indices = rng.integers(0, n, size=(num_resamples, n))  # same draws as EchoNet's per-resample choice
    flat = (indices + n * np.arange(num_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=num_resamples * n).reshape(num_resamples, n).astype(np.float64)


def compute_ef_metrics(
    predictions: Sequence[float] | np.ndarray,
    references: Sequence[float] | np.ndarray,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    bootstrap: int = 0,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """EF regression, agreement and reduced-EF detection metrics, with optional bootstrap intervals.

    Definitions (see the module docstring for every output key):

    - `r2` is the coefficient of determination exactly as `sklearn.metrics.r2_score(references,
      predictions)`; `pearson_r2` is the squared Pearson correlation that EchoNet-Dynamic reports.
    - `bias`, `diff_sd`, `loa_lower`, `loa_upper` follow Bland & Altman (Lancet 1986): differences are
      prediction - reference, the SD uses ddof=1, the limits are bias ∓ 1.96 SD.
    - `auc_ef_below_<t>`: the positive class is reference < t; the score is -prediction. The AUC is
      the Mann–Whitney U statistic / (n_pos * n_neg), ties counted one half (Hanley & McNeil 1982),
      as `sklearn.metrics.roc_auc_score(references < t, -predictions)`.
    - Intervals: percentile bootstrap over `bootstrap` resamples of the videos with replacement
      (EchoNet-Dynamic uses 10,000), drawn by `numpy.random.default_rng(seed)`; the same seed gives
      the same intervals. Resamples in which a statistic is undefined (e.g. a single class for an
      AUC) are left out of its interval, with a warning.

    Args:
        predictions: predicted EF (%) per video; shape (n,) or regression logits (n, 1).
        references: reference EF (%) per video, same length.
        thresholds: EF thresholds (%) for the reduced-EF AUCs.
        bootstrap: number of bootstrap resamples; 0 computes point estimates only.
        seed: seed for the resampling Generator.
        confidence: coverage of the two-sided percentile intervals, in (0, 1).

    Returns:
        A flat dict of Python floats (`n`, `bootstrap` are ints); NaN marks an undefined statistic.

    Raises:
        ValueError: non-numeric, non-finite or mis-shaped inputs, different lengths, fewer than two
            videos, repeated or non-finite thresholds, a negative `bootstrap`, `confidence` outside (0, 1).
    """
    predictions, references = _ef_pair(predictions, references)
    n = predictions.size
    if n < 2:
        raise ValueError(f"EF metrics need at least 2 videos (a standard deviation needs two), got {n}")
    thresholds = _thresholds_tuple(thresholds)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"`bootstrap` must be a non-negative number of resamples, got {bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), e.g. 0.95, got {confidence!r}")

    point = _weighted_statistics(np.ones((1, n)), predictions, references, thresholds)
    results: dict[str, float | int] = {"n": int(n)}
    results.update({key: float(value[0]) for key, value in point.items()})
    _warn_undefined(predictions, references, thresholds, results)

    if bootstrap:
        results.update(_bootstrap_intervals(predictions, references, thresholds, results, bootstrap, seed, confidence))
    return results


def _ef_pair(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 EF vectors of the same length (see `_as_ef_vector`)."""
    predictions = _as_ef_vector(predictions, "predictions")
    references = _as_ef_vector(references, "references")
    if predictions.shape != references.shape:
        raise ValueError(
            f"`predictions` and `references` must have the same length, got {predictions.size} and {references.size}"
        )
    return predictions, references


def _bootstrap_intervals(
    predictions: np.ndarray,
    references: np.ndarray,
    thresholds: tuple[float, ...],
    point: dict[str, float],
    bootstrap: int,
    seed: int | None,
    confidence: float,
) -> dict[str, float | int]:
    """`<key>_ci_low` / `<key>_ci_high` for every statistic of `point`, plus `bootstrap` and `confidence`.

    Resamples are drawn in chunks of about `_BOOTSTRAP_CHUNK_CELLS` cells; a statistic undefined in some
    resamples (but not in `point`) gets its interval from the others, with a warning.
    """
    n = predictions.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, bootstrap, chunk):
        counts = _bootstrap_counts(rng, min(chunk, bootstrap - start), n)
        parts.append(_weighted_statistics(counts, predictions, references, thresholds))
    alpha = 1.0 - confidence
    intervals: dict[str, float | int] = {}
    for key in parts[0]:
        samples = np.concatenate([part[key] for part in parts])
        defined = samples[~np.isnan(samples)]
        if defined.size == 0:
            low = high = float("nan")
        else:
            if defined.size < samples.size and not np.isnan(point[key]):
                warnings.warn(
                    f"{key} is undefined in {samples.size - defined.size} of {samples.size} bootstrap resamples; "
                    "its interval uses the others.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            low, high = np.percentile(defined, [100.0 * alpha / 2, 100.0 * (1.0 - alpha / 2)])
        intervals[f"{key}_ci_low"] = float(low)
        intervals[f"{key}_ci_high"] = float(high)
    return {**intervals, "bootstrap": int(bootstrap), "confidence": float(confidence)}


# What `evaluate.py` and `finetune.py` record of `check_against_mean_predictor`'s verdict beside the metrics: the
# verdict, its reason, and its evidence (the gain over the mean predictor with its interval, the spreads), so a run
# that passes shows by how much, not only that it did.
VERDICT_KEYS = (
    "learned_ef",
    "failure",
    "mean_predictor",
    "mae_gain",
    "mae_gain_interval",
    "prediction_sd",
    "label_sd",
)


def check_against_mean_predictor(
    predictions: Sequence[float] | np.ndarray,
    references: Sequence[float] | np.ndarray,
    train_mean: float,
    min_spread: float = 0.1,
    num_bootstrap: int = 2000,
) -> dict[str, Any]:
    """Has an EF model learned anything? Its predictions against the mean predictor, the trivial baseline that
    gives every video the training split's mean EF (`train_mean`).

    Two failures, either one enough:

    - *collapsed to a constant*: the predictions' SD is below `min_spread` × the references' SD. A regression head
      that learns nothing settles on the training mean; best-by-validation selection then happily keeps it.
    - *does not beat the mean predictor*: the model's MAE is not below the mean predictor's on the same videos
      beyond chance. The per-video gain (the mean predictor's absolute error minus the model's) is resampled over
      videos (`num_bootstrap` paired resamples, seeded, so the verdict is reproducible); the model beats the mean
      predictor only when the 95 % interval of the mean gain lies above 0. On a 30-video test split an MAE a few
      tenths below the mean predictor's is noise, not learning.

    The bar is only as high as `train_mean` is close to the evaluated split's mean. With a handful of training
    labels it can be several EF points off (9 phantom videos: 58.7 % against a test mean of 54.0 %), and the mean
    predictor is then a weaker baseline than at full labels; compare runs with the same labelled subset, whose
    mean predictor is the same.

    Returns a dict of JSON-ready values: `learned_ef` (bool), `failure` (the reason(s) in words, None when it
    learned), `collapsed`, `beats_mean_predictor`, `mae`, `mae_gain` (mean predictor's MAE minus the model's),
    `mae_gain_interval` ([low, high], 95 %), `prediction_sd`, `label_sd` (both ddof=0, EF points), `min_spread`,
    and `mean_predictor` {`ef`, `mae`, `rmse`, `r2`} (R² as `compute_ef_metrics`: ≤ 0 unless the split's mean
    equals `train_mean`).
    """
    predictions, references = _ef_pair(predictions, references)
    if predictions.size < 2:
        raise ValueError(f"A spread needs at least 2 videos, got {predictions.size}")
    if not np.isfinite(train_mean):
        raise ValueError(f"`train_mean` must be the training split's mean EF in %, got {train_mean!r}")
    if not min_spread >= 0:
        raise ValueError(
            f"`min_spread` must be a non-negative fraction of the label SD (e.g. 0.1), got {min_spread!r}"
        )

    baseline_error = references - train_mean
    ss_tot = float(np.sum((references - references.mean()) ** 2))
    ss_res = float(np.sum(baseline_error**2))
    mean_predictor = {
        "ef": float(train_mean),
        "mae": float(np.abs(baseline_error).mean()),
        "rmse": float(np.sqrt(np.mean(baseline_error**2))),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0),  # sklearn's convention when constant
    }
    errors = np.abs(predictions - references)
    mae = float(errors.mean())
    prediction_sd, label_sd = float(predictions.std()), float(references.std())
    collapsed = prediction_sd < min_spread * label_sd
    gains = np.abs(baseline_error) - errors  # per video: how much closer the model is than the mean predictor
    counts = _bootstrap_counts(np.random.default_rng(0), num_bootstrap, gains.size)  # the metrics' resampling
    low, high = (float(v) for v in np.percentile(counts @ gains / gains.size, [2.5, 97.5]))
    beats = mae < mean_predictor["mae"] and low > 0
    reasons = []
    if collapsed:
        reasons.append(
            f"collapsed to a constant: its predictions vary by SD {prediction_sd:.2f} EF points, "
            f"{prediction_sd / label_sd:.3f} x the label SD {label_sd:.2f} (less than {min_spread:g} x)"
        )
    if not beats:
        reasons.append(
            f"does not beat the mean predictor: MAE {mae:.2f} vs {mean_predictor['mae']:.2f} for predicting the "
            f"training mean EF {train_mean:.1f} % for every video (gain {mean_predictor['mae'] - mae:.2f}, 95 % "
            f"bootstrap interval over the {references.size} videos {low:.2f} to {high:.2f}: not above 0)"
        )
    return {
        "learned_ef": not reasons, "failure": "; ".join(reasons) or None, "collapsed": bool(collapsed),
        "beats_mean_predictor": bool(beats), "mae": mae, "mae_gain": mean_predictor["mae"] - mae,
        "mae_gain_interval": [low, high], "prediction_sd": prediction_sd, "label_sd": label_sd,
        "min_spread": float(min_spread), "mean_predictor": mean_predictor,
    }  # fmt: skip


def permutation_test(
    candidate: Sequence[float], reference: Sequence[float], max_splits: int = 200_000, seed: int = 0
) -> dict[str, Any]:
    """Is `candidate`'s mean lower than `reference`'s beyond chance? A one-sided permutation test of two groups of
    independent runs (one value each, e.g. test MAE per fine-tuning seed, lower better), for the few runs a seed
    spread is measured with, where no distribution can be assumed.

    The statistic is mean(reference) - mean(candidate); the p-value is the share of the ways of splitting the
    pooled values into groups of the same sizes whose statistic is at least the one observed. With up to
    `max_splits` ways every one is counted (exact); with more, `max_splits` random splits are drawn (numpy seeded
    with `seed`) and p = (1 + count) / (1 + draws), so it never reads 0. A group's values must come from
    independent draws: runs that share a pretraining build share its draw, so compare the builds' means, not their
    runs (`nested_spread`).

    Returns `difference` (mean(reference) - mean(candidate): > 0 when the candidate is lower), `p_value`, `splits`
    (the splits counted), `exact`, and `least_p`, the smallest p-value these group sizes can reach exactly (1 /
    the number of splits): with three runs a side no difference, however large, gets p below 0.05.
    """
    candidate = np.asarray(candidate, dtype=float).ravel()
    reference = np.asarray(reference, dtype=float).ravel()
    if candidate.size < 1 or reference.size < 1 or not (np.isfinite(candidate).all() and np.isfinite(reference).all()):
        raise ValueError(
            f"a permutation test needs at least one finite value a group, got {candidate.tolist()} and "
            f"{reference.tolist()}"
        )
    pooled = np.concatenate([candidate, reference])
    n, k = pooled.size, candidate.size
    total = math.comb(n, k)
    observed = reference.mean() - candidate.mean()
    tolerance = 1e-9 * max(1.0, float(np.abs(pooled).max()))  # equal differences summed in another order count
    if total <= max_splits:
        chosen = np.zeros((total, n), dtype=bool)
        for row, idx in enumerate(itertools.combinations(range(n), k)):
            chosen[row, list(idx)] = True
        exact, splits = True, total
    else:
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((max_splits, n)), axis=1)[:, :k]
        chosen = np.zeros((max_splits, n), dtype=bool)
        np.put_along_axis(chosen, order, True, axis=1)
        exact, splits = False, max_splits
    candidate_means = (chosen @ pooled) / k
    reference_means = ((~chosen) @ pooled) / (n - k)
    count = int(np.count_nonzero(reference_means - candidate_means >= observed - tolerance))
    p_value = count / splits if exact else (1 + count) / (1 + splits)
    return {
        "difference": float(observed), "p_value": float(p_value), "splits": int(splits), "exact": exact,
        "least_p": 1.0 / total,
    }  # fmt: skip


def nested_spread(groups: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How runs spread when they come in groups that share a draw (fine-tuning seeds of one pretraining build):
    the mean and SD over every run, each group's mean, the SD of those means (how far the draw the groups share
    moves a run) and the pooled SD within a group (how far the seed moves it). SDs are ddof=1, NaN where undefined
    (one group; groups of one run)."""
    groups = [np.asarray(g, dtype=float).ravel() for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("every group needs at least one value")
    values = np.concatenate(groups)
    means = np.array([g.mean() for g in groups])
    dof = sum(g.size - 1 for g in groups)
    within = math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof) if dof else math.nan
    return {
        "mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
        "runs": int(values.size), "group_means": [float(m) for m in means],
        "between_std": float(means.std(ddof=1)) if means.size > 1 else math.nan, "within_std": within,
    }  # fmt: skip


def _warn_undefined(
    predictions: np.ndarray, references: np.ndarray, thresholds: tuple[float, ...], results: dict[str, float]
) -> None:
    """One warning per undefined (NaN) or conventional point estimate, saying why."""
    for name, values in (("predictions", predictions), ("references", references)):
        if np.ptp(values) == 0:
            warnings.warn(
                f"All {name} equal {values[0]:g}: the Pearson correlation is undefined, pearson_r and pearson_r2 are NaN.",
                RuntimeWarning,
                stacklevel=3,
            )
    if np.ptp(references) == 0:
        warnings.warn(
            f"All references equal {references[0]:g}: R² is undefined; r2 = {results['r2']:g} as sklearn's r2_score "
            "(1.0 for a perfect fit, else 0.0).",
            RuntimeWarning,
            stacklevel=3,
        )
    zeros = int(np.sum(references == 0))
    if zeros:
        warnings.warn(f"{zeros} reference(s) are 0 % EF: mape is undefined (NaN).", RuntimeWarning, stacklevel=3)
    for threshold in thresholds:
        n_positive = int(np.sum(references < threshold))
        if n_positive in (0, references.size):
            side = "below" if n_positive else "at or above"
            warnings.warn(
                f"All {references.size} references are {side} {threshold:g} %: a single class, so "
                f"{_auc_key(threshold)} is undefined (NaN).",
                RuntimeWarning,
                stacklevel=3,
            )


def _metric_class() -> type:
    """Build the `evaluate.Metric` subclass on first use.

    `evaluate` is imported here, not at module import: running `python scripts/evaluate.py` puts `scripts/`
    first on `sys.path`, where a module-level `import evaluate` would find that script instead of the package.
    Scripts that only compute metrics (`compute_ef_metrics`) never import the package at all.
    """
    import evaluate

    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
    class EFMetrics(evaluate.Metric):
        """`evaluate.Metric` for EF regression; `compute` forwards its keyword arguments to `compute_ef_metrics`."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                # float64 so stored values round-trip exactly and match `compute_ef_metrics` on the same input.
                features=datasets.Features(
                    {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
                ),
                reference_urls=[
                    "https://github.com/echonet/dynamic",
                    "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.r2_score.html",
                ],
            )

        def _compute(
            self,
            predictions: Sequence[float],
            references: Sequence[float],
            thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
            bootstrap: int = 0,
            seed: int | None = 0,
            confidence: float = 0.95,
        ) -> dict[str, float]:
            return compute_ef_metrics(
                predictions, references, thresholds=thresholds, bootstrap=bootstrap, seed=seed, confidence=confidence
            )

    return EFMetrics


def _ef_metrics_class() -> type:
    if "EFMetrics" not in globals():  # built once, then an ordinary module attribute
        globals()["EFMetrics"] = _metric_class()
    return globals()["EFMetrics"]


def __getattr__(name: str):
    # `from metrics_echoai import EFMetrics` builds the class on first access (PEP 562).
    if name == "EFMetrics":
        return _ef_metrics_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ef_metric(**kwargs: Any):
    """The EF metric as an `evaluate.Metric`, without a path and without the network.

    Equivalent to `evaluate.load("<repo>/metrics/ef_metrics", **kwargs)`: `kwargs` are the
    `evaluate.EvaluationModule` arguments (`experiment_id`, `num_process`, `process_id`,
    `keep_in_memory`, `cache_dir`, ...).
    """
    return _ef_metrics_class()(**kwargs)
