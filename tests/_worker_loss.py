"""Run by tests/test_faults.py in its own process (it needs a Ray cluster of its own, not the session's).

A two-node local cluster (head + one worker node, 1 CPU each) sweeps a small space with
``budget.max_failures: 2``. A watcher thread removes the worker node as soon as (a) at least one trial has
finished and (b) a trial running on the worker node has reported an epoch. The script then prints one JSON
line for the test: the node ids, the trials finished before the removal (with their val_acc), the trials
that were running on the removed node, and where the results are.

Usage: python tests/_worker_loss.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster
from tiny_sweep import tiny_space

from oialr_tune.space import space_from_dict
from oialr_tune.tuning import sweep

EPOCHS = 6
SPACE = tiny_space(
    "worker-loss",
    hidden=[256, 256],
    batch_size=16,  # about 0.3 s per epoch: trials are caught mid-run
    search={"optimizer.lr": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2}},
    budget={"num_samples": 4, "max_epochs": EPOCHS, "max_concurrent": 2, "max_failures": 2},
    strategy={"scheduler": "fifo"},
    checkpoint={"every": 1, "num_to_keep": 1},
    baseline="none",
    seed=0,
)


def results_so_far(exp: Path) -> dict[str, list[dict]]:
    """trial id -> the results it has reported (Ray's result.json), complete lines only."""
    out = {}
    for f in exp.glob("trial_*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def main() -> None:
    root = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    exp = root / "w" / "oialr"
    report: dict = {"head": head_id, "worker": worker_id, "removed": False, "finished_before": {},
                    "running_on_worker": [], "epochs": EPOCHS, "num_samples": SPACE["budget"]["num_samples"],
                    "results": str(root / "w")}  # fmt: skip

    def remove_worker_mid_trial() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            trials = results_so_far(exp)
            finished = {t: rows[-1] for t, rows in trials.items() if rows[-1]["epoch"] == EPOCHS}
            running = [t for t, rows in trials.items() if rows[-1]["node_id"] == worker_id
                       and rows[-1]["epoch"] <= EPOCHS - 2]  # fmt: skip
            if finished and running:
                cluster.remove_node(worker)
                report.update(removed=True, running_on_worker=running,
                              finished_before={t: r["val_acc"] for t, r in finished.items()})  # fmt: skip
                print(f"removed worker node {worker_id} while it ran {running}", flush=True)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_worker_mid_trial, daemon=True)
    watcher.start()
    try:
        sweep(space_from_dict(SPACE), name="w", results_dir=root, address=cluster.address, verbose=1)
    finally:
        watcher.join(timeout=1)
        cluster.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
