"""``oialr-tune best``'s answer rendered for people (a table), for tools (JSON) or for a rerun (YAML)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from oialr_tune.errors import UserError
from oialr_tune.results import BestTrial, _plain

__all__ = ["format_best"]

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_best(best: BestTrial, fmt: str = "table") -> str:
    """Render a :class:`BestTrial` as ``table`` (for people), ``json`` or ``yaml``.

    ``yaml`` is the trainer config only (metrics as comments), ready for ``oialr-tune train``.
    """
    t = best.trial
    if fmt == "json":
        return json.dumps(best.to_dict(), indent=2, default=_plain)
    if fmt == "yaml":
        m = t.metrics
        header = [
            f"# best {best.arm} trial {t.trial_id} of {best.results_dir} by {best.objective} ({best.mode})",
            f"# {best.objective}={_fmt(m.get(best.objective))} trainable_fraction={_fmt(t.trainable_fraction)} "
            f"epochs={_fmt(m.get('training_iteration'))}",
            f"# checkpoint: {t.checkpoint}",
        ]
        return "\n".join(header) + "\n" + yaml.safe_dump(t.config, sort_keys=False)
    if fmt != "table":
        raise UserError(f"--format: expected table, yaml or json, got {fmt!r}")
    lines = [
        f"results   {best.results_dir}",
        f"arm       {best.arm}   objective {best.objective} ({'multi: ' if best.multi else ''}{best.mode})   "
        f"finished trials {best.finished_trials} (ignored {best.ignored_trials} failed/diverged/unfinished)",
    ]
    if best.completed_trials < best.finished_trials:
        stopped = best.finished_trials - best.completed_trials
        lines.append(f"          {stopped} stopped early by ASHA are not candidates"
                     if best.completed_trials else "          none ran every epoch: picked among those ASHA stopped")
    if best.max_trainable_fraction is not None:
        lines.append(f"budget    trainable_fraction <= {best.max_trainable_fraction}")
    lines += ["", f"best trial {t.trial_id}"]
    for k, v in t.metrics.items():
        if v is not None:  # e.g. val_acc of a regression sweep: not reported, not shown
            lines.append(f"  {k:<20} {_fmt(v)}")
    lines.append(f"  {'checkpoint':<20} {t.checkpoint}")
    if t.params:
        lines += ["", "searched values"]
        lines += [f"  {k:<32} {_fmt(v)}" for k, v in t.params.items()]
    if best.multi:
        lines += ["", f"Pareto set ({len(best.pareto)} trials, {best.objective} vs trainable_fraction)"]
        lines.append(f"  {'trial_id':<24} {best.objective:>10} {'fraction':>10}")
        for p in best.pareto:
            mark = "  <- chosen" if p.trial_id == t.trial_id else ""
            lines.append(
                f"  {p.trial_id:<24} {_fmt(p.metrics.get(best.objective)):>10} {_fmt(p.trainable_fraction):>10}{mark}"
            )
    lines += ["", f"full trainer config: oialr-tune best {best.results_dir} --arm {best.arm} --format yaml"]
    return "\n".join(lines)
