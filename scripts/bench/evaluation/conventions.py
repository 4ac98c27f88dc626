"""Evaluation conventions: the compared methods, their labels, fixed settings and the written conventions.

:data:`CONVENTIONS` goes verbatim into ``metrics.json`` and ``report.md``; every other module of the evaluation
follows it.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("diffusion", "deterministic", "unaware", "population", "regression", "reference", "oracle")


METHOD_LABELS: dict[str, str] = {
    "diffusion": "diffusion model (treatment-aware)",
    "deterministic": "deterministic network",
    "unaware": "diffusion model, treatment-unaware",
    "population": "population: training-split arm rate",
    "regression": "negative-binomial regression on past lesion counts",
    "reference": "observable reference: generator's posterior given the past counts",
    "oracle": "oracle: generator's true expected count",
}


COUNTERFACTUAL_METHODS: tuple[str, ...] = (
    "diffusion",
    "deterministic",
    "unaware",
    "population",
    "regression",
    "reference",
)


NOT_APPLICABLE = "not applicable: "
"""Prefix of the note of a metric the method cannot have (no mask, samples, interval or probabilities)."""


INTERVAL_LEVEL = 0.9


DISTANCE_MM = 10.0


BOOTSTRAP_RESAMPLES = 2000


CONVENTIONS: dict[str, str] = {
    "grid": "Forecasts and truth masks are compared on the case's reference grid (that of flair_1). Binary "
    "samples go there by nearest-neighbour resampling, probability maps by linear interpolation; the "
    "forecast mask is probability >= 0.5 (the written <arm>_mask.nii.gz).",
    "lesion": "A lesion is a 26-connected component. True counts are counted on the truth mask's own grid, "
    "forecast counts on the working grid of the samples (as in forecast.json).",
    "factual": "The factual forecast of a case is its datalist 'treatment' arm; it is compared with 'label'. Cases "
    "without a treatment or a label, or whose arm was not forecast, are left out of the factual metrics.",
    "dice": "Voxel Dice of the forecast mask. 'over active cases': mean over cases with at least one true lesion. "
    "'over all cases': empty forecast vs empty truth scores 1, an empty mask against a non-empty one 0.",
    "lesion_detection": "A true lesion is detected when a forecast lesion overlaps it by a voxel; a forecast lesion "
    "is matched when it overlaps a true lesion. Pooled over cases: precision = matched forecast "
    "lesions / forecast lesions, recall = detected true lesions / true lesions, F1 their "
    "harmonic mean. Precision is null without forecast lesions and recall without true lesions; "
    "F1 then follows scripts.lesions (precision 1 without forecast lesions, recall 1 without "
    "true lesions; null when both are absent). The per-case F1 is that of scripts.lesions (1 "
    "when both masks are empty). Per sample: the same detection for every sampled forecast "
    "mask (a method's K samples of a case count as K forecasts; the deterministic network's mask "
    "as one), pooled over samples and cases.",
    "count": "Expected count: diffusion models the mean lesion count over samples; deterministic network the "
    "lesion count of its mask (working grid); population the training-split arm rate (NET2 lesions per "
    "week, sum of counts over sum of horizons; arms absent from the training split use the pooled rate) "
    "times the horizon; regression the mean of its fitted negative binomial; observable reference the "
    "mean of its posterior-predictive count; oracle the generator's true expected count. MAE in "
    "lesions; Spearman rank correlation (null when fewer than 2 cases or a constant series).",
    "interval": "90% interval: diffusion models the 5th-95th percentiles of the sample counts (linear "
    "interpolation); population and oracle the 5% and 95% quantiles of a Poisson with the expected "
    "count; regression the 5% and 95% quantiles of its fitted negative binomial; observable reference "
    "those of its posterior-predictive count (a Poisson mixture); the deterministic "
    "network gives none. Coverage: share of cases with lo <= true count <= hi.",
    "activity": "Active = at least one true NET2 lesion. P(active): diffusion models the share of samples with a "
    "lesion; deterministic network its largest voxel probability; population and oracle "
    "1 - exp(-expected count) (Poisson); regression 1 - P(0) of its negative binomial; observable "
    "reference 1 - P(0) of its posterior-predictive count. AUC and average "
    "precision from scikit-learn; balanced accuracy of P(active) >= 0.5. Null when only one class is "
    "present.",
    "calibration": "Voxel probabilities of the factual forecast against the truth, pooled over cases, on the brain "
    "voxels of the region map plus any voxel where the forecast or the truth is non-zero (the "
    "empty background outside the head is trivially calibrated and would swamp the figure). "
    "10 equal-width bins; ECE = sum over bins of (bin share) x |mean probability - observed "
    "frequency|.",
    "ged": "Generalized energy distance D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with d = 1 - IoU, "
    "d(empty, empty) = 0; S, S' distinct forecast samples (all ordered pairs i != j; a single sample "
    "gives 0 for that term), Y the one truth mask, so E[d(Y, Y')] = 0. Mean over cases.",
    "location": "Distance from each true lesion's centroid to the nearest forecast-mask lesion's centroid (world "
    "mm); none where the forecast mask is empty. Regions (periventricular, juxtacortical, "
    "infratentorial, deep white matter) from scripts.runtime.regions (region map of the case's own "
    "images), majority vote over the lesion's voxels.",
    "spatial": "Where each voxel probability map (factual arm) puts its mass, on the domain: the parenchyma of the "
    "generator's tissue map (synthetic) or the brain the region map finds (real data). AP = scikit-learn "
    "average precision on the domain's voxels against the realised mask, and against the share of "
    "independent outcome draws with a lesion (each voxel a positive with that weight and a negative with "
    "the rest: the draws pooled); within case = mean of the cases' APs, pooled = one AP over every "
    "case's domain voxels (probabilities binned in 50 log-spaced bins per decade from 1e-8, ties within "
    "a bin share one threshold). LL = Bernoulli log-likelihood per domain voxel, "
    "probabilities clipped to [1e-6, 1 - 1e-6], pooled over cases. The location oracle is the generator's "
    "true probability given the past and the expected count (truth/<id>_location_oracle.nii.gz); AP "
    "ratios are against it. The region prior knows only the generator's region weights of a new "
    "lesion's centre, each spread evenly over its region and scaled to the oracle's mass "
    "(truth/<id>_region_prior.nii.gz). The oracle's per-sample lesion detection scores the cohort's "
    "independent outcome draws of the factual arm against the realised mask as if they were samples. "
    "Lesion sizes: 26-connected lesions of every sample (working grid) and of the true masks (their own "
    "grid), pooled.",
    "counterfactual": "With truth/<id>.json: every forecast arm against the generator's true expected count "
    "(count error) and true counterfactual mask (Dice, lesion F1, GED). Effects against placebo "
    "per case: count ratio (null where the predicted placebo count is 0) and count difference; "
    "error = predicted - true. Cohort rate ratio = sum of the arm's expected counts / sum of "
    "placebo's over the same cases. Ranking: over pairs of arms with different true strength, "
    "the share where the stronger arm has the lower predicted count (a tie scores 0.5); 'exact' "
    "when every pair is right. Per case the strength is the patient's true efficacy; for the "
    "cohort, arms are ordered by their summed expected counts (predicted against true). The "
    "treatment-unaware model forecasts every arm alike.",
    "comparison": "Diffusion model against each baseline on the same factual cases: differences of count MAE and "
    "activity AUC (diffusion minus baseline) with 95% percentile intervals of a paired bootstrap "
    f"({BOOTSTRAP_RESAMPLES} resamples of the cases with replacement, seed 0; resamples holding one "
    "activity class only are skipped for the AUC).",
}


BASELINE_DESCRIPTIONS: dict[str, str] = {
    "deterministic": "the same network architecture trained to output the NET2 mask directly (Dice + cross-entropy), "
    "thresholded at 0.5: one forecast, no samples",
    "unaware": "the diffusion model trained with the treatment always dropped, forecast with the null treatment: "
    "the same forecast under every arm",
    "population": "each arm's NET2 rate in the training split times the horizon, the same for every patient",
    "regression": "a negative-binomial (NB2) regression of the NET2 count on the past visits' lesion counts and T2 "
    "volumes (log1p), the arm and the horizon (offset), fitted on the training split with statsmodels: "
    "what a trial statistician would fit without images",
    "reference": "the generator's own posterior-predictive count given what the past visits show (the NET2 count "
    "between them and the Gd-enhancing count at visit 0; scripts/bench/synthetic/reference.py): the best "
    "count forecast the inputs allow under the generator's model, up to what the T2 load adds "
    "(synthetic cohorts only)",
    "oracle": "the generator's true expected count of the patient under the arm: the best any count forecast can "
    "do on average (an upper bound for count and activity)",
}
