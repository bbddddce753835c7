"""A killed sweep of 2-worker trials resumes with nothing lost (a check run by hand: Ray starts twice).

Runs ``oialr-tune sweep`` on 3 trials of 2 Ray Train workers each (tiny digits MLP, one trial at a
time, a checkpoint every epoch), SIGKILLs the driver's process group once one trial has finished and
the next has reported an epoch, runs ``oialr-tune sweep --resume``, and checks that the finished
trial is kept as it was and that every trial ends with all its epochs.

    python benchmarks/ddp_kill_resume.py /tmp/kill-resume
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_sweep import tiny_space  # the tests' tiny space (tests/ is on the path now)

EPOCHS = 3


def _reported(arm: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's reported epochs so far (Ray's result.json)."""
    out = {}
    for f in arm.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1]["trial_id"]] = rows
    return out


def main() -> None:
    tmp = Path(sys.argv[1])
    tmp.mkdir(parents=True, exist_ok=True)
    space = tiny_space("kr", resources={"cpu": 0.5, "workers": 2}, baseline="none", strategy={"scheduler": "fifo"},
                       budget={"num_samples": 3, "max_epochs": EPOCHS, "max_concurrent": 1}, checkpoint={"every": 1})
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    results, env = tmp / "r", {**os.environ, "RAY_ADDRESS": ""}
    arm = results / "k" / "oialr"
    t0 = time.time()
    with (tmp / "driver.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "oialr_tune.cli", "sweep", str(tmp / "space.yaml"), "--name",
                                 "k", "--results-dir", str(results)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:  # until one trial has finished and the next has reported an epoch: a kill mid-trial
            while not (sum(len(r) == EPOCHS for r in _reported(arm).values()) >= 1 and len(_reported(arm)) >= 2):
                assert proc.poll() is None, (tmp / "driver.log").read_text()[-3000:]
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = _reported(arm)
    print(f"killed after {time.time() - t0:.0f} s; epochs reported per trial: "
          f"{ {t: len(r) for t, r in before.items()} }", flush=True)
    rc = subprocess.run([sys.executable, "-m", "oialr_tune.cli", "sweep", "--resume", str(results / "k")],
                        env=env).returncode
    df = pd.read_csv(results / "k" / "trials.csv").set_index("trial_id")
    print(f"resume exit {rc}, {time.time() - t0:.0f} s in all")
    print(df[["status", "training_iteration", "val_acc", "workers"]].to_string())
    after = _reported(arm)
    for trial_id, rows in before.items():
        if len(rows) == EPOCHS:  # finished before the kill: kept as it was
            assert df.loc[trial_id, "val_acc"] == rows[-1]["val_acc"], trial_id
        else:  # interrupted: continued from its last checkpoint, not from scratch
            epochs = [r["epoch"] for r in after[trial_id]]
            assert epochs == list(range(1, EPOCHS + 1)), (trial_id, epochs)
            print(f"{trial_id}: epochs 1..{len(rows)} before the kill (pid {rows[0]['pid']}), "
                  f"{len(rows) + 1}..{EPOCHS} after (pid {after[trial_id][-1]['pid']})")
    assert rc == 0 and len(df) == 3 and set(df["status"]) == {"TERMINATED"}
    assert (df["training_iteration"] == EPOCHS).all() and (df["workers"] == 2).all()
    print("OK: nothing lost")


if __name__ == "__main__":
    main()
