"""The benchmarks' timing helpers: steps taking turns (blockcopy_core.timing) and the Detectron2 stage timer
of tools/benchmark_d2.py, which must leave the model as it was."""
import importlib.util
import json

import pytest
import torch

from blockcopy_core.paths import REPO_ROOT
from blockcopy_core.timing import MeasuredRows, interleaved_step_ms, median_step_ms


def test_interleaved_steps_take_turns_on_each_index():
    calls = []
    medians = interleaved_step_ms({"dense": lambda i: calls.append(("dense", i)),
                                   "sparse": lambda i: calls.append(("sparse", i))}, 3, 5)
    assert calls == [("dense", 5), ("sparse", 5), ("dense", 6), ("sparse", 6), ("dense", 7), ("sparse", 7)]
    assert set(medians) == {"dense", "sparse"} and all(ms >= 0 for ms in medians.values())


def test_benchmark_warms_every_side_up_then_times_them_in_turns():
    spec = importlib.util.spec_from_file_location("benchmark", REPO_ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    medians = bench.interleaved_ms({"dense": lambda i: calls.append(("dense", i)),
                                    "sparse": lambda i: calls.append(("sparse", i))}, frames=2, warmup=1, cuda=False)
    assert calls == [("dense", 0), ("sparse", 0), ("dense", 1), ("sparse", 1), ("dense", 2), ("sparse", 2)]
    assert set(medians) == {"dense", "sparse"}
    assert median_step_ms(lambda i: None, 3, 0) >= 0  # what the benchmark times a single side with


def test_measured_rows_keep_every_finished_tau_on_disk(tmp_path, capsys):
    path = tmp_path / "run.json"
    rows = MeasuredRows(str(path), {"device": "cpu"},
                        lambda rs: "\n".join(f"{r['model']} {tau}" for r in rs for tau in r["blockcopy"]))
    row = {"model": "a", "blockcopy": {0.3: {"ms": 1.0}}}
    rows.measured(row)  # a time limit stopping the run here keeps tau 0.3
    assert json.loads(path.read_text()) == {"environment": {"device": "cpu"},
                                            "results": [{"model": "a", "blockcopy": {"0.3": {"ms": 1.0}}}]}
    row["blockcopy"][0.5] = {"ms": 2.0}
    rows.measured(row)
    assert capsys.readouterr().out.split() == ["a", "0.3", "a", "0.5"]  # only the newest tau each time
    rows.append(row)
    rows.measured({"model": "b", "blockcopy": {0.3: {"ms": 3.0}}})
    results = json.loads(path.read_text())["results"]
    assert [r["model"] for r in results] == ["a", "b"] and list(results[0]["blockcopy"]) == ["0.3", "0.5"]
    assert rows.summary().endswith("a 0.3\na 0.5")  # finished configurations only


def _benchmark_d2():
    pytest.importorskip("detectron2")
    spec = importlib.util.spec_from_file_location("benchmark_d2", REPO_ROOT / "tools" / "benchmark_d2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["maskrcnn", "retinanet"])
def test_stage_timer_times_each_stage_and_restores_the_model(name):
    bench = _benchmark_d2()
    cfg = bench.blockcopy_config(name, 0.3, 128, torch.device("cpu"), False, False)
    torch.manual_seed(0)
    from detectron2.modeling import build_model
    model = build_model(bench.plain_config(cfg)).eval()
    frame = bench.synthetic_video(1, 1, 128, 256)[0].float()
    inputs = bench.batched_inputs(frame, clip=False)
    with torch.no_grad():
        expected = model(inputs)
        with bench.stage_timer(model) as times:
            timed = model(inputs)
        untimed = model(inputs)
    stages = {"maskrcnn": {"preprocess_image", "backbone", "proposal_generator", "roi_heads", "box_pooler",
                           "box_head", "box_predictor", "_forward_box", "mask_pooler", "mask_head", "_forward_mask"},
              "retinanet": {"preprocess_image", "backbone", "head", "forward_inference"}}[name]
    assert set(times) == stages and all(len(v) == 1 and v[0] >= 0 for v in times.values())
    for outputs in (timed, untimed):
        torch.testing.assert_close(outputs[0]["instances"].scores, expected[0]["instances"].scores)
    # nothing of the timer is left on the model: methods and forwards are the classes' own again
    assert "forward" not in vars(model.backbone) and "preprocess_image" not in vars(model)


def test_benchmark_d2_writes_a_tau_before_compiling_its_ceiling():
    """A time limit that stops the ceiling's compilation (it took 20 s per tau on the H200, after minutes of
    warm-up) must not lose the tau's timed figures: ``measured`` sees them first, then again with the ceiling."""
    bench = _benchmark_d2()
    seen = []
    row = bench.measure("retinanet", "fp32", 1, [0.3], 128, 256, frames=1, warmup=2, block=128, ceiling=True,
                        device=torch.device("cpu"), compile_engine=False, fast_loop=False,
                        measured=lambda r: seen.append(json.loads(json.dumps(r["blockcopy"][0.3]))))
    assert len(seen) == 2
    assert "ceiling_ms" not in seen[0] and seen[0]["ms"] > 0 and seen[0]["dense_ms"] > 0
    final = row["blockcopy"][0.3]
    assert seen[1]["ms"] == seen[0]["ms"] == final["ms"] and seen[1]["ceiling_ms"] == final["ceiling_ms"]
    assert seen[1]["ceiling_ms"] > 0 and seen[1]["ceiling_speedup"] == seen[1]["dense_ms"] / seen[1]["ceiling_ms"]
