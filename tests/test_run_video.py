"""End-to-end test of the main job (tools/run_video.py) on the first frames of PETS09-S2L1.

Skipped when the shared video or its ground truth is absent (the job needs both). Runs every method at
one tau on 8 frames (3 of warm-up), so it takes a minute or so on a CPU.
"""
import importlib.util
import json

import pytest
import torch

from blockcopy_core.paths import REPO_ROOT, shared_dir

DATA = shared_dir() / "data" / "pets09_s2l1"


def load_run_video():
    spec = importlib.util.spec_from_file_location("run_video", REPO_ROOT / "tools" / "run_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DATA / "vtest.avi").is_file() or not (DATA / "gt.txt").is_file(),
                    reason="PETS09-S2L1 video or ground truth not in the shared data folder")
def test_main_job_end_to_end(tmp_path, capsys):
    run_video = load_run_video()
    threads = torch.get_num_threads()
    try:
        results = run_video.main(["--frames", "8", "--warmup", "3", "--taus", "0.3", "--vis-frames", "2-8",
                                  "--device", "cpu", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets the thread count
    for name in ("results.json", "accuracy_vs_cost.png", "blockcopy_rl_tau0.3.mp4",
                 "blockcopy_rl_tau0.3_frame.png", "policy_rl_tau0.3.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["evaluated_frames"] == [4, 8]
    methods = [(row["method"], row["tau"]) for row in saved["runs"]]
    assert methods == [("dense", None)] + [(m, 0.3) for m in ("rl", "random", "residual", "lowfps")]
    dense = saved["runs"][0]
    assert dense["executed_fraction"] == 1.0 and dense["agreement_f1"] == 1.0
    for row in saved["runs"]:
        assert row["eval_frames"] == 5
        assert 0.0 <= row["miss_rate"] <= 1.0 and 0.0 <= row["ap50"] <= 1.0
        assert row["gmacs_per_frame"] <= dense["gmacs_per_frame"] + row["policy_gmacs_per_frame"] + 1e-9
    assert saved["runs"][1]["policy_gmacs_per_frame"] > 0
    printed = capsys.readouterr().out
    table_rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == 2 * (1 + len(methods))  # the results table and the timing table
    assert results["table"] in printed and results["timing_table"] in printed
    for row in saved["runs"]:
        times = row["ms_per_frame"]
        assert times["sparse_overhead"] is not None, "on the CPU the engine's work is timed apart"
        assert times["total"] == pytest.approx(sum(value for key, value in times.items() if key != "total"))
    assert saved["runs"][0]["ms_per_frame"]["sparse_overhead"] == 0.0
    assert all(row["ms_per_frame"]["sparse_overhead"] > 0 for row in saved["runs"][1:])


@pytest.mark.skipif(not (DATA / "vtest.avi").is_file(), reason="PETS09-S2L1 video not in the shared data folder")
def test_main_job_without_ground_truth_reports_agreement_only(tmp_path, monkeypatch, capsys):
    run_video = load_run_video()
    monkeypatch.setattr(run_video, "pets09_s2l1_paths", lambda require_ground_truth=True: (DATA / "vtest.avi", None))
    threads = torch.get_num_threads()
    try:
        results = run_video.main(["--frames", "6", "--warmup", "3", "--taus", "0.5", "--methods", "residual",
                                  "--no-video", "--device", "cpu", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert "no ground truth" in capsys.readouterr().err
    assert [row["method"] for row in results["runs"]] == ["dense", "residual"]
    for row in results["runs"]:
        assert row["miss_rate"] is None and row["ap50"] is None and 0.0 <= row["agreement_f1"] <= 1.0
    assert "n/a" in results["table"] and results["config"]["ground_truth"] is None
    assert (tmp_path / "accuracy_vs_cost.png").stat().st_size > 0


def test_visualised_frames_fall_back_to_the_evaluated_ones():
    frames_to_show = load_run_video().frames_to_show
    assert frames_to_show((301, 500), 300, 795) == (301, 500)
    assert frames_to_show((301, 900), 300, 795) == (301, 795)
    assert frames_to_show((301, 500), 60, 120) == (61, 120), "a quick run still gets a video"
    assert frames_to_show((2, 8), 3, 8) == (2, 8)
