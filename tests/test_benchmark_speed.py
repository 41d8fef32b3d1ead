"""tools/benchmark_speed.py at toy size on the CPU: both sides run from files on disk, alternately, and the report
and its JSON hold every figure. No speed is asserted (the README's figures come from the tool itself)."""

import json
import math

import pytest

from conftest import run_tool_in_process

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
TOY = [
    "--device", "cpu", "--width", "256", "--height", "128", "--batch", "2", "--iters", "1", "--warmup", "0",
    "--rounds", "2", "--images", "4", "--instances", "3",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST",
    "192", "DATALOADER.NUM_WORKERS", "0", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
]  # fmt: skip


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_benchmark_speed_alternates_stock_and_ours_and_reports_every_figure(mode, tmp_path):
    out = tmp_path / "speed.json"
    result = run_tool_in_process(
        "benchmark_speed.py", "--config-file", QUICKSTART, "--mode", mode, "--data-dir", tmp_path / "data",
        "--json", out, *TOY,
    )  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    assert [line.split(":")[0] for line in result.out.splitlines() if line.startswith("round")] == [
        "round 1",
        "round 2",
    ]
    assert "ratio ours/stock (median of rounds)" in result.out and "load average before" in result.out
    report = json.loads(out.read_text())
    assert report["mode"] == mode and len(report["rounds"]) == 2
    for side in ("stock", "ours"):
        figures = report[side]
        assert figures["img_per_s"] > 0 and figures["s_per_iter"] > 0 and figures["data_time"] >= 0
        assert math.isnan(figures["peak_gib"])  # no GPU
    assert report["median_ratio"] > 0 and "MODEL.ROI_HEADS.NAME" in report["ours_opts"]
    assert len(report["load_average_before"]) == 3


def test_benchmark_speed_refuses_bad_counts_in_one_line(tmp_path):
    result = run_tool_in_process("benchmark_speed.py", "--config-file", QUICKSTART, "--iters", "0", *TOY[:2])
    assert result.code == 2 and result.error_lines() == ["error: --iters and --rounds must be >= 1 and --warmup >= 0"]
