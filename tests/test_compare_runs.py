"""Which weights a run started from (`training_echoai.describe_start`) and how its model card names them, and
`scripts/compare_runs.py`, which groups runs by them to compare fine-tuning arms over seeds and pretraining draws."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from test_modeling import tiny_config
from test_training import load_script

from metrics_echoai import permutation_test
from modeling_echoai import EchoAIForVideoClassification
from training_echoai import describe_start, render_model_card, start_fingerprint


def write_weights(folder: Path, name: str, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    return folder / name


def test_a_local_start_is_named_with_the_sha256_of_its_weights_read_in_name_order(tmp_path):
    single = tmp_path / "single"
    write_weights(single, "model.safetensors", b"build one")
    (single / "config.json").write_text("{}")  # not weights: not hashed
    start = describe_start(str(single))
    assert start == {
        "model_name_or_path": str(single), "sha256": hashlib.sha256(b"build one").hexdigest(), "revision": None
    }  # fmt: skip
    sharded = tmp_path / "sharded"
    write_weights(sharded, "model-00002-of-00002.safetensors", b"second")
    write_weights(sharded, "model-00001-of-00002.safetensors", b"first")
    assert describe_start(str(sharded))["sha256"] == hashlib.sha256(b"firstsecond").hexdigest()
    # Two builds saved under one name are told apart; the scratch start has no record at all.
    write_weights(single, "model.safetensors", b"build two")
    assert describe_start(str(single))["sha256"] != start["sha256"]
    assert describe_start(None) is None and start_fingerprint(None) == "a random initialisation"
    assert start_fingerprint(start) == f"{single} (weights sha256 {start['sha256'][:12]}…)"


def test_a_hub_start_is_read_from_the_cache_with_the_commit_it_resolved(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--echoai--tiny-pretrained"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_weights(repo / "snapshots" / commit, "model.safetensors", b"hub weights")
    start = describe_start("echoai/tiny-pretrained")
    assert start == {
        "model_name_or_path": "echoai/tiny-pretrained", "sha256": hashlib.sha256(b"hub weights").hexdigest(),
        "revision": commit,
    }  # fmt: skip
    # A model the cache does not hold: named, not fingerprinted.
    assert describe_start("echoai/elsewhere") == {
        "model_name_or_path": "echoai/elsewhere", "sha256": None, "revision": None
    }  # fmt: skip


def fake_run(folder: Path, mae: float, start: bytes | None, learned: bool = True, n: int = 30, **extra) -> Path:
    """A fine-tuning output folder as `compare_runs.py` reads it: all_results.json with a test MAE and the start
    the run records (`start`: the start's weights, None for a random initialisation)."""
    folder.mkdir(parents=True)
    record = None
    if start is not None:
        record = {"model_name_or_path": "runs/pretrain", "sha256": hashlib.sha256(start).hexdigest(), "revision": None}
    results = {
        "start": record, "learned_ef": learned,
        "test": {"n": n, "mae": mae, "rmse": mae * 1.25, "label_sd": 10.0, "mean_predictor": {"mae": 8.6, "rmse": 10.8}},
        **extra,
    }  # fmt: skip
    (folder / "all_results.json").write_text(json.dumps(results))
    return folder


def test_compare_runs_tests_an_arm_over_runs_and_over_the_starts_they_share(tmp_path, capsys):
    scratch = [fake_run(tmp_path / f"scratch{i}", mae, None) for i, mae in enumerate([2.93, 2.52, 3.09])]
    builds = {b"build a": [2.35, 2.54, 2.41], b"build b": [2.55, 2.51, 2.75]}
    pretrained = [fake_run(tmp_path / f"{name.decode()}{i}", mae, name)
                  for name, values in builds.items() for i, mae in enumerate(values)]  # fmt: skip
    output = tmp_path / "comparison"
    report = load_script("compare_runs").main(
        ["--arm", "scratch", *map(str, scratch), "--arm", "pretrained", *map(str, pretrained),
         "--output_dir", str(output)]
    )  # fmt: skip
    scratch_arm, pretrained_arm = report["arms"]
    assert not scratch_arm["shared_starts"] and len(scratch_arm["groups"]) == 3  # every random start its own draw
    assert pretrained_arm["shared_starts"] and len(pretrained_arm["groups"]) == 2
    assert pretrained_arm["nested"]["group_means"] == pytest.approx([sum(v) / 3 for v in builds.values()])
    (test,) = report["tests"]
    assert test["runs"] == permutation_test([2.35, 2.54, 2.41, 2.55, 2.51, 2.75], [2.93, 2.52, 3.09])
    assert test["runs"]["p_value"] == pytest.approx(4 / 84)  # six runs counted as six draws
    # Counted as the two draws they are, the builds' means against scratch's three: ten splits, p no lower than 0.1.
    assert test["starts"]["splits"] == 10 and test["starts"]["p_value"] >= 0.1
    printed = capsys.readouterr().out
    assert "| pretrained | 6 | 2.52 ± 0.14 | 0.252 |" in printed and "| 0.33 | 0.048 (84, 0.012) |" in printed
    assert (output / "comparison.md").read_text().strip() == printed.strip()
    assert json.loads((output / "comparison.json").read_text())["tests"][0]["runs"]["splits"] == 84
    assert (output / "comparison.png").stat().st_size > 0


def test_compare_runs_names_the_folder_that_cannot_be_compared(tmp_path, caplog):
    compare = load_script("compare_runs")
    good = fake_run(tmp_path / "good", 2.5, b"build")
    with pytest.raises(compare.RunsError, match="no all_results.json: pass the --output_dir of a finished"):
        compare.main(["--arm", "a", str(good), "--arm", "b", str(tmp_path / "missing")])
    pretraining = tmp_path / "pretraining"
    pretraining.mkdir()
    (pretraining / "all_results.json").write_text(json.dumps({"steps": 10, "last_loss": 0.1}))
    with pytest.raises(compare.RunsError, match="has no test mae: it is not an EF fine-tuning run's results"):
        compare.main(["--arm", "a", str(good), "--arm", "b", str(pretraining)])
    other_corpus = fake_run(tmp_path / "other", 2.5, b"build", n=12)
    with pytest.raises(compare.RunsError, match=r"different numbers of videos \(\[12, 30\]\)"):
        compare.main(["--arm", "a", str(good), "--arm", "b", str(other_corpus)])
    with pytest.raises(SystemExit):  # one run in two arms would count one draw twice
        compare.main(["--arm", "a", str(good), "--arm", "b", str(good)])
    # Results written before runs recorded their start: compared, each run a draw of its own, and said so.
    old = fake_run(tmp_path / "old", 3.0, None)
    results = json.loads((old / "all_results.json").read_text())
    del results["start"]
    (old / "all_results.json").write_text(json.dumps(results))
    report = compare.main(["--arm", "a", str(good), "--arm", "b", str(old), "--metric", "rmse"])
    assert "does not record the checkpoint it started from" in caplog.text
    assert report["arms"][1]["mean"] == pytest.approx(3.75) and math.isnan(report["arms"][1]["std"])
    assert report["tests"][0]["starts"] is None


def test_the_card_names_a_hub_start_as_its_base_model_and_a_folder_only_in_its_table(tmp_path):
    model = EchoAIForVideoClassification(tiny_config(num_labels=1, problem_type="regression"))
    args = load_script("finetune").parse_args(["--model_name_or_path", "echoai/tiny-pretrained", "--output_dir",
                                               str(tmp_path / "run")])  # fmt: skip
    trained = SimpleNamespace(state=SimpleNamespace(global_step=3))
    hub = {"model_name_or_path": "echoai/tiny-pretrained", "sha256": "ab" * 32, "revision": "c" * 40}
    card = render_model_card(model, args, "regression", None, 8, trained, start=hub)
    assert card.data.base_model == "echoai/tiny-pretrained"
    assert f"| start | echoai/tiny-pretrained (weights sha256 {'ab' * 6}…) |" in card.text
    folder = {"model_name_or_path": str(tmp_path), "sha256": "ab" * 32, "revision": None}
    assert render_model_card(model, args, "regression", None, 8, trained, start=folder).data.base_model is None
