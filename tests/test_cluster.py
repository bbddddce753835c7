"""A sweep on a real multi-node Ray cluster, started the way a user starts one: ``ray start``.

The head (``ray start --head``) and one worker node (``ray start --address``) run as separate
processes on this machine, 1 CPU each, with Ray 2.60's token authentication on. Ray binds the
machine's own address, not 127.0.0.1, so that is the address the driver is given. Then
``oialr-tune sweep SPACE --address HOST:PORT`` runs as its own process, as on a real cluster.

Isolation from other Ray users of the machine (other tests, other jobs): the cluster gets its own
freshly generated token through ``RAY_AUTH_TOKEN`` (``~/.ray/auth_token``, which every local Ray on
the machine shares, is never written), its own ``--temp-dir`` and explicit free ports, and it is
stopped by signalling exactly the processes it started (each node runs with ``--block`` in its own
process group; its worker processes, which Ray puts in groups of their own, are found as its
descendants), never with the machine-wide ``ray stop``.

Also here: the examples' syntax (the SLURM script and the KubeRay manifest, checked against the real
CLI's flags). `tests/test_sweep.py::test_two_node_cluster_runs_trials_on_both_nodes` covers the
in-process ``ray.cluster_utils`` cluster (and fractional-GPU packing); this file covers the
``ray start`` command line, authentication and the examples.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from tiny_sweep import tiny_space

import oialr_tune.tuning.cluster as cluster_module

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))

SPACE: dict[str, Any] = tiny_space(
    "cluster",
    hidden=[32],
    batch_size=128,
    # Two trials at a time on two 1-CPU nodes: the two running trials are on different nodes.
    budget={"num_samples": 4, "max_epochs": 2, "max_concurrent": 2},
    strategy={"scheduler": "fifo"},
    baseline="none",
)


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports: all bound at once, so the OS cannot hand out one of them twice (one
    socket at a time, a just-released port can come back, and Ray refuses a port given twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or authentication settings, plus `extra`."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` node and everything it started: SIGTERM (Ray's graceful stop),
    then SIGKILL for whatever is left after a few seconds."""
    if proc.poll() is not None:
        return
    pids = _descendants(proc.pid)  # Ray's worker processes sit in process groups of their own
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=8)
    pids += _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _start_node(args: list[str], env: dict[str, str], log: Path, timeout: float = 120) -> subprocess.Popen:
    """``ray start ARGS --block`` in its own process group; returns once the node is up."""
    with log.open("w") as f:
        proc = subprocess.Popen([RAY, "start", *args, "--block"], stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while "will now block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"`ray start {' '.join(args)}` did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A head and a worker node (1 CPU each) with token authentication; yields address, env, token."""
    import ray.util

    ip = ray.util.get_node_ip_address()  # Ray binds this, not 127.0.0.1
    token = secrets.token_hex(32)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]  # fmt: skip
    # Explicit free ports (other Ray instances on this machine use the defaults), all distinct.
    port, *free = _free_ports(1 + 2 * len(names))
    head_ports, worker_ports = free[: len(names)], free[len(names) :]
    common = ["--num-cpus=1", "--disable-usage-stats", f"--node-ip-address={ip}", f"--temp-dir={temp}"]

    def ports(numbers: list[int]) -> list[str]:
        return [f"--{n}={p}" for n, p in zip(names, numbers, strict=True)]

    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(["--head", f"--port={port}", "--include-dashboard=false", *common,
                                  *ports(head_ports)], env, temp / "head.log"))  # fmt: skip
        nodes.append(_start_node([f"--address={ip}:{port}", *common, *ports(worker_ports)], env, temp / "worker.log"))
        yield {"address": f"{ip}:{port}", "env": env, "token": token, "temp": temp}
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def _sweep(tmp_path: Path, address: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cmd = [sys.executable, "-m", "oialr_tune.cli", "sweep", str(space), "--address", address,
           "--results-dir", str(tmp_path / "r"), "--name", "c", "-q"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_sweep_runs_trials_on_both_nodes_of_a_ray_start_cluster(cluster: dict[str, Any], tmp_path: Path) -> None:
    shared_token = Path.home() / ".ray" / "auth_token"
    before = shared_token.read_bytes() if shared_token.exists() else None
    proc = _sweep(tmp_path, cluster["address"], cluster["env"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    df = pd.read_csv(tmp_path / "r" / "c" / "trials.csv")
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"}, df
    assert df["node_id"].nunique() == 2, f"trials ran on {sorted(set(df['node_id']))}"
    # The cluster's own token never touched the token file other local Ray instances share.
    assert (shared_token.read_bytes() if shared_token.exists() else None) == before


# Joining a token-authenticated cluster without its token: Ray's own `ray.init` logs an
# InvalidAuthToken warning per retry and gives up after ~20 s with "Failed to connect"; the CLI must
# say what is wrong, in one line, at once (`oialr_tune.tuning.cluster`, through Ray's private GCS client).


def test_the_private_ray_gcs_client_the_auth_check_uses_is_still_there() -> None:
    """`cluster._ping_gcs` calls ``ray._raylet.InnerGcsClient.standalone(address, cluster_id, timeout_ms)``,
    Ray's private API; when a Ray upgrade moves it, this fails (the sweep itself would silently skip the check)."""
    import inspect

    from ray._raylet import InnerGcsClient
    from ray.exceptions import RpcError

    assert callable(InnerGcsClient.standalone)
    with pytest.raises(RpcError):  # nothing listens there: an RpcError, not another error
        cluster_module._ping_gcs("127.0.0.1:1", timeout_ms=500)
    assert "gcs_address" in inspect.getsource(cluster_module._ping_gcs)
    # The private module whose logger `_internals.quiet_token_setup_warning` silences is still there.
    import importlib.util

    from oialr_tune.tuning._internals import TOKEN_SETUP_LOGGER

    assert importlib.util.find_spec(TOKEN_SETUP_LOGGER) is not None


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        pytest.param("no token mode", {}, id="auth-mode-unset"),
        pytest.param("wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, id="wrong-token"),
    ],
)
def test_joining_without_the_clusters_token_fails_in_one_line(
    cluster: dict[str, Any], tmp_path: Path, case: str, extra: dict[str, str]
) -> None:
    start = time.monotonic()
    proc = _sweep(tmp_path, cluster["address"], _clean_env(**extra), timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("oialr-tune: error: --address: "), proc.stderr[-3000:]
    assert "token" in lines[0] and cluster["address"] in lines[0], lines[0]
    assert seconds < 15, f"{case}: took {seconds:.1f}s"
    assert not (tmp_path / "r").exists(), "nothing may be written for a refused sweep"


# --- the examples ----------------------------------------------------------------------------------


def _cli_args(command: str) -> list[str]:
    """The arguments of the ``oialr-tune`` call in a shell command line (up to a `||`, `&&`, `;` or `|`)."""
    words = shlex.split(command, comments=True)
    words = words[words.index("oialr-tune") + 1 :]
    ends = [i for i, w in enumerate(words) if w in ("||", "&&", ";", "|")]
    return words[: ends[0]] if ends else words


def test_slurm_example_is_valid_bash_and_uses_real_cli_flags() -> None:
    from oialr_tune.cli import build_parser

    script = REPO / "examples" / "slurm" / "sweep.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True)
    text = script.read_text()
    calls = [line for line in text.splitlines() if line.strip().startswith("oialr-tune ")]
    assert calls, "the script runs no oialr-tune command"
    for call in calls:
        args = build_parser().parse_args(_cli_args(call.replace("\\", "")))
        assert args.command == "sweep" and args.address and args.results_dir
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN" in text  # the token reaches every node


def test_kuberay_example_parses_and_uses_real_cli_flags() -> None:
    from oialr_tune.cli import build_parser

    doc = yaml.safe_load((REPO / "examples" / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    cluster_spec = doc["spec"]["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    args = build_parser().parse_args(_cli_args(doc["spec"]["entrypoint"]))
    assert args.command == "sweep" and args.address == "auto" and "://" in args.results_dir
    containers = [cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster_spec["workerGroupSpecs"]
    ]
    assert all(c["image"] for c in containers)
