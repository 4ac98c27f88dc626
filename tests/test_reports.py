"""The forecast figure: slice choice, orientation, robustness and atomic writing."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from scripts.runtime.constants import ARMS
from scripts.runtime.figures import ARM_LABELS, _axial, arm_label, forecast_figure, pick_slices

SHAPE = (32, 32, 32)
BLOBS = ((10, 20, 6), (20, 12, 16), (14, 22, 26))
"""Lesion centres (i, j, k) of the synthetic forecasts: distinct axial slices 6, 16 and 26."""


def _brain(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An MRI-like ellipsoid head (tissue ~0.5, a dark ventricle, background noise)."""
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.95) ** 2 + (grid[2] / 0.9) ** 2)
    mri = np.where(r < 1, 0.5, 0.0) - 0.35 * ((np.abs(grid[0]) < 0.1) & (np.abs(grid[1]) < 0.3) & (r < 0.5))
    return (mri + np.random.default_rng(0).normal(0, 0.02, shape)).astype(np.float32)


def _blob(centre: tuple[int, int, int], shape: tuple[int, int, int] = SHAPE, sigma: float = 1.5) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) / (2 * sigma**2)).astype(np.float32)


def _probs(arms: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Three blobs per arm, fading from the first arm to the last."""
    lesions = sum(_blob(c) for c in BLOBS)
    return {arm: (0.9 * (1 - i / len(arms))) * lesions for i, arm in enumerate(arms)}


def _summaries(arms: tuple[str, ...]) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    out = {}
    for i, arm in enumerate(arms):
        samples = rng.poisson(3.0 * (1 - i / len(arms)), 100)
        out[arm] = {
            "expected_count": float(samples.mean()),
            "p_active": float((samples > 0).mean()),
            "count_samples": samples.tolist(),
            "expected_volume_mm3": 50.0 * float(samples.mean()),
        }
    return out


def _check_png(path: Path) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 1_500_000
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert 900 <= width <= 1400 and 400 <= height <= 2600, image.shape
    assert image[..., :3].std() > 0.05  # not blank
    return image


def test_arm_labels_cover_every_arm() -> None:
    assert set(ARM_LABELS) == set(ARMS)
    assert arm_label("interferon_beta_1a") == "interferon beta-1a"
    assert arm_label("new_drug") == "new drug"


def test_pick_slices_go_through_the_lesions() -> None:
    probs = _probs(ARMS)
    slices = pick_slices(probs, 3)
    assert slices == sorted({c[2] for c in BLOBS})
    four = pick_slices(probs, 4)
    assert len(set(four)) == 4 and four == sorted(four)
    assert all(min(abs(k - c[2]) for k in four) <= 1 for c in BLOBS)


def test_pick_slices_prefers_separate_lesions_and_spreads() -> None:
    # A big lesion at k=10 and a faint small one at k=22: the faint one beats the flanks of the big one.
    probs = {"placebo": _blob((16, 16, 10), sigma=3.0) + 0.1 * _blob((16, 16, 22), sigma=1.0)}
    slices = pick_slices(probs, 3, min_gap=3)
    assert 10 in slices and 22 in slices
    assert np.diff(slices).min() >= 3


def test_pick_slices_all_zero_go_through_the_brain_centre() -> None:
    mri = _brain()
    slices = pick_slices({"placebo": np.zeros(SHAPE)}, 4, mri=mri)
    assert len(set(slices)) == 4
    assert all(6 <= k <= 26 for k in slices)
    assert pick_slices([np.zeros((8, 8, 3))], 4) == [0, 1, 2]  # never more slices than the stack has


def test_axial_slices_are_radiological_anterior_up() -> None:
    volume = np.zeros((10, 12, 3))
    volume[8, 10, 1] = 1.0  # right (high x) and anterior (high y)
    image = _axial(volume, 1, (slice(0, 10), slice(0, 12)))
    row, col = np.argwhere(image == 1.0)[0]
    assert image.shape == (12, 10)
    assert row == 10  # drawn with origin="lower": a high row is near the top, i.e. anterior up
    assert col == 1  # patient's right on the image left


def test_forecast_figure_six_arms(tmp_path: Path) -> None:
    order = ARMS[1:] + ARMS[:1]  # placebo last in the input, drawn first
    out = forecast_figure(_brain(), _probs(order), _summaries(order), tmp_path / "forecast.png", title="six arms")
    assert out == tmp_path / "forecast.png"
    image = _check_png(out)
    assert image.shape[0] > image.shape[1]  # six rows of slices above the chart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.png"]  # no temporary file left
    forecast_figure(_brain(), _probs(order), _summaries(order), out)  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.png"]


def test_forecast_figure_one_arm_anisotropic(tmp_path: Path) -> None:
    shape = (40, 48, 16)
    probs = {"ocrelizumab": 0.3 * _blob((20, 30, 8), shape=shape)}
    summary = {"ocrelizumab": {"expected_count": 0.2, "p_active": 0.15, "count_samples": [0] * 17 + [1, 1, 2]}}
    image = _check_png(forecast_figure(_brain(shape), probs, summary, tmp_path / "one.png", voxel_mm=(1.0, 1.0, 3.0)))
    assert image.shape[1] > image.shape[0]  # one row: wider than tall


def test_forecast_figure_all_zero_and_sparse_summaries(tmp_path: Path) -> None:
    probs = {arm: np.zeros(SHAPE, np.float32) for arm in ARMS}
    summaries = {arm: {"expected_count": 0.0, "p_active": 0.0, "count_samples": []} for arm in ARMS}
    del summaries["laquinimod"]  # an arm without a summary is still drawn
    _check_png(forecast_figure(_brain(), probs, summaries, tmp_path / "zero.png"))


@pytest.mark.parametrize("n", [16, 128])
def test_forecast_figure_small_and_large_volumes(tmp_path: Path, n: int) -> None:
    shape = (n, n, n)
    probs = {"placebo": 0.7 * _blob((n // 3, 2 * n // 3, n // 2), shape=shape, sigma=n / 16)}
    out = forecast_figure(_brain(shape), probs, _summaries(("placebo",)), tmp_path / "f.png", voxel_mm=[96.0 / n] * 3)
    _check_png(out)


def test_affine_reorients_to_ras(tmp_path: Path) -> None:
    """The same head stored LPS (flipped x and y) or with permuted axes draws the identical figure."""
    mri, probs, summary = _brain(), _probs(("placebo",)), _summaries(("placebo",))
    ras = np.diag([3.0, 3.0, 3.0, 1.0])
    ras[:3, 3] = (-93.0, -93.0, -90.0)
    lps = np.diag([-3.0, -3.0, 3.0, 1.0])
    lps[:3, 3] = (0.0, 0.0, -90.0)
    zyx = np.zeros((4, 4))
    zyx[0, 2], zyx[1, 1], zyx[2, 0], zyx[3, 3] = 3.0, 3.0, 3.0, 1.0
    zyx[:3, 3] = ras[:3, 3]
    a = forecast_figure(mri, probs, summary, tmp_path / "ras.png", affine=ras)
    b = forecast_figure(
        mri[::-1, ::-1], {"placebo": probs["placebo"][::-1, ::-1]}, summary, tmp_path / "lps.png", affine=lps
    )
    c = forecast_figure(
        mri.transpose(2, 1, 0),
        {"placebo": probs["placebo"].transpose(2, 1, 0)},
        summary,
        tmp_path / "zyx.png",
        affine=zyx,
    )
    assert np.array_equal(mpimg.imread(a), mpimg.imread(b))
    assert np.array_equal(mpimg.imread(a), mpimg.imread(c))


def test_bad_inputs_and_failed_write_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="shape"):
        forecast_figure(_brain(), {"placebo": np.zeros((8, 8, 8))}, {}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        forecast_figure(_brain(), {}, {}, tmp_path / "bad.png")

    def broken_savefig(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        forecast_figure(_brain(), _probs(("placebo",)), _summaries(("placebo",)), tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


def test_forecast_figure_on_a_synthetic_case(tmp_path: Path) -> None:
    """A realistic case: a synthetic FLAIR and its smoothed counterfactual NET2 masks as probability maps."""
    from scipy import ndimage
    from scripts.bench.synthetic.case import generate_case

    case = generate_case(0, 0, shape=32, spacing=6.0)
    flair = case.images["flair_1"].astype(np.float32)
    flair *= 0.5 / np.median(flair[flair > 0.1 * flair.max()])
    probs = {arm: ndimage.gaussian_filter(case.counterfactual[arm].astype(np.float32), 0.7) for arm in ARMS}
    top = max(float(p.max()) for p in probs.values()) or 1.0
    probs = {arm: p / top for arm, p in probs.items()}
    out = forecast_figure(
        flair, probs, _summaries(ARMS), tmp_path / "forecast.png", affine=case.grid.affine, title=f"case {case.case_id}"
    )
    _check_png(out)


def test_training_curves_with_reference_lines(tmp_path: Path) -> None:
    from scripts.tools.curves import training_curves
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for epoch in range(1, 4):
            writer.add_scalar("train_loss", 1.0 / epoch, epoch)
            writer.add_scalar("val_count_crps", 2.0 - 0.1 * epoch, epoch)
    out = tmp_path / "curves.png"
    series = training_curves(str(tmp_path / "tb"), str(out), references={"val_count_crps": {"empty": 1.45}})
    assert out.stat().st_size > 0
    assert series["val_count_crps"] == [(1, pytest.approx(1.9)), (2, pytest.approx(1.8)), (3, pytest.approx(1.7))]
    assert set(series) == {"train_loss", "val_count_crps"}
    with pytest.raises(ValueError, match="no training or validation scalars"):
        training_curves(str(tmp_path / "nothing"), str(tmp_path / "x.png"))
