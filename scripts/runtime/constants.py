"""Vocabulary shared by every module: treatment arms, image keys and the conditioning channel layout.

The channel layout here is the single source of truth; ``bundle/configs/metadata.json`` documents the same
order and a test keeps the two in step.
"""

from __future__ import annotations

ARMS: tuple[str, ...] = (
    "placebo",
    "laquinimod",
    "interferon_beta_1a",
    "glatiramer_acetate",
    "dimethyl_fumarate",
    "ocrelizumab",
)
"""Treatment arms, in the order of their embedding index."""

NULL_TREATMENT: int = len(ARMS)
"""Embedding index of the "no treatment given" token (classifier-free guidance and unknown arm)."""

MRI_MODALITIES: tuple[str, ...] = ("flair", "t1", "t2", "pd", "t1gd")
MASK_MODALITIES: tuple[str, ...] = ("t2les", "gadles")
VISITS: tuple[int, ...] = (0, 1)

IMAGE_KEYS: tuple[str, ...] = tuple(
    f"{modality}_{visit}" for visit in VISITS for modality in MRI_MODALITIES + MASK_MODALITIES
) + ("net2_1",)
"""Datalist image keys in conditioning-channel order: visit 0 MRI and masks, visit 1 MRI and masks, earlier NET2."""

MASK_KEYS: tuple[str, ...] = tuple(k for k in IMAGE_KEYS if k.split("_")[0] in MASK_MODALITIES) + ("net2_1",)
MRI_KEYS: tuple[str, ...] = tuple(k for k in IMAGE_KEYS if k not in MASK_KEYS)

LOAD_FEATURES: tuple[str, ...] = ("lesions", "volume")
LOAD_CHANNELS: tuple[str, ...] = tuple(f"{feature}_{k}" for k in MASK_KEYS for feature in LOAD_FEATURES)
"""Whole-volume lesion load of each lesion mask, constant in space: ``lesions_<key>`` = log(1 + number of lesions,
26-connected) and ``volume_<key>`` = log(1 + lesion volume in mL), 0 when the mask is absent. They carry the
patient-level activity (past NET2 and Gd lesions anywhere in the brain) into every training crop."""

CONDITION_CHANNELS: tuple[str, ...] = IMAGE_KEYS + tuple(f"available_{k}" for k in IMAGE_KEYS) + LOAD_CHANNELS
"""Conditioning channels: one per image key, then one constant availability indicator per image key, then the
constant lesion-load channels (:data:`LOAD_CHANNELS`)."""

REFERENCE_KEY_PRIORITY: tuple[str, ...] = ("flair_1",) + tuple(f"{m}_1" for m in MRI_MODALITIES if m != "flair")
"""The reference grid of a case is that of the first present key in this order (contract)."""

DEFAULT_HORIZON_WEEKS: float = 24.0
LABEL_KEY: str = "label"


def arm_index(name: str | None) -> int:
    """Map a treatment name to its embedding index; ``None`` or ``""`` maps to :data:`NULL_TREATMENT`.

    Raises:
        ValueError: for an unknown name, listing the valid arms.
    """
    if name is None or name == "":
        return NULL_TREATMENT
    try:
        return ARMS.index(str(name))
    except ValueError:
        raise ValueError(f"unknown treatment {name!r}; valid arms are: {', '.join(ARMS)}") from None


LOADED_KEYS: tuple[str, ...] = IMAGE_KEYS + (LABEL_KEY,)
"""Keys holding a NIfTI path in a datalist entry."""
BINARY_KEYS: tuple[str, ...] = MASK_KEYS + (LABEL_KEY,)
"""Keys holding binary masks (interpolated linearly, then thresholded at 0.5)."""
VISIT1_MRI_KEYS: tuple[str, ...] = tuple(k for k in MRI_KEYS if k.endswith("_1"))
VISIT0_KEYS: tuple[str, ...] = tuple(k for k in IMAGE_KEYS if k.endswith("_0"))
# channel of each image key's volume and of its availability indicator in ``cond``
VOLUME_CHANNEL: dict[str, int] = {k: CONDITION_CHANNELS.index(k) for k in IMAGE_KEYS}
AVAILABLE_CHANNEL: dict[str, int] = {k: CONDITION_CHANNELS.index(f"available_{k}") for k in IMAGE_KEYS}
LOAD_CHANNEL: dict[str, list[int]] = {
    k: [CONDITION_CHANNELS.index(f"{f}_{k}") for f in LOAD_FEATURES] for k in MASK_KEYS
}

# --- limits on inputs (each can be raised where it is named: the bundle's config or the function's argument) ---
RESERVED_OUTPUT_NAMES: tuple[str, ...] = (
    "summary.csv",
    "metrics.json",
    "report.md",
    "evaluation_cases",
    "reliability.png",
    "count_scatter.png",
    "roc.png",
    "effects.png",
)
"""Names the forecast and evaluation commands write at the top of their output folder: no case id may take one."""
MAX_ID_LENGTH: int = 128
"""Longest case id, in UTF-8 bytes: the id names a folder and, with up to about 70 bytes of temporary-name suffix,
its staging folder; file systems refuse names over 255 bytes."""
MAX_DATALIST_BYTES: int = 64 * 2**20
"""Largest datalist file read (64 MiB: about 100,000 cases)."""
MAX_IMAGE_VOXELS: int = 2**28
"""Default largest image read (voxels, from its header, before any data is read): 268 million, e.g. 640^3, about
1 GiB as float32; ``inference.json``'s ``max_image_voxels`` raises it."""
MAX_NUM_SAMPLES: int = 256
"""Default largest number of samples per case and arm (``inference.json``'s ``max_num_samples`` raises it): every
sample of a case is held in memory at once (6 arms x 256 samples x 64^3 is about 6 GiB in float32)."""
