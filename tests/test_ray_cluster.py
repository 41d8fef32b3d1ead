"""tune_net on a Ray cluster started with `ray start --head`, with token authentication on as Ray 2.60 starts it:
a driver with the token runs a sweep there through --address; one without it gets one line that says what to set.

The head runs on this machine with its own ports, temp dir and token file (never ~/.ray/auth_token), from the
repository root as README's recipe says; its processes are ended by their process group, not by `ray stop`,
which would stop every Ray on the machine.
"""
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
# Two iterations at 128 px without evaluation: each trial reports total_loss once, at its end.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(100,)", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
    "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "CITYSEG.BEST_CHECKPOINT_METRIC", "",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
]  # fmt: skip
SWEEP = {
    "metric": "total_loss",
    "mode": "min",
    "resources": {"cpus_per_trial": 1},
    "space": {"SOLVER.BASE_LR": {"grid": [1.0e-4, 2.0e-4]}},
}


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _end_process_group(pgid, grace_s=2):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # ProcessLookupError once every process of the group has exited
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head(synthetic_datasets_dir, tmp_path_factory):
    """(HOST:PORT, the environment a driver with the cluster's token runs in) of a Ray head on 127.0.0.1."""
    token = tmp_path_factory.mktemp("ray_token") / "auth_token"
    token.write_text(secrets.token_hex(32))
    # Short: Ray's unix sockets live under the temp dir, and their paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayh_")
    with_token = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_TMPDIR": temp_dir,
        "DETECTRON2_DATASETS": str(synthetic_datasets_dir),  # the trials' environment is the head's
    }
    port, client_port, dashboard_port, agent_port = _free_ports(4)
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--temp-dir", temp_dir, "--include-dashboard", "false",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
         "--dashboard-agent-listen-port", str(agent_port), "--disable-usage-stats"],
        cwd=REPO, env=with_token, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = head.communicate(timeout=180)  # `ray start` returns once the head runs
        assert head.returncode == 0, output[-3000:]
        yield f"127.0.0.1:{port}", with_token
    finally:
        _end_process_group(head.pid)  # the head's processes stay in the group of the `ray start` that began them
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_driver_with_the_token_runs_a_sweep_on_the_cluster(ray_head, tmp_path):
    address, with_token = ray_head
    sweep_file = tmp_path / "cluster.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    storage = tmp_path / "sweeps"
    run = subprocess.run(
        [sys.executable, "tools/tune_net.py", "--address", address, "--config-file", QUICKSTART,
         "--sweep", str(sweep_file), "--storage", str(storage), *TINY_OPTS],
        cwd=REPO, env=with_token, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    with open(storage / "cluster" / "trials.json") as f:
        rows = json.load(f)
    assert sorted(row["SOLVER.BASE_LR"] for row in rows) == [1.0e-4, 2.0e-4]
    assert all(row["status"] == "finished" and row["iterations"] == 2 for row in rows)
    assert all(os.path.isfile(os.path.join(row["output_dir"], "model_final.pth")) for row in rows)
    assert (storage / "cluster" / "best_config.yaml").is_file()


def test_a_driver_without_the_token_mode_is_told_what_to_set_in_one_line(ray_head, run_tool, monkeypatch, tmp_path):
    address, _ = ray_head
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    sweep_file = tmp_path / "cluster.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    run = run_tool(
        "tune_net.py", "--address", address, "--config-file", QUICKSTART, "--sweep", sweep_file,
        "--storage", tmp_path / "sweeps", *TINY_OPTS,
    )  # fmt: skip
    assert run.code == 2 and run.error_lines() == [
        f"error: --address {address}: the Ray head wants a token: set RAY_AUTH_MODE=token and copy the head's "
        "~/.ray/auth_token to this machine's ~/.ray/auth_token (or point RAY_AUTH_TOKEN_PATH at a copy, or set "
        "RAY_AUTH_TOKEN)"
    ]
    assert "Traceback" not in run.err and not ray.is_initialized()  # refused before ray.init and its 20 s of retries
