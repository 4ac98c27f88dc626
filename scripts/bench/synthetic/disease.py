"""Lesions: placement of chronic lesions and NET2 events in the phantom, patient efficacy, lesion maps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scripts.bench.synthetic.anatomy import Anatomy, Grid
from scripts.bench.synthetic.config import CohortConfig
from scripts.runtime.lesions import CONNECTIVITY_26, label_lesions

# Region sampling weights of lesion centres (periventricular preference; new lesions also cluster near old ones).
_CHRONIC_REGION_WEIGHTS = {"periventricular": 0.45, "deep_white": 0.28, "juxtacortical": 0.15, "infratentorial": 0.12}


NEW_REGION_WEIGHTS = {
    "near_lesion": 0.20,
    "periventricular": 0.35,
    "deep_white": 0.25,
    "juxtacortical": 0.13,
    "infratentorial": 0.07,
}


@dataclass
class Lesion:
    """One lesion or NET2 event: its voxels (flat indices) and what the images and the truth need of it."""

    voxels: np.ndarray
    kind: str  # "chronic", "recent", "new" or "enlarging"
    region: str
    centre_mm: np.ndarray  # grid frame
    nominal_volume_mm3: float
    hyper: float  # FLAIR/T2/PD contrast fraction
    t1_dark: float  # T1 hypointensity fraction
    enhance: float = 0.0  # T1-Gd enhancement fraction when enhancing
    onset_week: float | None = None
    gd_duration_weeks: float | None = None
    parent: int | None = None  # for enlargements: index of the prior lesion (component) that grew


@dataclass(frozen=True)
class PlacementContext:
    """The geometry of the prior lesions that event placement needs (flat over the grid's voxels)."""

    prior: np.ndarray  # bool: prior lesion voxels
    components: np.ndarray  # int: 26-connected component of each prior voxel (0 elsewhere)
    n_prior: int
    blocked_new: np.ndarray  # bool: the prior lesions dilated by one voxel (new lesions may not touch them)
    near: np.ndarray | None  # candidate voxels near (but not touching) a prior lesion
    parent_weights: np.ndarray | None  # probability of each prior component to be an enlargement's parent


_NEIGHBOURS6 = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


class LesionPlacer:
    """Rasterizes ovoid lesions on a grid and places NET2 events so that they never touch each other."""

    def __init__(self, grid: Grid, anatomy: Anatomy, config: CohortConfig, rng: np.random.Generator) -> None:
        self.grid = grid
        self.anatomy = anatomy
        self.config = config
        self.rng = rng
        self.spacing = np.asarray(grid.spacing)
        self.shape = np.asarray(grid.shape)
        tissue = anatomy.tissue
        wm = tissue == 3
        near = max(3.0, 1.01 * float(self.spacing.max()))
        self.abut_mm = near
        self.pv_mm = max(6.0, 1.01 * float(self.spacing.max()))
        pv = wm & (anatomy.dist_ventricle <= self.pv_mm)
        jc = wm & (anatomy.dist_cortex <= near) & ~pv
        self.candidates: dict[str, np.ndarray] = {
            "periventricular": np.flatnonzero(pv),
            "juxtacortical": np.flatnonzero(jc),
            "deep_white": np.flatnonzero(wm & ~pv & ~jc),
            "infratentorial": np.flatnonzero(tissue == 5),
            "any": np.flatnonzero(wm | (tissue == 5) | (tissue == 7)),
        }
        if self.candidates["any"].size == 0:
            self.candidates["any"] = np.flatnonzero(anatomy.parenchyma)
        if self.candidates["any"].size == 0:
            raise ValueError("the grid holds no brain parenchyma; enlarge --shape or --spacing")
        self.flat_parenchyma = anatomy.parenchyma.ravel()

    # -- geometry ------------------------------------------------------------------------------------------
    def _draw_volume(self, median: float, sigma: float) -> float:
        v = median * math.exp(sigma * self.rng.normal())
        return float(np.clip(v, self.config.min_volume_mm3, self.config.max_volume_mm3))

    def _draw_axes(self, volume: float, elongated: bool) -> np.ndarray:
        """Semi-axes (mm, longest first) of an ovoid of the given volume."""
        lo = 0.35 if elongated else 0.55
        b = self.rng.uniform(lo, 1.0)
        c = self.rng.uniform(lo, 1.0) * b
        a = (3 * volume / (4 * np.pi * b * c)) ** (1 / 3)
        return np.array([a, a * b, a * c])

    def _orientation(self, long_axis: np.ndarray | None) -> np.ndarray:
        """Rotation whose first column is ``long_axis`` (or random); columns are the ovoid's axes."""
        m = self.rng.normal(size=(3, 3))
        if long_axis is not None and np.linalg.norm(long_axis) > 1e-6:
            m[:, 0] = long_axis
        q, r = np.linalg.qr(m)
        return q * np.sign(np.diag(r))

    def _ventricle_normal(self, flat: int) -> np.ndarray | None:
        """Direction away from the ventricles at a voxel (Dawson's fingers point along it)."""
        ijk = np.array(np.unravel_index(flat, self.grid.shape))
        dv = self.anatomy.dist_ventricle
        g = np.zeros(3)
        for ax in range(3):
            hi = ijk.copy()
            lo = ijk.copy()
            hi[ax] = min(hi[ax] + 1, self.shape[ax] - 1)
            lo[ax] = max(lo[ax] - 1, 0)
            g[ax] = (dv[tuple(hi)] - dv[tuple(lo)]) / self.spacing[ax]
        return g if np.linalg.norm(g) > 1e-6 else None

    def rasterize(
        self, centre: np.ndarray, semi: np.ndarray, rot: np.ndarray, seed_flat: int | None = None
    ) -> np.ndarray:
        """Flat indices of the voxels whose centres lie in the ovoid, clipped to parenchyma.

        The voxel holding the centre (or ``seed_flat``) is always kept, so a lesion smaller than a voxel still has
        one voxel; only the 26-connected piece containing it is returned, so the lesion is a single component.
        """
        seed = (
            np.array(np.unravel_index(seed_flat, self.grid.shape))
            if seed_flat is not None
            else np.clip(np.rint(centre / self.spacing).astype(int), 0, self.shape - 1)
        )
        reach = float(semi.max())
        lo = np.maximum(np.floor((centre - reach) / self.spacing).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach) / self.spacing).astype(int) + 1, self.shape)
        lo = np.minimum(lo, seed)
        hi = np.maximum(hi, seed + 1)
        offs = [np.arange(lo[i], hi[i]) * self.spacing[i] - centre[i] for i in range(3)]
        # Coordinates along the ovoid's own axes: q_j = sum_i rot[i, j] * d_i.
        inside = np.zeros(tuple(hi - lo), np.float64)
        for j in range(3):
            q = (
                rot[0, j] * offs[0][:, None, None]
                + rot[1, j] * offs[1][None, :, None]
                + rot[2, j] * offs[2][None, None, :]
            )
            inside += (q / semi[j]) ** 2
        mask = inside <= 1.0
        box = tuple(slice(lo[i], hi[i]) for i in range(3))
        mask &= self.anatomy.parenchyma[box]
        local_seed = tuple(seed - lo)
        mask[local_seed] = True
        labels, _ = label_lesions(mask)
        mask = labels == labels[local_seed]
        idx = np.nonzero(mask)
        return np.ravel_multi_index(tuple(idx[i] + lo[i] for i in range(3)), self.grid.shape)

    def region_of(self, voxels: np.ndarray) -> str:
        """Anatomical region of a lesion from its voxels.

        Infratentorial: mostly in the brainstem/cerebellum. Periventricular: a voxel within ``pv_mm`` (6 mm, at
        least one voxel) of the ventricle wall. Juxtacortical: the voxel nearest the lesion's centroid is in or
        next to the cortex (at coarse grids much white matter is one voxel from cortex, so a single touching voxel
        would call too many lesions juxtacortical). Else deep grey or deep white matter.
        """
        tissue = self.anatomy.tissue.ravel()[voxels]
        if np.mean(np.isin(tissue, (5, 6))) >= 0.5:
            return "infratentorial"
        if self.anatomy.dist_ventricle.ravel()[voxels].min() <= self.pv_mm:
            return "periventricular"
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        nearest = ijk[np.argmin(((ijk - ijk.mean(0)) ** 2).sum(1))]
        if self.anatomy.dist_cortex[tuple(nearest)] <= self.abut_mm:
            return "juxtacortical"
        if np.mean(tissue == 7) >= 0.5:
            return "deep_grey"
        return "deep_white"

    def _pick_region(self, weights: dict[str, float], near: np.ndarray | None) -> np.ndarray:
        names = [
            k
            for k in weights
            if (k == "near_lesion" and near is not None and near.size)
            or (k != "near_lesion" and self.candidates[k].size)
        ]
        if not names:
            return self.candidates["any"]
        w = np.array([weights[k] for k in names])
        name = names[int(self.rng.choice(len(names), p=w / w.sum()))]
        return near if name == "near_lesion" else self.candidates[name]

    def _ovoid_at(self, flat: int, volume: float, candidates_are_pv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre (jittered within the voxel), semi-axes and orientation of an ovoid started at voxel ``flat``."""
        ijk = np.array(np.unravel_index(flat, self.grid.shape), float)
        centre = (ijk + self.rng.uniform(-0.5, 0.5, 3)) * self.spacing
        pv = candidates_are_pv or self.anatomy.dist_ventricle.ravel()[flat] <= 8.0
        long_axis = self._ventricle_normal(flat) if pv else None
        semi = self._draw_axes(volume, elongated=long_axis is not None)
        return centre, semi, self._orientation(long_axis)

    # -- chronic lesions (may be confluent) --------------------------------------------------------------------
    def chronic(self, n: int) -> list[Lesion]:
        """Baseline chronic lesions; they may overlap and merge (confluent lesions are common)."""
        cfg = self.config
        lesions = []
        for _ in range(n):
            cand = self._pick_region(_CHRONIC_REGION_WEIGHTS, None)
            flat = int(cand[self.rng.integers(cand.size)])
            volume = self._draw_volume(cfg.chronic_volume_median_mm3, cfg.chronic_volume_sigma)
            centre, semi, rot = self._ovoid_at(flat, volume, cand is self.candidates["periventricular"])
            vox = self.rasterize(centre, semi, rot)
            lesions.append(
                Lesion(
                    vox,
                    "chronic",
                    self.region_of(vox),
                    centre,
                    volume,
                    hyper=self.rng.uniform(0.6, 1.0),
                    t1_dark=self.rng.uniform(0.2, 1.0),
                )
            )
        return lesions

    # -- non-touching events ---------------------------------------------------------------------------------
    def prepare(self, prior_mask: np.ndarray, recent_mask: np.ndarray | None = None) -> PlacementContext:
        """What placing events next to ``prior_mask`` needs (no random draws): reuse it for many placements."""
        prior = prior_mask.ravel()
        components, n_prior = label_lesions(prior_mask)
        components = components.ravel()
        blocked_new = ndimage.binary_dilation(prior_mask, CONNECTIVITY_26).ravel()
        near = None
        parent_weights = None
        if n_prior:
            dist = ndimage.distance_transform_edt(~prior_mask, sampling=self.grid.spacing).ravel()
            near = self.candidates["any"]  # white matter (supra- and infratentorial) and deep grey matter
            near = near[(dist[near] > 1.01 * self.spacing.max()) & (dist[near] <= 15.0)]
            # Enlargement parents: prior components, bigger and recent lesions more likely to grow.
            sizes = np.bincount(components, minlength=n_prior + 1)[1:].astype(float)
            parent_weights = np.sqrt(sizes)
            if recent_mask is not None and recent_mask.any():
                recent_ids = np.unique(components[recent_mask.ravel() & prior])
                parent_weights[recent_ids[recent_ids > 0] - 1] *= 3.0
            parent_weights /= parent_weights.sum()
        return PlacementContext(prior, components, n_prior, blocked_new, near, parent_weights)

    def place_events(
        self,
        kinds: Sequence[str],
        prior_mask: np.ndarray,
        recent_mask: np.ndarray | None = None,
        new_volume: tuple[float, float] | None = None,
        context: PlacementContext | None = None,
    ) -> list[Lesion]:
        """Place events (``"new"`` or ``"enlarging"``) that touch neither each other nor, for new lesions, any
        prior lesion; an enlargement is the newly grown, connected voxels next to one prior lesion.

        Every event is a single 26-connected component of >= 1 voxel, and no two events are 26-adjacent, so the
        connected components of the union of any subset of the events equal that subset's size. ``context``
        (:meth:`prepare` of the same masks) saves recomputing the masks' geometry.
        """
        cfg = self.config
        ctx = context or self.prepare(prior_mask, recent_mask)
        prior, prior_components, n_prior = ctx.prior, ctx.components, ctx.n_prior
        near, parent_weights = ctx.near, ctx.parent_weights
        blocked_new = ctx.blocked_new.copy()  # new lesions must not touch old ones
        blocked_rim = np.zeros(prior.size, bool)  # enlargements must not touch other events
        med, sig = new_volume or (cfg.new_volume_median_mm3, cfg.new_volume_sigma)
        events: list[Lesion] = []
        for kind in kinds:
            ev = None
            if kind == "enlarging" and n_prior:
                ev = self._enlarge(prior, prior_components, parent_weights, blocked_rim)
            if ev is None:  # a new lesion (also the fallback when no prior lesion can grow)
                ev = self._new_lesion(med, sig, near, blocked_new | blocked_rim)
            events.append(ev)
            # Block the event's 26-neighbourhood for every later event.
            grown = self._dilate_flat(ev.voxels)
            blocked_new[grown] = True
            blocked_rim[grown] = True
        return events

    def _dilate_flat(self, voxels: np.ndarray) -> np.ndarray:
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        offs = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
        nb = (ijk[:, None, :] + offs[None]).reshape(-1, 3)
        nb = nb[np.all((nb >= 0) & (nb < self.shape), 1)]
        return np.unique(np.ravel_multi_index(nb.T, self.grid.shape))

    def _new_lesion(self, median: float, sigma: float, near: np.ndarray | None, blocked: np.ndarray) -> Lesion:
        # The region is kept for several tries so crowded regions (periventricular rims of confluent lesions) are
        # not silently under-sampled; later rounds draw smaller lesions so crowded brains still find room.
        for round_ in range(4):
            cand = self._pick_region(NEW_REGION_WEIGHTS, near)
            free = cand[~blocked[cand]]
            if free.size == 0:
                continue
            for _ in range(15):
                flat = int(free[self.rng.integers(free.size)])
                volume = self._draw_volume(median, sigma) * 0.5 ** max(0, round_ - 1)
                centre, semi, rot = self._ovoid_at(flat, volume, cand is self.candidates["periventricular"])
                vox = self.rasterize(centre, semi, rot)
                if not blocked[vox].any():
                    return self._acute(vox, "new", centre, volume)
        # Exhaustive fallback: a single-voxel lesion at any free parenchyma voxel.
        free = np.flatnonzero(self.flat_parenchyma & ~blocked)
        if free.size == 0:
            raise RuntimeError("no room left for a new lesion; the grid is too small for this lesion load")
        flat = int(free[self.rng.integers(free.size)])
        centre = np.array(np.unravel_index(flat, self.grid.shape), float) * self.spacing
        return self._acute(np.array([flat]), "new", centre, self.config.min_volume_mm3)

    def _enlarge(
        self, prior: np.ndarray, components: np.ndarray, weights: np.ndarray, blocked: np.ndarray
    ) -> Lesion | None:
        cfg = self.config
        shape = self.grid.shape
        for _ in range(30):
            parent = int(self.rng.choice(weights.size, p=weights)) + 1
            vox = np.flatnonzero(components == parent)
            ijk = np.stack(np.unravel_index(vox, shape), 1)
            # Outward 6-neighbours of the parent that are free parenchyma: possible seeds of growth.
            nb = (ijk[:, None, :] + _NEIGHBOURS6[None]).reshape(-1, 3)
            nb = nb[np.all((nb >= 0) & (nb < self.shape), 1)]
            nb_flat = np.unique(np.ravel_multi_index(nb.T, shape))
            nb_flat = nb_flat[self.flat_parenchyma[nb_flat] & ~prior[nb_flat] & ~blocked[nb_flat]]
            if nb_flat.size == 0:
                continue
            seed = int(nb_flat[self.rng.integers(nb_flat.size)])
            seed_mm = np.array(np.unravel_index(seed, shape), float) * self.spacing
            parent_mm = ijk.mean(0) * self.spacing
            outward = seed_mm - parent_mm
            volume = self._draw_volume(cfg.enlarge_volume_median_mm3, cfg.enlarge_volume_sigma)
            semi = self._draw_axes(volume, elongated=False)
            rot = self._orientation(outward)
            # The bud grows out of the parent: centred half a semi-axis beyond the seed voxel.
            centre = seed_mm + 0.5 * semi[2] * outward / (np.linalg.norm(outward) + 1e-6)
            bud = self.rasterize(centre, semi, rot, seed_flat=seed)
            rim = bud[~prior[bud]]
            rim = self._component_with(rim, seed)
            if blocked[rim].any():
                rim = np.array([seed])  # fall back to the single seed voxel, which is free
            ev = self._acute(rim, "enlarging", seed_mm, volume)
            ev.parent = parent - 1
            return ev
        return None

    def _component_with(self, voxels: np.ndarray, seed: int) -> np.ndarray:
        """The 26-connected piece of ``voxels`` that contains ``seed``."""
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        lo = ijk.min(0)
        local = np.zeros(tuple(ijk.max(0) - lo + 1), bool)
        local[tuple((ijk - lo).T)] = True
        labels, _ = label_lesions(local)
        seed_local = tuple(np.array(np.unravel_index(seed, self.grid.shape)) - lo)
        keep = labels[tuple((ijk - lo).T)] == labels[seed_local]
        return voxels[keep]

    def _acute(self, voxels: np.ndarray, kind: str, centre: np.ndarray, volume: float) -> Lesion:
        return Lesion(
            voxels,
            kind,
            self.region_of(voxels),
            centre,
            volume,
            hyper=self.rng.uniform(0.75, 1.0),
            t1_dark=self.rng.uniform(0.25, 0.7),
            enhance=self.rng.uniform(0.7, 1.0),
        )


def patient_efficacy(arm_efficacy: dict[str, float], exponent: float) -> dict[str, float]:
    """Patient-level efficacy ``e_p(a) = 1 - (1 - e_a) ** k_p``; monotone in ``e_a`` for any ``k_p > 0``."""
    return {arm: float(1.0 - (1.0 - e) ** exponent) for arm, e in arm_efficacy.items()}


def lesion_maps(lesions: Iterable[Lesion], n_vox: int, enhancing: set[int]) -> dict[str, np.ndarray]:
    """Per-voxel lesion contrast fractions (max over overlapping lesions)."""
    hyper = np.zeros(n_vox, np.float32)
    dark = np.zeros(n_vox, np.float32)
    gd = np.zeros(n_vox, np.float32)
    for i, les in enumerate(lesions):
        v = les.voxels
        hyper[v] = np.maximum(hyper[v], les.hyper)
        dark[v] = np.maximum(dark[v], les.t1_dark)
        if i in enhancing:
            gd[v] = np.maximum(gd[v], les.enhance)
    return {"hyper": hyper, "dark": dark, "gd": gd}
