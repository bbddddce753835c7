"""Presets of the OIALR controller: the rules where oialr-tune and the authors' final code differ.

The authors' code is GitHub Helmholtz-AI-Energy/OIALR (package ``madonna``,
``src/madonna/models/oialr/`` and ``models/utils.py``); the README's table "oialr-tune vs the
authors' code" says why each of our rules is the default, and ``tests/test_oialr_fidelity.py``
pins each rule of both presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PRESETS", "Rules"]


@dataclass(frozen=True)
class Rules:
    """The discrete rules where oialr-tune and the authors' final code differ (README table).

    Attributes:
        check_at_factorization: run the first check (and cut) at ``delay`` itself, right after
            factorizing (authors), instead of one ``stability_frequency`` later (ours).
        max_cut_fraction: the share of a layer's current rank one check may drop; 0.5 means the
            rank at most halves per check (authors); 1.0 bounds nothing (ours).
        min_rank_fraction: a rank floor as a share of the layer's smaller dimension,
            ``int(min_rank_fraction · min(m, n))`` (authors: 0.01 of ``vh.shape[-1]`` after making W
            tall); ``min_rank`` still applies.
        layer_schedule: what ``layer_step_fraction`` grows, last layers first. ``"factorize"``
            (ours): the set of factorized layers, one chunk per check. ``"check"`` (authors): every
            layer is factorized at ``delay``; the set of *checked* layers grows by
            ``int((n − 1) · layer_step_fraction)`` per check, and when that is 0 (n ≤ 10 at 0.1)
            every layer is checked from the start, as in the authors' slicing.
        optimizer_state: ``"rotate"`` or ``"slice"``, see the module docstring.
        dense_last: which layer ``keep_last_layer`` keeps dense: ``"classifier"`` (ours: the model's
            last eligible weight, before the size filter) or ``"last_replaced"`` (authors: the last
            layer that would otherwise be factorized, after the size filter).
        dense_first: which layer ``keep_first_layer`` keeps dense: ``"input"`` (ours: the model's
            first eligible weight, before the size filter) or ``"first_replaced"`` (authors: the
            first layer that passes the size filter).
        conv_filter: the size filter for convs (W viewed as out × in·k²). ``"two_sided"`` (ours, as
            for Linear): skip when min(m, n) ≤ skip_ratio · max(m, n). ``"one_sided"`` (authors):
            skip only when in·k² < skip_ratio · out, so a wide conv (few filters) is factorized.
        grouped_convs: factorize grouped and depthwise convs (and convs with a non-zero padding
            mode) as a parametrized kernel, W = U S Vᵀ rebuilt every forward (authors); ours leaves
            them dense.
        freeze_factorized_bias: at factorization the layer's bias stops training (authors: their
            layer builds a new bias Parameter the optimizer never sees); ours keeps training it.
        stability_gate: whether ``stability_threshold`` gates cuts; the authors' final code treats
            every layer as stable (no gate).
        layer_step_fraction: the default for the controller's ``layer_step_fraction``.
    """

    check_at_factorization: bool = False
    max_cut_fraction: float = 1.0
    min_rank_fraction: float = 0.0
    layer_schedule: Literal["factorize", "check"] = "factorize"
    optimizer_state: Literal["rotate", "slice"] = "rotate"
    dense_last: Literal["classifier", "last_replaced"] = "classifier"
    stability_gate: bool = True
    layer_step_fraction: float = 1.0
    dense_first: Literal["input", "first_replaced"] = "input"
    conv_filter: Literal["two_sided", "one_sided"] = "two_sided"
    grouped_convs: bool = False
    freeze_factorized_bias: bool = False


PRESETS: dict[str, Rules] = {
    "oialr-tune": Rules(),
    "authors": Rules(
        check_at_factorization=True, max_cut_fraction=0.5, min_rank_fraction=0.01, layer_schedule="check",
        optimizer_state="slice", dense_last="last_replaced", stability_gate=False, layer_step_fraction=0.1,
        dense_first="first_replaced", conv_filter="one_sided", grouped_convs=True, freeze_factorized_bias=True,
    ),
}

