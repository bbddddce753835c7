"""Model files: a low-rank or dense-exported model reloads exactly, with only torch and this package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from oialr_tune.model_io import load_model, read_model_file, save_model
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, LowRankLayer, low_rank_structure

IN_SHAPE = (1, 8, 8)


def _trained_low_rank(name: str, args: dict) -> nn.Module:
    """A model a few OIALR steps in: factorized, then cut (a rank below full), so the file must carry ranks."""
    torch.manual_seed(0)
    model = build_model(name, IN_SHAPE, 10, **args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, delay=2, stability_frequency=2, stability_threshold=None, sigma_cutoff_fraction=0.3)
    x, y = torch.randn(32, *IN_SHAPE), torch.randint(0, 10, (32,))
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    return model.eval()


@pytest.mark.parametrize(
    ("name", "args"),
    [("mlp", {"hidden": [48, 32]}), ("cnn", {"channels": [8, 16], "hidden": 32}),
     ("vit_small", {"patch_size": 4, "dim": 24, "depth": 1, "heads": 2})],
)
def test_low_rank_and_dense_files_reload_exactly(tmp_path: Path, name: str, args: dict) -> None:
    model = _trained_low_rank(name, args)
    ranks = low_rank_structure(model)
    assert ranks, "the model should have low-rank layers"
    cfg = {"model": {"name": name, "args": args}, "seed": 3}
    x = torch.randn(5, *IN_SHAPE)
    with torch.no_grad():
        expected = model(x)

    save_model(tmp_path / "lr.pt", model, cfg, in_shape=IN_SHAPE, num_classes=10, meta={"test_acc": 0.5})
    loaded = load_model(tmp_path / "lr.pt")
    assert low_rank_structure(loaded) == ranks
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    info = read_model_file(tmp_path / "lr.pt")
    assert info.config == cfg and info.meta == {"test_acc": 0.5} and not info.dense

    save_model(tmp_path / "dense.pt", model, cfg, dense=True, in_shape=IN_SHAPE, num_classes=10)
    dense = load_model(tmp_path / "dense.pt")
    assert low_rank_structure(dense) == {}
    assert not any(isinstance(m, LowRankLayer) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), expected, rtol=1e-4, atol=1e-5)  # U S Vᵀ folded: rounding only
    # The dense file's weights fit the architecture exactly as build_model makes it.
    plain = build_model(name, IN_SHAPE, 10, **args)
    plain.load_state_dict(read_model_file(tmp_path / "dense.pt").state_dict)


def test_not_a_model_file(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an oialr-tune model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_model(tmp_path / "missing.pt")


def test_loads_without_ray_or_optuna(tmp_path: Path) -> None:
    model = _trained_low_rank("mlp", {"hidden": [32]})
    save_model(tmp_path / "m.pt", model, {"model": {"name": "mlp", "args": {"hidden": [32]}}},
               in_shape=IN_SHAPE, num_classes=10)
    # A None entry in sys.modules makes `import ray` raise ImportError, as if it were not installed.
    script = (
        "import sys\n"
        "for mod in ('ray', 'optuna', 'pandas', 'matplotlib'):\n"
        "    sys.modules[mod] = None\n"
        "import torch\n"
        "from oialr_tune.model_io import load_model\n"
        f"model = load_model({str(tmp_path / 'm.pt')!r})\n"
        "print(model(torch.zeros(2, 1, 8, 8)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 10])" in out.stdout


def test_a_user_loops_checkpoint_holds_no_model_to_load(tmp_path: Path) -> None:
    """load_model reads trainer checkpoints too (test_trainer), but a user loop's keeps its own state."""
    torch.save({"format": 1, "config": {"model": {"name": "mlp"}}, "epoch": 1, "history": [], "user": {}},
               tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a checkpoint of a user's training loop"):
        load_model(tmp_path / "checkpoint.pt")
