"""Every script starts as a user runs it: `python scripts/NAME.py --help` in a fresh interpreter.

In-process tests load scripts by path and would not see import problems of a real run, such as
`scripts/evaluate.py` shadowing the `evaluate` package for every script beside it.
"""

import os
import subprocess
import sys
from pathlib import Path


SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def test_every_script_runs_from_the_command_line():
    assert len(SCRIPTS) >= 7
    processes = {
        script.name: subprocess.Popen(
            [sys.executable, str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for script in SCRIPTS
    }
    failures = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or "usage:" not in out:
            failures[name] = err[-1500:]
    assert not failures, failures


def test_gpu_check_dry_run_prints_its_table(tmp_path_factory):
    """`bench/gpu_check.sh --dry_run`: the GPU check's every row, at tiny shapes on whatever device there is, so
    the command stays working between the runs that have a GPU."""
    from data_fixtures import tiny_corpus

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    corpus = tiny_corpus(tmp_path_factory)
    done = subprocess.run(["bash", str(script), "--dry_run", "--data_dir", str(corpus)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("bf16 matmul peak", "pretraining step: EchoAI", "pretraining step: VideoMAE", "largest EchoAI batch",
                "pretrain.py end to end", "model-only step", "evaluate (all clips"):  # fmt: skip
        assert f"| {row}" in done.stdout, row


def test_bench_pretrain_takes_the_fastest_videomae_as_its_reference():
    """`bench/bench_pretrain.py` compares EchoAI with whichever VideoMAE attention is fastest at each precision,
    and its goal lines say which one that was."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pretrain

    train = {
        "VideoMAE-sdpa fp32": [1.0, 1.0], "VideoMAE-eager fp32": [1.2, 1.2], "EchoAI fp32": [0.9, 1.0],
        "VideoMAE-sdpa bf16": [0.6, 0.6], "VideoMAE-eager bf16": [0.4, 0.4], "EchoAI bf16": [0.2, 0.2],
    }  # fmt: skip
    evaluation = {key: [10 * t for t in times] for key, times in train.items()}
    assert bench_pretrain.fastest_videomae(train, "fp32") == "VideoMAE-sdpa fp32"
    assert bench_pretrain.fastest_videomae(train, "bf16") == "VideoMAE-eager bf16"
    rss = {key: {"peak_mib": 100.0, "min_mib": 90.0, "max_mib": 110.0, "before_mib": 50.0} for key in train}
    peaks = {"fp32": 200.0, "bf16": 900.0}
    lines = bench_pretrain.goals(train, 1e11, evaluation, 1e12, peaks, rss, video_frames=200)
    assert "pretraining bf16, EchoAI / fastest VideoMAE (VideoMAE-eager bf16): 2.00x" in lines[1]
    assert "pretraining fp32, EchoAI / fastest VideoMAE (VideoMAE-sdpa fp32): 1.06x" in lines[0]
    assert any("(goal >= 60 %)" in line for line in lines)
    rows = bench_pretrain.report_rows(train, 1e11, 8, peaks, rss)
    by_key = {f"{row[0]} {row[1]}": row for row in rows}
    assert by_key["VideoMAE-eager bf16"][5] == "1 (ref)"
    assert by_key["VideoMAE-sdpa bf16"][5].startswith("0.67")


def test_bench_pretrain_runs_echoai_with_the_scripts_kernel_and_each_kernel_named(monkeypatch):
    """The row "EchoAI" is the scripts' choice (`perf_echoai.fastest_attention`), the one the goals are checked on;
    `--echoai_attention` adds a row per kernel named, and VideoMAE keeps its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pretrain

    import perf_echoai

    args = bench_pretrain.parse_args(
        ["--quick", "--videomae_attention", "eager", "--echoai_attention", "sdpa", "eager"]
    )
    assert bench_pretrain.contenders(args) == [
        ("VideoMAE-eager", "VideoMAE", "eager"), ("EchoAI", "EchoAI", None),
        ("EchoAI-sdpa", "EchoAI", "sdpa"), ("EchoAI-eager", "EchoAI", "eager"),
    ]  # fmt: skip
    assert bench_pretrain.contenders(args, with_kernels=False)[-1] == ("EchoAI", "EchoAI", None)
    config = bench_pretrain.echoai_config("tiny")
    monkeypatch.setattr(perf_echoai, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(perf_echoai, "half_precision_is_native", lambda precision: True)
    kernels = {
        attention: bench_pretrain.build_classifier("EchoAI", config, "bf16", attention).config._attn_implementation
        for attention in (None, "eager")
    }
    assert kernels == {None: bench_pretrain.CHUNKED_ATTENTION, "eager": "eager"}
    videomae = bench_pretrain.build_pretraining("VideoMAE", config, "bf16", "eager")
    assert videomae.config._attn_implementation == "eager"


def test_bench_pretrain_profile_accounts_every_operator_once(capsys):
    """`bench/bench_pretrain.py --profile` sorts each profiled operator's self time into one kind: the kinds add
    up to the whole profile, and a real (tiny) profiled step puts time under the linear layers."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pretrain

    per_step = bench_pretrain.time_by_kind({"aten::addmm": 3000.0, "aten::bmm": 1000.0, "aten::index": 2000.0}, 2)
    assert per_step["linear layers (mm, addmm)"] == 1.5
    assert per_step["attention matmuls (bmm)"] == 0.5
    assert per_step["other"] == 1.0
    assert sum(per_step.values()) == 3.0
    parameters = {(64, 32)}
    names = [
        bench_pretrain.copy_name("aten::copy_", [[64, 32], [64, 32]], ["c10::BFloat16", "float"], parameters),
        bench_pretrain.copy_name("aten::copy_", [[8, 32], [8, 32]], ["c10::BFloat16", "float"], parameters),
        bench_pretrain.copy_name("aten::_to_copy", [[8, 32]], ["float"], parameters),
        bench_pretrain.copy_name("aten::copy_", [[8, 32], [8, 32]], ["c10::BFloat16", "c10::BFloat16"], parameters),
        bench_pretrain.copy_name("aten::clone", [[8, 32]], ["float"], parameters),
        bench_pretrain.copy_name("aten::addmm", [[64, 32]], ["float"], parameters),
    ]
    copies = bench_pretrain.time_by_kind(
        dict(zip(names, [2000.0, 1000.0, 500.0, 300.0, 200.0, 100.0], strict=True)), 1
    )
    assert copies["casts and copies of parameter-shaped tensors"] == 2.0
    assert copies["dtype casts of activations"] == 1.5
    assert copies["layout copies of activations"] == 0.5
    assert copies["linear layers (mm, addmm)"] == 0.1

    bench_pretrain.main(["--profile", "--quick", "--preset", "tiny"])
    out = capsys.readouterr().out
    assert "| kind of operator | VideoMAE-eager ms (share) | EchoAI ms (share) |" in out
    linear_row = next(line for line in out.splitlines() if line.startswith("| linear layers"))
    assert all(float(cell.split()[0]) > 0 for cell in linear_row.strip("|").split("|")[1:])
