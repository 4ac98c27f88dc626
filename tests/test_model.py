"""The conditioned diffusion network, its deterministic baseline, the scheduler and the sampler."""

from __future__ import annotations

import math

import monai
import pytest
import torch
from scripts.runtime.constants import ARMS, CONDITION_CHANNELS, LOAD_CHANNELS, NULL_TREATMENT
from scripts.runtime.inferer import ForecastInferer, ThresholdInferer
from scripts.runtime.network import DeterministicForecastNet, ForecastDiffusionUNet
from scripts.runtime.sampler import ForecastSampler, cpu_has_native_bf16
from scripts.runtime.scheduler import ForecastScheduler, mask_to_signal, signal_to_mask
from scripts.training.engines import (
    AutocastInferer,
    MaskDiffusionPrepareBatch,
    WeightedBCEWithLogitsLoss,
    WeightedTarget,
)

from tests.conftest import SMALL_NET, perturbed_small_net

SIZE = 16


@pytest.fixture(scope="module")
def net() -> ForecastDiffusionUNet:
    return perturbed_small_net()


def _inputs(n: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    cond = torch.rand(n, len(CONDITION_CHANNELS), SIZE, SIZE, SIZE, generator=g)
    return x, torch.tensor([500] * n), cond, torch.zeros(n, dtype=torch.long), torch.full((n,), 24.0)


def test_output_shape_and_dtype(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs()
    with torch.no_grad():
        out = net(x, t, cond, treatment, horizon)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_noisy_voxel_reaches_its_own_output_voxel(net: ForecastDiffusionUNet) -> None:
    # the full-resolution head sees the noisy signal voxel by voxel, so a one-voxel change shows at that voxel
    # (even with the patch embedding blind to it)
    import copy

    blind = copy.deepcopy(net)
    with torch.no_grad():
        blind.patch_embed.weight[:, :1] = 0.0
    x, t, cond, treatment, horizon = _inputs(1)
    bumped = x.clone()
    bumped[0, 0, 5, 6, 7] += 2.0
    with torch.no_grad():
        diff = (blind(bumped, t, cond, treatment, horizon) - blind(x, t, cond, treatment, horizon)).abs()[0, 0]
    assert diff[5, 6, 7] > 1e-4
    assert diff[8:, 9:, 10:].max() == 0.0  # beyond the head's two 3x3x3 convolutions nothing changes


@pytest.mark.parametrize("head_cond_channels", [0, 15])
def test_head_sees_the_conditioning_at_full_resolution_when_asked(head_cond_channels: int) -> None:
    # FLAIR of visit 1 changed at one voxel, the patch embedding blind to it: only a head that takes the first 15
    # cond channels (the images and masks) sees the change, at that voxel and within its two 3x3x3 convolutions
    flair = CONDITION_CHANNELS.index("flair_1")
    blind = perturbed_small_net(head_cond_channels=head_cond_channels)
    with torch.no_grad():
        blind.patch_embed.weight[:, 1 + flair] = 0.0
    x, t, cond, treatment, horizon = _inputs(1)
    bumped = cond.clone()
    bumped[0, flair, 5, 6, 7] += 2.0
    with torch.no_grad():
        diff = (blind(x, t, bumped, treatment, horizon) - blind(x, t, cond, treatment, horizon)).abs()[0, 0]
    if head_cond_channels:
        assert diff[5, 6, 7] > 1e-4 and diff[8:, 9:, 10:].max() == 0.0
    else:
        assert diff.max() == 0.0
    assert sum(p.numel() for p in blind.head.conv1.parameters()) == 16 * (16 + 1 + head_cond_channels) * 27 + 16


def test_head_cond_channels_are_checked() -> None:
    with pytest.raises(ValueError, match="head_cond_channels must be in"):
        ForecastDiffusionUNet(**SMALL_NET, head_cond_channels=len(CONDITION_CHANNELS) + 1)


def test_treatment_token_changes_output(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs()
    with torch.no_grad():
        placebo = net(x, t, cond, treatment, horizon)
        ocrelizumab = net(x, t, cond, torch.full_like(treatment, ARMS.index("ocrelizumab")), horizon)
        again = net(x, t, cond, treatment, horizon)
    assert torch.equal(placebo, again)
    assert (placebo - ocrelizumab).abs().max() > 1e-4


def test_null_token_and_horizon(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs()
    with torch.no_grad():
        null = net(x, t, cond, torch.full_like(treatment, NULL_TREATMENT), horizon)
        default_null = net(x, t, cond, None, horizon)
        later = net(x, t, cond, treatment, horizon * 2)
        placebo = net(x, t, cond, treatment, horizon)
    assert torch.isfinite(null).all()
    assert torch.equal(null, default_null)
    assert (later - placebo).abs().max() > 1e-4
    with pytest.raises(IndexError):
        net(x, t, cond, torch.full_like(treatment, NULL_TREATMENT + 1), horizon)


def test_lesion_load_reaches_the_embedding(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs()
    load = slice(len(CONDITION_CHANNELS) - len(LOAD_CHANNELS), None)
    assert net.patient_channels == len(LOAD_CHANNELS) and net.class_embedding.patient is not None
    constant = cond.clone()
    constant[:, load] = cond[:, load].mean(dim=(2, 3, 4), keepdim=True)
    active = constant.clone()
    active[:, load] += 2.0
    with torch.no_grad():
        base = net(x, t, constant, treatment, horizon)
        more = net(x, t, active, treatment, horizon)
        labels = net.condition_labels(treatment, horizon, constant[:, load].flatten(2).mean(-1))
        emb, emb_more = (
            net.embedding(t, net.condition_labels(treatment, horizon, c[:, load].flatten(2).mean(-1)), torch.float32)
            for c in (constant, active)
        )
    assert labels.shape == (2, 2 + len(LOAD_CHANNELS))
    assert (more - base).abs().max() > 1e-4 and (emb_more - emb).abs().max() > 1e-4
    with pytest.raises(ValueError, match="patient_channels"):
        ForecastDiffusionUNet(**SMALL_NET, cond_channels=4, patient_channels=5)


def test_concat_mode_equals_separate_condition(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs()
    with torch.no_grad():
        separate = net(x, t, cond, treatment, horizon)
        concatenated = net(torch.cat([x, cond], 1), t, None, treatment, horizon)
    assert torch.allclose(separate, concatenated)


def test_deterministic_baseline_shape() -> None:
    network = DeterministicForecastNet(**SMALL_NET).eval()
    _, _, cond, treatment, horizon = _inputs()
    with torch.no_grad():
        logits = network(cond, treatment, horizon)
        masks = ThresholdInferer()(cond, network, treatment=treatment, horizon=horizon)
    assert logits.shape == (2, 1, SIZE, SIZE, SIZE)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_scheduler_schedule_and_weights() -> None:
    scheduler = ForecastScheduler()
    alpha = scheduler.alphas_cumprod
    assert alpha[0] > 0.99 and alpha[-1] == 0.0  # zero terminal SNR
    assert torch.all(alpha[1:] <= alpha[:-1])
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999 and len(scheduler.timesteps) == 10  # trailing: starts at pure noise
    weights = scheduler.loss_weights(torch.tensor([0, 500, 999]))
    assert scheduler.prediction_type == "mask_logits"
    assert weights[0] == scheduler.min_snr_gamma  # nearly clean: clamped at gamma
    assert weights[-1] == 1.0  # pure noise (SNR = 0): weight 1, never 0
    with pytest.raises(ValueError, match="mask_logits"):
        ForecastScheduler(prediction_type="epsilon")


def test_scheduler_step_recovers_x0_from_confident_logits() -> None:
    scheduler = ForecastScheduler()
    scheduler.set_timesteps(4)
    x0 = mask_to_signal((torch.rand(1, 1, 8, 8, 8) > 0.8).float())
    noise = torch.randn_like(x0)
    sample = noise.clone()
    for t in scheduler.timesteps:
        timesteps = torch.tensor([int(t)])
        # a confident logit of the right sign along the deterministic trajectory that starts from `noise`
        sample, predicted = scheduler.step(30.0 * x0, int(t), scheduler.add_noise(x0, noise, timesteps))
        assert torch.allclose(predicted, x0, atol=1e-4)
    assert torch.equal(signal_to_mask(sample), (x0 > 0).float())


def test_prepare_batch_and_loss(net: ForecastDiffusionUNet) -> None:
    _, _, cond, _, horizon = _inputs(4)
    batch = {
        "cond": cond,
        "label": (torch.rand(4, 1, SIZE, SIZE, SIZE) > 0.9).float(),
        "treatment": torch.tensor([0, 1, 2, 3]),
        "horizon": horizon,
    }
    torch.manual_seed(0)
    prepare = MaskDiffusionPrepareBatch(ForecastScheduler(), treatment_dropout=1.0)
    assert isinstance(prepare, monai.engines.DiffusionPrepareBatch)
    x_t, target, args, kwargs = prepare(batch)
    assert x_t.shape == batch["label"].shape and args == ()
    assert torch.all(kwargs["treatment"] == NULL_TREATMENT)  # dropout 1: always the null token
    assert torch.equal(target.target, mask_to_signal(batch["label"]))
    loss = WeightedBCEWithLogitsLoss()(net(x_t, **kwargs), target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits_scheduler = ForecastScheduler(lesion_weight=10.0)
    x_in, target, _, kwargs = MaskDiffusionPrepareBatch(logits_scheduler)(batch)
    min_snr = logits_scheduler.loss_weights(kwargs["timesteps"]).reshape(4, 1, 1, 1, 1)
    assert torch.allclose(target.weight, min_snr) and target.pos_weight == 10.0
    assert x_in.abs().max() <= logits_scheduler.llr_clip / logits_scheduler.llr_scale + 1e-6
    perfect = WeightedBCEWithLogitsLoss()(40.0 * target.target, target)
    wrong = WeightedBCEWithLogitsLoss()(-40.0 * target.target, target)
    assert perfect < 1e-6 < wrong


def test_likelihood_ratio_input_and_logit_debiasing() -> None:
    scheduler = ForecastScheduler(lesion_weight=20.0)
    x0 = mask_to_signal(torch.tensor([0.0, 1.0])).reshape(2, 1, 1, 1, 1)
    t = torch.tensor([500, 500])
    a = scheduler.alphas_cumprod[500]
    scaled = scheduler.scale_model_input(scheduler.add_noise(x0, torch.zeros_like(x0), t), t)
    expected = (2 * a.sqrt() / (1 - a) * a.sqrt() * x0).clamp(-20, 20) / scheduler.llr_scale
    assert torch.allclose(scaled, expected, atol=1e-5)
    # pure noise carries no evidence; a nearly clean step saturates at the clip
    assert scheduler.scale_model_input(torch.ones(1, 1, 2, 2, 2), torch.tensor([999])).abs().max() < 1e-6
    assert scheduler.scale_model_input(torch.ones(1, 1, 2, 2, 2), torch.tensor([0])).max() == pytest.approx(5.0)
    # the weighted optimum logit(p_w) = logit(p) + log(w) maps back to p
    p = torch.tensor([0.001, 0.05, 0.5, 0.9])
    logit_weighted = torch.logit(p) + torch.log(torch.tensor(20.0))
    x0_hat, _ = scheduler.predict_x0_eps(logit_weighted, torch.zeros(4), torch.tensor(0.5))
    assert torch.allclose((x0_hat + 1) / 2, p, atol=1e-5)
    # a calibrated sampling weight de-biases by its own log, training's weight is untouched
    calibrated = ForecastScheduler(lesion_weight=20.0, debias_weight=60.0)
    assert calibrated.lesion_weight == 20.0 and scheduler.debias_weight == 20.0
    x0_cal, _ = calibrated.predict_x0_eps(
        torch.logit(p) + torch.log(torch.tensor(60.0)), torch.zeros(4), torch.tensor(0.5)
    )
    assert torch.allclose((x0_cal + 1) / 2, p, atol=1e-5)
    with pytest.raises(ValueError, match="debias_weight"):
        ForecastScheduler(debias_weight=0.0)


def test_inferer_counterfactual_layout_and_seed(net: ForecastDiffusionUNet) -> None:
    _, _, cond, _, horizon = _inputs()
    inferer = ForecastInferer(ForecastScheduler(), num_samples=3, num_inference_steps=2, seed=5)
    both = inferer(cond, net, horizon=horizon, arms=["placebo", "ocrelizumab"])
    assert both.shape == (2, 2, 3, SIZE, SIZE, SIZE)
    again = inferer(cond, net, horizon=horizon, arms=["placebo", "ocrelizumab"])
    assert torch.equal(both, again)
    factual = inferer(cond, net, treatment=torch.tensor([0, 0]), horizon=horizon)
    assert factual.shape == (2, 3, SIZE, SIZE, SIZE)
    assert torch.equal(factual, both[:, 0])  # same noise, same arm -> same samples


def test_conditional_mean_is_the_first_step_prediction(net: ForecastDiffusionUNet) -> None:
    _, _, cond, _, horizon = _inputs()
    scheduler = ForecastScheduler(lesion_weight=20.0)
    inferer = ForecastInferer(scheduler, num_samples=3, num_inference_steps=2, seed=5, precision="float32")
    draws = inferer.draw(cond, net, horizon=horizon, arms=["placebo", "ocrelizumab"])
    assert draws.samples.shape == (2, 2, 3, SIZE, SIZE, SIZE) and draws.mean.shape == (2, 2, SIZE, SIZE, SIZE)
    assert torch.equal(draws.samples, inferer(cond, net, horizon=horizon, arms=["placebo", "ocrelizumab"]))
    # zero terminal SNR: the first step sees no noise, so its prediction is sigmoid(logit - log w) of an empty input
    t = torch.full((2,), scheduler.num_train_timesteps - 1)
    for a, arm in enumerate(["placebo", "ocrelizumab"]):
        with torch.no_grad():
            logits = net(torch.zeros(2, 1, SIZE, SIZE, SIZE), t, cond, torch.full((2,), ARMS.index(arm)), horizon)
        expected = torch.sigmoid(logits.float() - math.log(20.0))[:, 0]
        assert torch.allclose(draws.mean[:, a], expected, atol=1e-5)
    assert not torch.allclose(draws.mean[:, 0], draws.mean[:, 1])  # the arms differ through the treatment
    factual = inferer.draw(cond, net, treatment=torch.tensor([0, 0]), horizon=horizon)
    assert factual.mean.shape == (2, SIZE, SIZE, SIZE) and torch.allclose(factual.mean, draws.mean[:, 0])


def test_guidance_and_chunking_agree(net: ForecastDiffusionUNet) -> None:
    _, _, cond, treatment, horizon = _inputs()
    noise = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    whole = ForecastSampler(ForecastScheduler(), 3, guidance_scale=2.0).sample(net, cond, treatment, horizon, noise)
    chunked = ForecastSampler(ForecastScheduler(), 3, guidance_scale=2.0, chunk_size=1).sample(
        net, cond, treatment, horizon, noise
    )
    assert torch.equal(whole, chunked)


def test_lesion_weighted_loss_binary_and_soft_targets() -> None:
    # binary targets: the lesion class weight is a per-voxel weight w on lesion voxels
    logits = torch.tensor([-2.0, 0.5, 1.5, -0.3])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = WeightedBCEWithLogitsLoss()(logits, WeightedTarget(mask_to_signal(labels), torch.tensor(2.0), 20.0))
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert loss.item() == pytest.approx((2.0 * plain * torch.where(labels > 0, 20.0, 1.0)).mean().item(), rel=1e-6)
    # soft targets: the minimiser is logit(y) + log(w), the offset the sampler's de-bias removes
    y = torch.tensor([0.02, 0.33, 0.67, 0.97])
    z = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = WeightedBCEWithLogitsLoss()(z, WeightedTarget(mask_to_signal(y), torch.tensor(1.0), 20.0))
        value.backward()
        return value

    optimizer.step(closure)
    assert torch.allclose(z.detach(), torch.logit(y) + math.log(20.0), atol=1e-3)
    x0, _ = ForecastScheduler(lesion_weight=20.0).predict_x0_eps(z.detach(), torch.zeros(4), torch.tensor(0.5))
    assert torch.allclose((x0 + 1) / 2, y, atol=1e-3)
    with pytest.raises(ValueError, match="lesion_weight"):
        ForecastScheduler(lesion_weight=0.5)


def test_autocast_inferer_precision() -> None:
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 4, 4, 4)
    assert AutocastInferer("bfloat16")(x, conv).dtype == torch.bfloat16
    assert AutocastInferer("float32")(x, conv).dtype == torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert AutocastInferer()(x, conv).dtype == expected  # "auto": bfloat16 only where the CPU has it natively
    with pytest.raises(ValueError, match="precision"):
        AutocastInferer("float64")
