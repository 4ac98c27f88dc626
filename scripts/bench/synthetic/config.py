"""Settings of the synthetic generator: version, visit interval, tissue codes, arm efficacies and
:class:`CohortConfig` (rates and distributions).
"""

from __future__ import annotations

from dataclasses import dataclass

from scripts.runtime.constants import ARMS

GENERATOR_VERSION = "1.0"


VISIT_INTERVAL_WEEKS = 24.0
"""Weeks between visit 0 and visit 1 (the past, untreated interval)."""


TISSUE_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",  # extracerebral CSF, sulci, interhemispheric fissure, cisterns
    2: "cortical_gm",
    3: "white_matter",  # supratentorial white matter
    4: "ventricles",  # lateral, third and fourth ventricles
    5: "infratentorial_wm",  # brainstem and cerebellar white matter
    6: "infratentorial_gm",  # cerebellar cortex
    7: "deep_gm",  # thalamus, lentiform nucleus, caudate head
}
"""Codes of the tissue label map written to ``truth/<id>_tissue.nii.gz``."""


PARENCHYMA_LABELS: tuple[int, ...] = (2, 3, 5, 6, 7)
"""Tissue codes a lesion may occupy."""


# Approximate efficacy against placebo on new/enlarging T2 lesions (1 - rate ratio). These are rounded,
# approximate figures meant to give the arms a realistic ordering and spread, not exact trial estimates:
# - laquinimod 0.30: ALLEGRO (Comi et al., NEJM 2012), about 30% fewer new/enlarging T2 lesions;
# - interferon beta-1a 0.55: placebo-controlled trials of interferon beta-1a report roughly a third (i.m.) to
#   three quarters (s.c., PRISMS) fewer active T2 lesions; 0.55 is an approximate middle value, close to
#   glatiramer acetate, consistent with head-to-head trials finding the two similar;
# - glatiramer acetate 0.54: CONFIRM (Fox et al., NEJM 2012) reference arm, about 54% fewer NET2 lesions;
# - dimethyl fumarate 0.75: DEFINE (Gold et al., NEJM 2012, about 85%) and CONFIRM (about 71%) for the
#   twice-daily dose; 0.75 sits between the two;
# - ocrelizumab 0.93: OPERA I/II (Hauser et al., NEJM 2017) found 77-83% fewer NET2 lesions than s.c.
#   interferon beta-1a; 1 - (1 - 0.55) * (1 - 0.8) is about 0.91, rounded up to 0.93.
ARM_EFFICACY: dict[str, float] = {
    "placebo": 0.0,
    "laquinimod": 0.30,
    "interferon_beta_1a": 0.55,
    "glatiramer_acetate": 0.54,
    "dimethyl_fumarate": 0.75,
    "ocrelizumab": 0.93,
}


@dataclass(frozen=True)
class CohortConfig:
    """Rates and distributions of the generator (defaults calibrated for a realistic placebo arm)."""

    net2_rate: float = 3.5
    """Mean NET2 count per 24 weeks, untreated, at activity 1 (the cohort mean activity)."""
    activity_shape: float = 0.5
    """Gamma shape of the activity across patients (mean 1); 0.5 gives ~35-40% inactive placebo patients."""
    activity_drift_sd: float = 0.25
    """SD of the log-normal, mean-preserving change of activity from the past to the forecast interval."""
    efficacy_gamma: float = 0.3
    """Exponent of activity in the patient efficacy exponent k_p (stronger effect at higher activity)."""
    efficacy_reference_activity: float = 2.0
    """Activity at which k_p = 1; ~ the activity-weighted median, so cohort rate ratios match ARM_EFFICACY."""
    efficacy_sd: float = 0.2
    """SD of the patient-specific log-normal noise on k_p."""
    baseline_lesions: float = 45.0
    """Mean number of chronic lesions at visit 0 for a patient of mean activity and disease duration."""
    recent_window_weeks: float = 16.0
    """Lesions that formed in this window before visit 0 are 'recent' and may still enhance at visit 0."""
    gd_duration_mean_weeks: float = 6.0
    """Mean duration of gadolinium enhancement of a new lesion (gamma, shape 2)."""
    enlarging_fraction: float = 0.2
    """Share of NET2 events that are enlargements of existing lesions (the rest are new lesions)."""
    chronic_volume_median_mm3: float = 150.0
    chronic_volume_sigma: float = 1.1
    new_volume_median_mm3: float = 150.0
    new_volume_sigma: float = 1.0
    enlarge_volume_median_mm3: float = 80.0
    enlarge_volume_sigma: float = 0.8
    min_volume_mm3: float = 8.0
    max_volume_mm3: float = 8000.0
    efficacy: tuple[tuple[str, float], ...] = tuple(ARM_EFFICACY.items())
    """Arm efficacies against placebo (see :data:`ARM_EFFICACY`)."""

    def arm_efficacy(self) -> dict[str, float]:
        """The arm efficacies as a dict, in :data:`ARMS` order."""
        eff = dict(self.efficacy)
        return {arm: float(eff[arm]) for arm in ARMS}
