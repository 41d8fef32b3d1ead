"""The evaluation and data benchmarks run at toy size and print what their README figures come from: each round,
the median ratios and the load average. Speed itself is never asserted here."""

import re


def test_benchmark_eval_alternates_the_evaluators_and_they_agree(run_tool):
    result = run_tool(
        "benchmark_eval.py", "--images", 2, "--width", 128, "--height", 64, "--predictions", 5, "--rounds", 2
    )
    assert result.code == 0, result.err
    assert "5 predictions per image" in result.out
    assert len(re.findall(r"^round \d: official .* fast cold .*x\), fast warm .*x\)$", result.out, re.M)) == 2
    assert "largest absolute AP difference: 0\n" in result.out
    assert re.search(r"load average before .*\n(.*\n)*load average after", result.out)
    assert re.search(r"median speed ratio \(official / fast\) over 2 rounds: cold [\d.]+x, warm [\d.]+x", result.out)


def test_benchmark_data_alternates_the_loaders(run_tool, synthetic_root):
    result = run_tool("benchmark_data.py", "--root", synthetic_root, "--rounds", 2, "--warm-loads", 1)
    assert result.code == 0, result.err
    assert len(re.findall(r"^round \d: detectron2 .* ours cold .* ours warm .*x\)$", result.out, re.M)) == 2
    instances = re.search(r"6 images, (\d+) instances .*detectron2: (\d+)\)", result.out)
    assert instances and int(instances[1]) > 0
    assert "load average before" in result.out and "load average after" in result.out
    assert re.search(r"median speed ratio \(detectron2 / ours\) over 2 rounds: cold [\d.]+x, warm \d+x", result.out)
