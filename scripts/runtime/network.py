"""Networks: the treatment-conditioned spatio-temporal diffusion U-Net and its deterministic baseline.

Both are MONAI ``DiffusionModelUNet`` s behind a patch embedding. The conditioning volume (past-visit MRI, lesion
masks and availability indicators, :data:`~scripts.runtime.constants.CONDITION_CHANNELS`) is concatenated with the
noisy NET2 signal along channels. The treatment arm (a learned embedding with an extra "no treatment" token) and the
forecast horizon in weeks (a sinusoidal embedding and an MLP) are summed into one vector that MONAI's U-Net adds to its
diffusion-time embedding, so both reach every residual block. That vector enters through the U-Net's
class-embedding slot: the parent's ``forward`` runs unchanged, with ``class_labels`` carrying
``[treatment index, horizon weeks]`` per sample.

Patch embedding (as in *simple diffusion*, Hoogeboom et al. 2023): a strided convolution maps each 2x2x2 patch of
the input to ``channels[0]`` features and a transposed convolution maps the U-Net's output back to voxels. The U-Net
then runs at half the resolution, eight times cheaper, which is what lets a 64^3 model train and sample on a CPU;
the patch features are learned, so the voxel detail of small lesions is kept rather than averaged away.

Full-resolution output head (:class:`VoxelHead`): the U-Net's features, unembedded to voxels, are concatenated with
the noisy NET2 signal itself and pass through two 3x3x3 convolutions modulated by the time, treatment and horizon
embedding. Without it the noisy signal reaches the output only through the patch embedding, where its 8 voxels per
patch share ``channels[0]`` features with 320 conditioning values (8 voxels x 40 channels), and the network learns
to ignore it (see ``bundle/docs/training.md``). A NET2 lesion is a few voxels at the working resolution; telling one
from noise is a local, voxel-scale decision (a matched filter over the noisy signal, biased by the U-Net's prior from
the past visits and treatment), which is what the head computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from scripts.runtime.constants import CONDITION_CHANNELS, LOAD_CHANNELS, NULL_TREATMENT
from torch import nn


class TreatmentHorizonEmbedding(nn.Module):
    """Embed ``[treatment index, horizon weeks, *patient features]`` rows into the U-Net's time-embedding space.

    Args:
        embed_dim: size of the U-Net's time embedding.
        num_treatments: number of treatment tokens, the null token included.
        horizon_channels: size of the sinusoidal horizon features.
        horizon_scale: multiplies weeks before the sinusoids, so that differences of a few weeks are resolved by
            frequencies designed for diffusion timesteps in [0, 1000).
        patient_features: number of patient-level features after the horizon (0: none), embedded by an MLP.
    """

    def __init__(
        self,
        embed_dim: int,
        num_treatments: int = NULL_TREATMENT + 1,
        horizon_channels: int = 64,
        horizon_scale: float = 10.0,
        patient_features: int = 0,
    ) -> None:
        super().__init__()
        self.num_treatments = num_treatments
        self.horizon_channels = horizon_channels
        self.horizon_scale = horizon_scale
        self.patient_features = patient_features
        self.treatment = nn.Embedding(num_treatments, embed_dim)
        self.horizon = nn.Sequential(nn.Linear(horizon_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.patient = (
            nn.Sequential(nn.Linear(patient_features, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
            if patient_features
            else None
        )

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels``: (N, 2 + patient_features) float tensor of [treatment index, horizon weeks, *patient features]."""
        treatment = labels[:, 0].round().long()
        dtype = self.horizon[0].weight.dtype
        horizon = get_timestep_embedding(labels[:, 1].float() * self.horizon_scale, self.horizon_channels)
        out = self.treatment(treatment) + self.horizon(horizon.to(dtype))
        if self.patient is not None:
            out = out + self.patient(labels[:, 2 : 2 + self.patient_features].to(dtype))
        return out


class VoxelHead(nn.Module):
    """Full-resolution head: features + noisy signal (+ local conditioning) -> conv3 -> FiLM(embedding) -> SiLU ->
    conv3 -> prediction.

    Args:
        spatial_dims: 1, 2 or 3.
        feature_channels: channels of the unembedded U-Net features.
        noisy_channels: channels of the noisy signal concatenated to them (0 for the deterministic baseline).
        hidden_channels: width of the head.
        out_channels: channels of the prediction.
        embed_dim: size of the time/condition embedding that modulates the head.
        local_channels: channels of full-resolution conditioning concatenated too (0: none).
    """

    def __init__(
        self,
        spatial_dims: int,
        feature_channels: int,
        noisy_channels: int,
        hidden_channels: int,
        out_channels: int,
        embed_dim: int,
        local_channels: int = 0,
    ) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.local_channels = int(local_channels)
        self.conv1 = conv(feature_channels + noisy_channels + self.local_channels, hidden_channels, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * hidden_channels))
        self.conv2 = conv(hidden_channels, out_channels, 3, padding=1)

    def forward(
        self, features: torch.Tensor, noisy: torch.Tensor | None, emb: torch.Tensor, local: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = [features] + [v.to(features.dtype) for v in (noisy, local) if v is not None]
        h = self.conv1(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        emb = emb.expand(h.shape[0], -1) if emb.shape[0] == 1 else emb
        scale, shift = self.film(emb).to(h.dtype).reshape(h.shape[0], -1, *([1] * (h.ndim - 2))).chunk(2, dim=1)
        return self.conv2(nn.functional.silu(h * (1 + scale) + shift))


class ForecastDiffusionUNet(DiffusionModelUNet):
    """3D diffusion U-Net that denoises a future NET2 mask given past visits, a treatment and a horizon.

    ``forward(x, timesteps, cond, treatment, horizon)``:

    * ``x``: (N, 1, D, H, W) noisy NET2 signal at ``timesteps`` (N,);
    * ``cond``: (N, C, D, H, W) conditioning volume, C = ``cond_channels``;
    * ``treatment``: (N,) int64 arm index, ``NULL_TREATMENT`` for "no treatment given";
    * ``horizon``: (N,) float weeks from the most recent past visit to the forecast visit.

    The last ``patient_channels`` channels of ``cond`` are patient-level features, constant in space (the whole-volume
    lesion load, :data:`~scripts.runtime.constants.LOAD_CHANNELS`): their spatial mean joins the treatment and horizon
    in the embedding, so every residual block of a training crop knows how active the whole brain was, also where the
    crop holds no lesion. With ``head_cond_channels`` k > 0 the first k channels of ``cond`` (the images and masks,
    :data:`~scripts.runtime.constants.CONDITION_CHANNELS` order) also reach the full-resolution head, so a voxel's
    logit can follow tissue borders finer than the patch (default 0: the shipped architecture).

    Returns the network's prediction (v, epsilon or x0, per the scheduler) with the shape of ``x``. Spatial sizes
    must be divisible by ``patch_size * 2 ** (len(channels) - 1)``. When ``cond`` is
    None, ``x`` must already hold the noisy signal and the conditioning concatenated (MONAI's ``DiffusionInferer``
    "concat" mode).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        cond_channels: int = len(CONDITION_CHANNELS),  # noqa: B008 (an int, fixed at import)
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: Sequence[int] | int = 1,
        norm_num_groups: int = 16,
        num_head_channels: Sequence[int] | int = 32,
        resblock_updown: bool = False,
        horizon_scale: float = 10.0,
        use_flash_attention: bool = False,
        noisy_channels: int = 1,
        patch_size: int = 2,
        head_channels: int = 16,
        patient_channels: int = len(LOAD_CHANNELS),  # noqa: B008 (an int, fixed at import)
        head_cond_channels: int = 0,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=channels[0],
            out_channels=channels[0],
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            resblock_updown=resblock_updown,
            num_class_embeds=NULL_TREATMENT + 1,
            use_flash_attention=use_flash_attention,
        )
        if not 0 <= patient_channels <= cond_channels:
            raise ValueError(f"patient_channels must be in [0, cond_channels={cond_channels}], got {patient_channels}")
        if not 0 <= head_cond_channels <= cond_channels:
            raise ValueError(
                f"head_cond_channels must be in [0, cond_channels={cond_channels}], got {head_cond_channels}"
            )
        self.head_cond_channels = int(head_cond_channels)
        self.cond_channels = cond_channels
        self.patient_channels = patient_channels
        self.noisy_channels = noisy_channels
        self.patch_size = patch_size
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        self.patch_embed = conv(noisy_channels + cond_channels, channels[0], patch_size, stride=patch_size)
        self.patch_unembed = conv_t(channels[0], head_channels, patch_size, stride=patch_size)
        self.class_embedding = TreatmentHorizonEmbedding(
            embed_dim=channels[0] * 4,
            num_treatments=NULL_TREATMENT + 1,
            horizon_scale=horizon_scale,
            patient_features=patient_channels,
        )
        self.head = VoxelHead(
            spatial_dims,
            head_channels,
            noisy_channels,
            head_channels,
            out_channels,
            channels[0] * 4,
            local_channels=self.head_cond_channels,
        )

    @staticmethod
    def condition_labels(
        treatment: torch.Tensor, horizon: torch.Tensor, patient: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pack treatment indices, horizons and patient-level features (N, F) into the (N, 2 + F) ``class_labels``
        the parent forward expects."""
        labels = torch.stack([treatment.reshape(-1).float(), horizon.reshape(-1).float()], dim=1)
        return labels if patient is None else torch.cat([labels, patient.float()], dim=1)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor | None = None,
        treatment: torch.Tensor | None = None,
        horizon: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        noisy = x[:, : self.noisy_channels] if self.noisy_channels else None
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        if class_labels is None:
            if treatment is None:
                treatment = torch.full((n,), NULL_TREATMENT, dtype=torch.long, device=x.device)
            if horizon is None:
                raise ValueError("horizon (weeks) is required")
            # x = [noisy, cond]: the patient channels are its last ones, constant in space
            patient = x[:, x.shape[1] - self.patient_channels :].flatten(2).mean(-1) if self.patient_channels else None
            class_labels = self.condition_labels(
                treatment.reshape(-1).expand(n), horizon.reshape(-1).expand(n), patient
            )
        h = super().forward(self.patch_embed(x), timesteps, context=context, class_labels=class_labels)
        # the first cond channels at full resolution: the patch embedding alone sees tissue borders at patch scale
        local = (
            x[:, self.noisy_channels : self.noisy_channels + self.head_cond_channels]
            if self.head_cond_channels
            else None
        )
        return self.head(self.patch_unembed(h), noisy, self.embedding(timesteps, class_labels, x.dtype), local)

    def embedding(self, timesteps: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The time + treatment/horizon embedding the U-Net adds in every residual block (recomputed for the head)."""
        t_emb = get_timestep_embedding(timesteps.reshape(-1), self.block_out_channels[0]).to(dtype)
        return self.time_embed(t_emb) + self.class_embedding(class_labels).to(dtype)


class DeterministicForecastNet(ForecastDiffusionUNet):
    """Baseline with the same inputs that predicts NET2 logits directly (no noisy input, timestep fixed at 0).

    ``forward(cond, treatment, horizon)`` returns (N, 1, D, H, W) logits; train with Dice + BCE.
    """

    def __init__(self, **kwargs) -> None:
        kwargs["noisy_channels"] = 0
        super().__init__(**kwargs)

    def forward(  # type: ignore[override]
        self, cond: torch.Tensor, treatment: torch.Tensor | None = None, horizon: torch.Tensor | None = None
    ) -> torch.Tensor:
        timesteps = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        return super().forward(cond, timesteps, cond=None, treatment=treatment, horizon=horizon)
