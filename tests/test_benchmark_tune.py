"""tools/benchmark_tune.py's parts that decide what it reports: a study where ASHA cannot rank trials is refused, and
the CPU-seconds count every process of the session, also those that exited before the count ends. A run of the
benchmark itself takes minutes even at toy size (two arms of at least 8 trials), so none runs here."""
import runpy
import subprocess
import sys
import time

import pytest

benchmark_tune = runpy.run_path("tools/benchmark_tune.py")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grace", "40", "--eval-period", "40"], "error: --grace 40 is within the warm-up (SOLVER.WARMUP_ITERS 50)"),
        (["--grace", "100", "--eval-period", "30"], "error: --grace 100 must be a multiple of --eval-period 30"),
    ],
)
def test_a_study_asha_cannot_rank_is_refused_before_ray_starts(run_tool, args, message):
    run = run_tool("benchmark_tune.py", *args)
    assert run.code == 2 and len(run.error_lines()) == 1 and run.error_lines()[0].startswith(message), run.err


def test_cpu_seconds_count_children_that_exited_before_the_end():
    burn = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass"
    with benchmark_tune["ProcessTreeCPU"](interval=0.1) as cpu:
        subprocess.run([sys.executable, "-c", burn], check=True)
        time.sleep(0.3)  # exited: only the readings taken while it ran remain
    assert 0.8 <= cpu.seconds
