"""Tests for the EF metrics (`metrics_echoai`) and their local `evaluate` module (`metrics/ef_metrics`)."""

import itertools
import json
import math
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from metrics_echoai import (
    EFMetrics,
    check_against_mean_predictor,
    compute_ef_metrics,
    load_ef_metric,
    nested_spread,
    permutation_test,
)


METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "ef_metrics"

# The example worked by hand below: differences d = p - r = [-5, 2, -5, 5].
PREDICTIONS = [50.0, 60.0, 30.0, 45.0]
REFERENCES = [55.0, 58.0, 35.0, 40.0]


def _nan_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _echo_like(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference EF spread like EchoNet-Dynamic's, predictions with noise, rounded to make ties."""
    rng = np.random.default_rng(seed)
    references = np.clip(rng.normal(55, 12, n), 8, 90).round(1)
    predictions = (references + rng.normal(1, 5, n)).round(0)
    return predictions, references


def _pairwise_auc(predictions: np.ndarray, references: np.ndarray, threshold: float) -> float:
    """Brute-force AUC over all (positive, negative) pairs: 1 if the positive's prediction is lower, 1/2 if tied."""
    positive = references < threshold
    p_pos, p_neg = predictions[positive][:, None], predictions[~positive][None, :]
    return float(np.mean((p_pos < p_neg) + 0.5 * (p_pos == p_neg)))


def test_hand_computed_example():
    with pytest.warns(RuntimeWarning, match="auc_ef_below_35"):
        results = compute_ef_metrics(PREDICTIONS, REFERENCES)
    # MAE = (5 + 2 + 5 + 5) / 4; MSE = (25 + 4 + 25 + 25) / 4 = 19.75.
    assert results["mae"] == pytest.approx(4.25, rel=1e-12)
    assert results["rmse"] == pytest.approx(4.444097208657794, rel=1e-12)  # sqrt(19.75)
    # mean(r) = 47, SS_tot = 8² + 11² + 12² + 7² = 378, SS_res = 79: R² = 1 - 79 / 378 = 299 / 378.
    assert results["r2"] == pytest.approx(0.7910052910052910, rel=1e-12)
    # p - mean(p) = [3.75, 13.75, -16.25, -1.25], r - mean(r) = [8, 11, -12, -7]:
    # cross sum 385, sums of squares 468.75 and 378; r = 385 / sqrt(468.75 * 378).
    assert results["pearson_r"] == pytest.approx(0.9146273612114080, rel=1e-12)
    assert results["pearson_r2"] == pytest.approx(0.8365432098765432, rel=1e-12)  # 148225 / 177187.5
    # MAPE = 100 / 4 * (5/55 + 2/58 + 5/35 + 5/40).
    assert results["mape"] == pytest.approx(9.831224809673085, rel=1e-12)
    # bias = -3 / 4; SD² = (4.25² + 2.75² + 4.25² + 5.75²) / 3 = 76.75 / 3; LoA = -0.75 ∓ 1.96 SD.
    assert results["bias"] == pytest.approx(-0.75, rel=1e-12)
    assert results["diff_sd"] == pytest.approx(5.057996968497839, rel=1e-12)
    assert results["loa_lower"] == pytest.approx(-10.66367405825576, rel=1e-12)
    assert results["loa_upper"] == pytest.approx(9.163674058255764, rel=1e-12)
    # Reduced EF at 40 %: one positive (ref 35, pred 30) below every negative's prediction; at 45 and
    # 50 %: positives predicted 30 and 45, negatives 50 and 60. No reference is below 35 %.
    assert results["auc_ef_below_40"] == results["auc_ef_below_45"] == results["auc_ef_below_50"] == 1.0
    assert math.isnan(results["auc_ef_below_35"])
    assert results["n"] == 4


def test_matches_independent_formulas():
    predictions, references = _echo_like()
    results = compute_ef_metrics(predictions, references, thresholds=(35, 40, 45, 50, 57.5))
    diff = predictions - references
    r2 = 1 - np.sum(diff**2) / np.sum((references - references.mean()) ** 2)  # sklearn r2_score's definition
    pearson = np.corrcoef(predictions, references)[0, 1]
    expected = {
        "mae": np.mean(np.abs(diff)),
        "rmse": np.sqrt(np.mean(diff**2)),
        "mape": 100 * np.mean(np.abs(diff) / references),
        "r2": r2,
        "pearson_r": pearson,
        "pearson_r2": pearson**2,
        "bias": diff.mean(),
        "diff_sd": diff.std(ddof=1),
        "loa_lower": diff.mean() - 1.96 * diff.std(ddof=1),
        "loa_upper": diff.mean() + 1.96 * diff.std(ddof=1),
    }
    for threshold in (35, 40, 45, 50, 57.5):
        expected[f"auc_ef_below_{threshold:g}"] = _pairwise_auc(predictions, references, threshold)
    assert set(results) == set(expected) | {"n"}
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert results["r2"] != pytest.approx(results["pearson_r2"], abs=1e-3)  # a biased model: they differ


def test_auc_counts_ties_as_one_half():
    # Positives (ref < 50): preds 30, 40. Negatives: preds 40, 50, 35. Pairs won: 30 beats all three,
    # 40 ties 40 (1/2), beats 50, loses to 35: (3 + 1.5) / 6.
    results = compute_ef_metrics([30, 40, 40, 50, 35], [30, 45, 60, 70, 50], thresholds=[50])
    assert results["auc_ef_below_50"] == 0.75
    # Identical predictions carry no ranking information: every pair is a tie.
    with pytest.warns(RuntimeWarning, match="Pearson"):
        tied = compute_ef_metrics([45, 45, 45, 45], [30, 60, 35, 70], thresholds=[50])
    assert tied["auc_ef_below_50"] == 0.5


def test_outputs_are_plain_json_numbers():
    predictions, references = _echo_like(50)
    results = compute_ef_metrics(predictions, references, thresholds=(45, 50, 55), bootstrap=20)
    assert all(type(value) in (float, int) for value in results.values())
    assert json.loads(json.dumps(results)) == results
    assert results["bootstrap"] == 20 and results["confidence"] == 0.95


def test_bootstrap_intervals_contain_estimate_and_are_reproducible():
    predictions, references = _echo_like()
    results = compute_ef_metrics(predictions, references, bootstrap=500, seed=3)
    for key in ("mae", "rmse", "r2", "pearson_r", "bias", "loa_lower", "auc_ef_below_40"):
        assert results[f"{key}_ci_low"] <= results[key] <= results[f"{key}_ci_high"], key
        assert results[f"{key}_ci_low"] < results[f"{key}_ci_high"], key
    assert compute_ef_metrics(predictions, references, bootstrap=500, seed=3) == results
    assert compute_ef_metrics(predictions, references, bootstrap=500, seed=4) != results
    narrow = compute_ef_metrics(predictions, references, bootstrap=500, seed=3, confidence=0.5)
    assert results["mae_ci_low"] < narrow["mae_ci_low"] < narrow["mae_ci_high"] < results["mae_ci_high"]


def test_bootstrap_equals_resampling_loop():
    """The vectorised resamples are EchoNet's loop `func(a[ind], b[ind])`, with the same draws."""
    predictions, references = _echo_like(120, seed=1)
    num_resamples, seed = 200, 7
    kwargs = {"thresholds": (45, 50, 55)}  # thresholds every resample of 120 videos straddles
    results = compute_ef_metrics(predictions, references, bootstrap=num_resamples, seed=seed, **kwargs)
    rng = np.random.default_rng(seed)
    loop = []
    for _ in range(num_resamples):
        index = rng.integers(0, len(predictions), size=len(predictions))
        loop.append(compute_ef_metrics(predictions[index], references[index], **kwargs))
    for key in ("mae", "rmse", "mape", "r2", "pearson_r2", "bias", "loa_upper", "auc_ef_below_50"):
        low, high = np.percentile([sample[key] for sample in loop], [2.5, 97.5])
        assert results[f"{key}_ci_low"] == pytest.approx(low, rel=1e-10), key
        assert results[f"{key}_ci_high"] == pytest.approx(high, rel=1e-10), key


def test_bootstrap_of_a_test_split_is_fast():
    predictions, references = _echo_like(1277)  # EchoNet-Dynamic's test split
    start = time.perf_counter()
    compute_ef_metrics(predictions, references, bootstrap=10_000)
    assert time.perf_counter() - start < 15  # about 2 s on 2 cores; a Python loop takes minutes


def test_bootstrap_skips_resamples_without_both_classes():
    predictions, references = _echo_like(30)
    references[0], predictions[0] = 20.0, 25.0  # the only video below 35 %
    references[1:] = np.maximum(references[1:], 35.0)
    with pytest.warns(RuntimeWarning, match="auc_ef_below_35 is undefined in .* bootstrap resamples"):
        results = compute_ef_metrics(predictions, references, thresholds=[35], bootstrap=200)
    assert results["auc_ef_below_35_ci_low"] <= results["auc_ef_below_35"] <= results["auc_ef_below_35_ci_high"]


# --------------------------------------------------------------------------------------------------
# The mean-predictor check: did an EF model learn anything?
# --------------------------------------------------------------------------------------------------


def test_mean_predictor_check_fires_on_a_model_collapsed_to_a_constant():
    _, references = _echo_like()
    train_mean = 54.0
    # A head stuck at the training mean, wobbling by a fraction of an EF point (the 0.1-0.3).
    stuck = train_mean + np.random.default_rng(0).normal(0, 0.3, references.size)
    check = check_against_mean_predictor(stuck, references, train_mean)
    assert not check["learned_ef"] and check["collapsed"]
    assert check["failure"].startswith("collapsed to a constant")
    assert check["prediction_sd"] < 0.1 * check["label_sd"]
    exact = check_against_mean_predictor(np.full_like(references, train_mean), references, train_mean)
    assert exact["collapsed"] and not exact["beats_mean_predictor"]  # equal MAE is not "below"
    assert "collapsed to a constant" in exact["failure"] and "does not beat the mean predictor" in exact["failure"]


def test_mean_predictor_check_fires_on_a_spread_out_model_worse_than_the_mean():
    predictions, references = _echo_like()
    shuffled = np.random.default_rng(1).permutation(predictions)  # the right spread, no relation to the videos
    check = check_against_mean_predictor(shuffled, references, references.mean())
    assert not check["learned_ef"] and not check["collapsed"] and not check["beats_mean_predictor"]
    assert check["failure"].startswith("does not beat the mean predictor")
    assert check["mae"] > check["mean_predictor"]["mae"]


def test_mean_predictor_check_needs_a_gain_beyond_chance():
    """A model a few tenths of an EF point ahead of the mean predictor on 30 videos has not shown that it learned
    EF: the gain's bootstrap interval straddles 0. A real gain on many videos is beyond chance."""
    rng = np.random.default_rng(3)
    references = rng.normal(55, 10, 30)
    train_mean = 55.0
    # Predictions spread like a model's, only slightly pulled toward the truth: MAE a little below the mean's.
    noisy = train_mean + 0.1 * (references - train_mean) + rng.normal(0, 5, references.size)
    check = check_against_mean_predictor(noisy, references, train_mean)
    assert 0 < check["mae_gain"] < 1.5 and not check["collapsed"]
    low, high = check["mae_gain_interval"]
    assert low < 0 < high and low < check["mae_gain"] < high
    assert not check["beats_mean_predictor"] and not check["learned_ef"]
    assert "95 % bootstrap interval over the 30 videos" in check["failure"]
    assert check_against_mean_predictor(noisy, references, train_mean) == check  # seeded: the same verdict
    many = rng.normal(55, 10, 3000)  # a model with a real gain of about 2 EF points, on many videos
    better = train_mean + 0.3 * (many - train_mean) + rng.normal(0, 3, many.size)
    large = check_against_mean_predictor(better, many, train_mean)
    assert large["mae_gain_interval"][0] > 0 and large["learned_ef"]


def test_mean_predictor_check_is_silent_on_a_good_model_and_scores_the_mean_predictor():
    predictions, references = _echo_like()
    train_mean = 53.0
    check = check_against_mean_predictor(predictions, references, train_mean, min_spread=0.1)
    assert check["learned_ef"] and check["failure"] is None
    assert check["beats_mean_predictor"] and not check["collapsed"]
    baseline = check["mean_predictor"]
    assert baseline["ef"] == train_mean
    assert baseline["mae"] == pytest.approx(np.abs(references - train_mean).mean())
    assert baseline["rmse"] == pytest.approx(np.sqrt(np.mean((references - train_mean) ** 2)))
    with pytest.warns(RuntimeWarning, match="All predictions equal"):  # R² as compute_ef_metrics scores it
        expected = compute_ef_metrics(np.full_like(references, train_mean), references, thresholds=())
    assert baseline["r2"] == pytest.approx(expected["r2"]) and baseline["r2"] <= 0
    assert check["mae"] == pytest.approx(compute_ef_metrics(predictions, references)["mae"])
    assert json.loads(json.dumps(check)) == check  # goes into all_results.json and metrics.json as is


def test_mean_predictor_check_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same length"):
        check_against_mean_predictor([50, 60, 70], [50, 60], 55)
    with pytest.raises(ValueError, match="train_mean"):
        check_against_mean_predictor([50, 60], [50, 60], float("nan"))


def test_constant_inputs():
    with pytest.warns(RuntimeWarning, match="All predictions equal 50"):
        results = compute_ef_metrics([50, 50, 50], [40, 55, 70], thresholds=[50])
    assert math.isnan(results["pearson_r"]) and math.isnan(results["pearson_r2"])
    # R² stays defined: SS_res = 100 + 25 + 400, SS_tot = 225 + 0 + 225.
    assert results["r2"] == pytest.approx(1 - 525 / 450)
    with pytest.warns(RuntimeWarning, match="All references equal 60") as record:
        imperfect = compute_ef_metrics([58, 61, 60], [60, 60, 60], thresholds=[])
    assert imperfect["r2"] == 0.0  # sklearn's r2_score convention for constant references
    assert len(record) == 2  # Pearson undefined, R² conventional
    with pytest.warns(RuntimeWarning) as record:
        assert compute_ef_metrics([60, 60], [60, 60], thresholds=[])["r2"] == 1.0
    assert [str(w.message).split(":")[0] for w in record] == [
        "All predictions equal 60",
        "All references equal 60",
        "All references equal 60",
    ]
    with warnings.catch_warnings():  # constant bootstrap resamples are possible with 3 videos: no crash
        warnings.simplefilter("ignore")
        compute_ef_metrics([50, 50, 51], [40, 55, 70], bootstrap=100)


def test_single_class_threshold_gives_nan_with_a_note():
    with pytest.warns(RuntimeWarning) as record:
        results = compute_ef_metrics(PREDICTIONS, REFERENCES, thresholds=[35, 60])
    assert [str(w.message) for w in record] == [
        "All 4 references are at or above 35 %: a single class, so auc_ef_below_35 is undefined (NaN).",
        "All 4 references are below 60 %: a single class, so auc_ef_below_60 is undefined (NaN).",
    ]
    assert math.isnan(results["auc_ef_below_35"])
    assert math.isnan(results["auc_ef_below_60"])  # every reference below 60 %


def test_regression_logits_shape_is_accepted():
    column = np.asarray(PREDICTIONS)[:, None]  # (B, 1) as the model returns them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _nan_equal(compute_ef_metrics(column, REFERENCES), compute_ef_metrics(PREDICTIONS, REFERENCES))


@pytest.mark.parametrize(
    ("predictions", "references", "kwargs", "message"),
    [
        ([50, np.nan, 30, np.inf], REFERENCES, {}, r"`predictions` contains 2 non-finite .* at index 1, 3"),
        (PREDICTIONS, [55, 58, -np.inf, 40], {}, r"`references` contains 1 non-finite .* at index 2"),
        (PREDICTIONS, REFERENCES[:3], {}, "same length, got 4 and 3"),
        ([50], [55], {}, "at least 2 videos"),
        ([], [], {}, "at least 2 videos"),
        (np.ones((4, 2)), REFERENCES, {}, r"shape \(4, 2\)"),
        (["fifty", 60, 30, 45], REFERENCES, {}, "must be numeric"),
        (PREDICTIONS, REFERENCES, {"thresholds": [40, 40]}, "must not repeat"),
        (PREDICTIONS, REFERENCES, {"bootstrap": -1}, "non-negative"),
        (PREDICTIONS, REFERENCES, {"confidence": 95}, r"in \(0, 1\)"),
    ],
)
def test_invalid_inputs_raise(predictions, references, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_ef_metrics(predictions, references, **kwargs)


def test_evaluate_load_works_offline_and_matches_the_function(monkeypatch, tmp_path):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"the local metric tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    predictions, references = _echo_like(64)
    kwargs = {"thresholds": (45, 50, 55), "bootstrap": 100, "seed": 1}
    expected = compute_ef_metrics(predictions, references, **kwargs)
    metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    assert isinstance(metric, evaluate.EvaluationModule) and metric.name == "ef_metrics"
    for start in range(0, 64, 16):  # batches as an evaluation loop adds them
        metric.add_batch(predictions=predictions[start : start + 16], references=references[start : start + 16])
    assert metric.compute(**kwargs) == expected

    direct = load_ef_metric(cache_dir=str(tmp_path))
    assert isinstance(direct, EFMetrics)
    assert direct.compute(predictions=predictions, references=references, **kwargs) == expected


# Comparing runs over seeds: the permutation test and the nested spread.


def _brute_force_p(candidate: list[float], reference: list[float]) -> float:
    """The share of the pooled values' splits into groups of the same sizes whose reference-minus-candidate mean
    difference reaches the observed one, counted one split at a time."""
    pooled, k = candidate + reference, len(candidate)
    observed = np.mean(reference) - np.mean(candidate)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), k):
        group = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += np.mean(rest) - np.mean(group) >= observed - 1e-9
        total += 1
    return hits / total


@pytest.mark.parametrize(
    "candidate, reference",
    [
        ([1.0, 2.0], [3.0, 4.0]),  # the lowest split of six: p = 1/6, the least two a side can reach
        ([3.0, 4.0], [1.0, 2.0]),  # the candidate is the higher: p = 1
        ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]),  # no difference at all: every split reaches it
        ([2.35, 2.54, 2.41, 2.55, 2.51, 2.75], [2.93, 2.52, 3.09]),  # six runs against three, with near-ties
        ([4.1, 5.0, 3.9, 4.4], [4.2, 5.1, 4.8, 6.0, 4.9]),
    ],
)
def test_permutation_test_counts_every_split_as_a_brute_force_count_does(candidate, reference):
    result = permutation_test(candidate, reference)
    assert result["exact"] and result["splits"] == math.comb(len(candidate) + len(reference), len(candidate))
    assert result["p_value"] == pytest.approx(_brute_force_p(candidate, reference))
    assert result["difference"] == pytest.approx(np.mean(reference) - np.mean(candidate))
    assert result["least_p"] == pytest.approx(1 / result["splits"]) and result["p_value"] >= result["least_p"]


def test_permutation_test_draws_splits_beyond_max_splits_and_lands_near_the_exact_p():
    rng = np.random.default_rng(3)
    candidate, reference = list(rng.normal(4.0, 1.0, 8)), list(rng.normal(4.8, 1.0, 8))  # 12,870 splits
    exact = permutation_test(candidate, reference)
    drawn = permutation_test(candidate, reference, max_splits=4000, seed=1)
    assert not drawn["exact"] and drawn["splits"] == 4000 and drawn["least_p"] == exact["least_p"]
    assert abs(drawn["p_value"] - exact["p_value"]) < 0.03  # binomial SD at p ≈ 0.1 and 4,000 draws: 0.005
    assert permutation_test(candidate, reference, max_splits=4000, seed=1) == drawn  # seeded
    assert permutation_test([0.0] * 8, [9.0] * 8, max_splits=100)["p_value"] > 0  # (1 + count) / (1 + draws)


@pytest.mark.parametrize("candidate, reference", [([], [1.0]), ([1.0], []), ([1.0, math.nan], [2.0])])
def test_permutation_test_refuses_empty_or_non_finite_groups(candidate, reference):
    with pytest.raises(ValueError, match="at least one finite value"):
        permutation_test(candidate, reference)


def test_nested_spread_splits_the_runs_spread_into_the_groups_means_and_the_seeds_within_them():
    groups = [[2.35, 2.54, 2.41], [2.55, 2.51, 2.75], [2.9]]
    spread = nested_spread(groups)
    values = [v for g in groups for v in g]
    assert spread["runs"] == 7 and spread["mean"] == pytest.approx(np.mean(values))
    assert spread["std"] == pytest.approx(np.std(values, ddof=1))
    assert spread["group_means"] == pytest.approx([np.mean(g) for g in groups])
    assert spread["between_std"] == pytest.approx(np.std([np.mean(g) for g in groups], ddof=1))
    # Pooled within: the squared deviations from each group's own mean over the 2 + 2 + 0 degrees of freedom.
    squares = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups)
    assert spread["within_std"] == pytest.approx(math.sqrt(squares / 4))
    single = nested_spread([[1.0], [2.0]])
    assert math.isnan(single["within_std"]) and single["between_std"] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="at least one value"):
        nested_spread([[1.0], []])
