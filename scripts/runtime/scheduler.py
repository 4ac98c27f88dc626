"""Noise schedule, training targets and the few-step sampler step for binary NET2 masks.

The choices, and why they suit sparse binary lesion masks (the runs that led to them are in
``bundle/docs/training.md``):

* **Masks as analog bits.** A NET2 mask is mapped to {-1, +1} (``mask_to_signal``) and diffused like an image; a
  sample is binarised at 0 (``signal_to_mask``). Lesions are a few voxels among ~10^5 background voxels.
* **Shifted cosine schedule** (Hoogeboom et al., *simple diffusion*, 2023): logSNR(t) = -2 log tan(pi t / 2) +
  2 log(shift). A 3D volume holds far more voxels than the 64x64 images the cosine schedule was tuned on, so a
  given noise level hides far less of the signal; ``shift < 1`` moves the schedule towards noise, where the decision
  *whether and where* lesions appear is taken.
* **Zero terminal SNR** (Lin et al., 2024): the last training step is pure noise, so sampling starts from exactly
  the distribution it was trained on and the first step predicts the conditional mean forecast.
* **Mask logits with a likelihood-ratio input.** For a binary target the optimal denoiser is a posterior: with
  x_t = a x0 + s eps and x0 in {-1, +1}, the evidence of one voxel for "lesion" is the log-likelihood ratio
  LLR = 2 a x_t / s^2, and the posterior logit is the prior logit (from the past visits, treatment and horizon) plus
  the LLR summed over the lesion's voxels. So ``scale_model_input`` hands the network the clipped LLR instead of x_t
  (diffusers' hook for scheduler-specific input scaling), and the network outputs the logit of p(lesion) per voxel,
  trained with binary cross-entropy; x0 = tanh(logit / 2). Copying a nearly clean mask is then a fixed linear path
  (logit = LLR) on which lesion and background voxels agree.
* **Min-SNR-gamma weight** (Hang et al., 2023): each sample's loss is weighted by min(1 + SNR, gamma), which never
  vanishes at SNR = 0, so the pure-noise step stays trained.
* **Lesion-weighted loss, de-biased when sampling.** NET2 voxels are ~1e-4 of a volume: the lesion term of the
  binary cross-entropy gets ``lesion_weight`` (w) times the weight of the background term (its ``pos_weight``), so
  lesion gradients are not drowned. The minimiser is then the logit of the *weighted* posterior, logit p + log w,
  for binary and soft targets alike; sampling subtracts log w (the standard prior correction of class-weighted
  training), or log of the calibrated ``debias_weight``.
* **Soft targets** (optional, ``scripts.runtime.transforms.SoftMaskd``): the training mask is smoothed across its
  boundary so that it stays above 1/2 exactly on the lesion's voxels; binarising a sample at 0 keeps that meaning.
  The denoiser of a smooth target pools the noisy evidence of a neighbourhood instead of deciding voxel by voxel.
* **Deterministic DDIM steps on "trailing" timesteps** (Lin et al., 2024): with 10 steps the first step sits at
  t = T - 1 (pure noise) instead of MONAI's leading spacing, which starts at a non-zero SNR that training never
  pairs with pure noise. Deterministic (eta = 0) steps make counterfactual arms comparable: the same starting noise
  maps to forecasts that differ only through the treatment.

MONAI's ``DDIMScheduler`` supplies the interface (``set_timesteps``, ``step``, ``add_noise``); this subclass adds the
schedule, trailing spacing, steps that follow an uneven schedule, the input scaling and the loss weights.
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import DDIMScheduler, NoiseSchedules


@NoiseSchedules.add_def("shifted_cosine", "Shifted cosine logSNR schedule with zero terminal SNR")
def _shifted_cosine(num_train_timesteps: int, shift: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (betas, alphas, alphas_cumprod) of the shifted cosine schedule, ending exactly at alpha_cumprod = 0."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    log_snr = -2.0 * torch.log(torch.tan(math.pi * t / 2)) + 2.0 * math.log(shift)
    alphas_cumprod = torch.sigmoid(log_snr)
    alphas_cumprod[-1] = 0.0  # tan(pi/2) is not exactly inf in floating point
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    alphas = alphas_cumprod / previous
    betas = 1.0 - alphas
    return betas.float(), alphas.float(), alphas_cumprod.float()


def mask_to_signal(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask {0, 1} -> diffusion signal {-1, +1}."""
    return mask * 2.0 - 1.0


def signal_to_mask(signal: torch.Tensor) -> torch.Tensor:
    """Diffusion signal -> binary mask (float 0/1), thresholded at 0."""
    return (signal > 0).to(signal.dtype)


class ForecastScheduler(DDIMScheduler):
    """DDIM scheduler for mask logits: shifted cosine, zero-terminal-SNR schedule, trailing timesteps, min-SNR and
    lesion weights.

    Args:
        num_train_timesteps: number of training timesteps T.
        schedule: a member of MONAI's ``NoiseSchedules`` (default ``"shifted_cosine"``, defined in this module).
        prediction_type: ``"mask_logits"``, the only one: the network outputs the logit of p(lesion) and takes the
            likelihood ratio of :meth:`scale_model_input` as its noisy input (named in the configs for readers).
        min_snr_gamma: gamma of the min-SNR loss weight.
        lesion_weight: weight of lesion voxels (target +1) relative to background in the loss.
        clip_sample: clamp the predicted x0 to [-1, 1], the range of mask signals.
        llr_clip, llr_scale: the input log-likelihood ratio is clipped to [-llr_clip, llr_clip] and divided by
            ``llr_scale``, so nearly clean steps do not feed the network huge values.
        debias_weight: the weight the logits are de-biased with when sampling (default: ``lesion_weight``, exact at
            the optimum of the weighted loss). A trained network is not at that optimum, and a few-step sampler
            compounds its error over steps, so the forecast count can drift; this one scalar, calibrated on the
            validation split, brings the mean forecast count back to the observed one (the shipped value and its
            calibration are in ``bundle/docs/training.md``). Training is unaffected.
        schedule_args: passed to the schedule function (e.g. ``shift``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "shifted_cosine",
        prediction_type: str = "mask_logits",
        min_snr_gamma: float = 5.0,
        lesion_weight: float = 1.0,
        clip_sample: bool = True,
        llr_clip: float = 20.0,
        llr_scale: float = 4.0,
        debias_weight: float | None = None,
        **schedule_args,
    ) -> None:
        if prediction_type != "mask_logits":
            raise ValueError(f"prediction_type must be 'mask_logits', got {prediction_type!r}")
        # MONAI validates its own prediction types: mask logits convert to x0 ("sample") in this class
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            clip_sample=clip_sample,
            set_alpha_to_one=True,
            prediction_type="sample",
            **schedule_args,
        )
        self.prediction_type = prediction_type
        self.llr_clip = float(llr_clip)
        self.llr_scale = float(llr_scale)
        self.min_snr_gamma = float(min_snr_gamma)
        self.lesion_weight = float(lesion_weight)
        if self.lesion_weight < 1.0:
            raise ValueError(f"lesion_weight must be >= 1, got {lesion_weight}")
        self.debias_weight = self.lesion_weight if debias_weight is None else float(debias_weight)
        if self.debias_weight <= 0.0:
            raise ValueError(f"debias_weight must be > 0, got {debias_weight}")

    def scale_model_input(self, sample: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """The network's view of the noisy signal: its clipped per-voxel log-likelihood ratio of lesion against
        background, 2 a x_t / s^2, divided by ``llr_scale``."""
        t = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        alpha = self.alphas_cumprod.to(sample.device)[t].to(torch.float32)
        gain = 2.0 * alpha.sqrt() / (1.0 - alpha).clamp_min(1e-12)
        gain = gain.reshape(-1, *([1] * (sample.ndim - 1)))
        llr = (gain * sample.float()).clamp(-self.llr_clip, self.llr_clip)
        return (llr / self.llr_scale).to(sample.dtype)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` evenly spaced timesteps ending at T - 1 ("trailing" spacing)."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must lie in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        step = self.num_train_timesteps / num_inference_steps
        timesteps = torch.round(torch.arange(self.num_train_timesteps, 0, -step, dtype=torch.float64)) - 1
        self.timesteps = timesteps.long().to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep that follows ``timestep`` in the current sampling schedule (-1 after the last)."""
        schedule = self.timesteps.tolist()
        index = schedule.index(int(timestep))
        return schedule[index + 1] if index + 1 < len(schedule) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``timestep`` to the next timestep of the schedule (works for uneven spacing too).

        Returns:
            (previous sample, predicted original sample)
        """
        timestep = int(timestep)
        prev = self.previous_timestep(timestep)
        alphas_cumprod = self.alphas_cumprod.to(sample.device)
        alpha_t = alphas_cumprod[timestep]
        alpha_prev = alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod.to(sample.device)
        x0, eps = self.predict_x0_eps(model_output, sample, alpha_t)
        if self.clip_sample:
            x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
            # keep eps consistent with the clipped x0 so the trajectory stays on the noise manifold
            eps = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).clamp_min(1e-12).sqrt()
        std = 0.0
        if eta > 0 and prev >= 0:
            std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
        prev_sample = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp_min(0).sqrt() * eps
        if eta > 0 and prev >= 0:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + std * noise
        return prev_sample, x0

    def predict_x0_eps(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert the network's logits at cumulative alpha ``alpha_t`` into de-biased (x0, epsilon) predictions."""
        a, s = alpha_t.sqrt(), (1 - alpha_t).sqrt()
        x0 = torch.tanh((model_output.float() - math.log(self.debias_weight)) / 2).to(sample.dtype)
        return x0, (sample - a * x0) / s.clamp_min(1e-12)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at the given timesteps."""
        alpha = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha / (1 - alpha).clamp_min(1e-12)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight min(1 + SNR, gamma)."""
        snr = self.snr(timesteps)
        return torch.minimum(snr + 1, torch.full_like(snr, self.min_snr_gamma))
