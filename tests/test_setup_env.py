"""The set-up step is idempotent and leaves a working torch and detectron2 alone."""
import os
import subprocess
import sys
from pathlib import Path

import detectron2
import torch

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def _run_setup():
    env = dict(os.environ, VENV=str(VENV))
    return subprocess.run(
        ["bash", "tools/setup_env.sh"], cwd=REPO, env=env, check=True, capture_output=True, text=True
    ).stdout


def test_second_run_is_a_no_op():
    assert (VENV / ".cityseg-d2-setup").exists(), "tests must run in a venv made by tools/setup_env.sh"
    out = _run_setup()
    assert "nothing to do" in out, out


def test_existing_torch_and_detectron2_are_left_alone():
    stamp = VENV / ".cityseg-d2-setup"
    d2_init = Path(detectron2.__file__)
    torch_init = Path(torch.__file__)
    mtimes = (d2_init.stat().st_mtime_ns, torch_init.stat().st_mtime_ns)
    saved = stamp.read_text()
    stamp.unlink()  # forces the full path: checks, then `pip install -e .`
    try:
        out = _run_setup()
    finally:
        if not stamp.exists():
            stamp.write_text(saved)
    assert f"detectron2 {detectron2.__version__} at {detectron2.__path__[0]} found; leaving it as is" in out
    assert out.count("leaving it as is") == 2, out
    assert (d2_init.stat().st_mtime_ns, torch_init.stat().st_mtime_ns) == mtimes
    assert stamp.read_text() == saved
