"""Lesions of the domain-randomised scenes: shape, inner structure, appearance and placement.

A lesion is a star-shaped, lobulated or spiculated blob with a normalised radius ``q`` (0 centre, 1 border).
Its inner structure hangs on ``q``: necrotic core, enhancing rim, ground-glass with a solid part, calcification,
cavitation, and an unlabelled halo (oedema). It is drawn on the working grid (see ``scene_anatomy``) and composited
into the rendered tissue image with a soft border. Its label lives on the acquired grid: acquired voxels at least
half covered, the largest 26-connected part only, so each lesion is one connected component of the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scene_anatomy import VESSEL, WorkGrid, in_tissues, random_rotation, smooth_noise

# Closest two lesions may come (mm, in-plane; adjacent acquired slices count as 1 mm apart), so that the bundle's
# 1.5 mm nearest-neighbour resampling never joins them into one 26-connected component.
SEPARATION_MM = 3.5
MIN_DIAMETER_MM = 2.5


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class LesionShape:
    """Boundary radius ``f(u)`` over unit directions: broad lobes plus optional spicules around random directions,
    stretched and rotated, rescaled to unit equivalent radius (volume of the unit ball)."""

    def __init__(self, rng: np.random.Generator, spiculated: bool = False):
        n_lobes, n_spikes = int(rng.integers(1, 6)), int(rng.integers(8, 25) if spiculated else rng.integers(0, 5))
        self.dirs = rng.standard_normal((n_lobes + n_spikes, 3))
        self.dirs /= np.linalg.norm(self.dirs, axis=1, keepdims=True)
        spike_amp = (0.3, 0.9) if spiculated else (0.05, 0.15)
        self.amps = np.concatenate([rng.uniform(0.1, 0.5, n_lobes), rng.uniform(*spike_amp, n_spikes)])
        self.kappas = np.concatenate([rng.uniform(1.5, 5.0, n_lobes), rng.uniform(30.0, 120.0, n_spikes)])
        self.means = (1.0 - np.exp(-2.0 * self.kappas)) / (2.0 * self.kappas)  # bump mean over the sphere
        stretch = np.array([1.0, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)])
        self.stretch = rng.permutation(stretch) / np.prod(stretch) ** (1.0 / 3.0)
        self.rotation = random_rotation(rng)
        # f tabulated over (polar, azimuth) angles: a lookup per voxel instead of one exponential per lobe/spicule
        theta, phi = np.meshgrid(np.linspace(0, np.pi, 73), np.linspace(-np.pi, np.pi, 145), indexing="ij")
        u = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1).reshape(-1, 3)
        bumps = np.exp(self.kappas * (u @ self.dirs.T - 1.0)) - self.means
        f = np.maximum(1.0 + bumps @ self.amps, 0.3)
        f *= float(np.mean(f**3 * np.sin(theta).ravel()) / np.mean(np.sin(theta))) ** (-1.0 / 3.0)  # unit volume
        self.table = f.reshape(theta.shape).astype(np.float32)
        # Half-size of the axis-aligned box around the unit-radius lesion (border points mapped back to world).
        border = ((u * f[:, None]) * self.stretch) @ self.rotation.T
        self.half_box = np.abs(border).max(axis=0) * 1.1

    def radius(self, u: np.ndarray) -> np.ndarray:
        """Boundary radius (unit equivalent radius) for unit directions ``u`` (..., 3)."""
        rows = np.arccos(np.clip(u[..., 2], -1.0, 1.0)) * np.float32(72.0 / np.pi)  # 2.5 degree steps
        cols = (np.arctan2(u[..., 1], u[..., 0]) + np.float32(np.pi)) * np.float32(72.0 / np.pi)
        return ndimage.map_coordinates(self.table, [rows, cols], order=1, mode="nearest")

    def q(self, mesh_rel: list[np.ndarray], radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius q (X, Y, Z) and local border radius (mm) for offsets ``mesh_rel`` from the centre
        (sparse, as from ``WorkGrid.mesh``); slab by slab along x, which bounds the temporaries of big lesions."""
        shape = np.broadcast_shapes(*(m.shape for m in mesh_rel))
        q, f = np.empty(shape, np.float32), np.empty(shape, np.float32)
        step = max(1, (1 << 20) // (shape[1] * shape[2]))
        for i in range(0, shape[0], step):
            rel = np.stack(np.broadcast_arrays(mesh_rel[0][i : i + step], *mesh_rel[1:]), axis=-1)
            y = (rel @ self.rotation.astype(np.float32)) / self.stretch.astype(np.float32)
            r = np.linalg.norm(y, axis=-1)
            f[i : i + step] = self.radius(y / np.maximum(r, 1e-6)[..., None]) * np.float32(radius_mm)
            q[i : i + step] = r / f[i : i + step]
        return q, f


@dataclass
class Look:
    """Appearance recipe of one lesion; intensities are absolute (HU for CT, arbitrary units otherwise)."""

    solid: float
    core: float = 0.0
    core_frac: float = 0.0  # necrotic / solid-part radius as a fraction of q
    rim: float = 0.0
    rim_mm: float = 0.0
    calcification: float = 0.0
    calc_kind: str = "none"  # none | central | punctate
    cavity: float = -1000.0
    cavity_frac: float = 0.0
    halo: float = 0.0
    halo_mm: float = 0.0
    border_mm: float = 0.8
    heterogeneity: float = 0.0
    spiculated: bool = False
    kind: str = "solid"


def ct_look(rng, site: str, host: float) -> Look:
    """A CT lesion recipe for ``site`` around host attenuation ``host`` (HU), from textbook ranges."""
    border, het = rng.uniform(0.3, 2.0), rng.uniform(3.0, 15.0)
    if site == "lung":
        kind = rng.choice(
            ["solid", "ground_glass", "part_solid", "calcified", "cavitated"], p=[0.62, 0.08, 0.1, 0.05, 0.15]
        )
        look = Look(
            rng.uniform(10, 60),
            border_mm=border,
            heterogeneity=het,
            kind=str(kind),
            spiculated=bool(rng.uniform() < 0.4),
        )
        if kind == "ground_glass":
            look.solid, look.heterogeneity = rng.uniform(-700, -300), rng.uniform(20, 60)
        elif kind == "part_solid":
            look.core, look.core_frac, look.solid = look.solid, rng.uniform(0.25, 0.6), rng.uniform(-650, -300)
        elif kind == "calcified":
            look.calcification, look.calc_kind = rng.uniform(150, 900), str(rng.choice(["central", "punctate"]))
        elif kind == "cavitated":
            look.cavity_frac = rng.uniform(0.25, 0.6)
        if kind == "solid" and rng.uniform() < 0.3:
            look.core, look.core_frac = rng.uniform(5, 30), rng.uniform(0.3, 0.7)  # necrotic centre
        return look
    kind = rng.choice(["hypo", "cyst", "hyper", "rim"], p=[0.5, 0.12, 0.18, 0.2])
    delta = rng.uniform(20, 60) * (1.0 if site == "liver" else rng.uniform(0.5, 1.2))
    look = Look(max(host - delta, -5.0), border_mm=border, heterogeneity=het, kind=str(kind))
    if kind == "cyst":
        look.solid, look.heterogeneity, look.border_mm = rng.uniform(-5, 20), 0.0, rng.uniform(0.2, 0.6)
    elif kind == "hyper":
        look.solid = host + rng.uniform(20, 80)
    elif kind == "rim":
        look.rim, look.rim_mm = host + rng.uniform(10, 60), rng.uniform(1.5, 5.0)
    if kind != "cyst" and rng.uniform() < 0.35:
        look.core, look.core_frac = rng.uniform(10, 30), rng.uniform(0.3, 0.75)
    if kind != "cyst" and rng.uniform() < 0.08:
        look.calcification, look.calc_kind = rng.uniform(150, 800), "punctate"
    return look


def random_look(rng, site: str, host: float, lo: float, hi: float) -> Look:
    """SynthSeg-style recipe: every part a random intensity in [lo, hi], the lesion brighter or darker than its host
    (both polarities; brighter more often in brain and breast, where lesions enhance) by at least 12 % of the range,
    so that the label stays visible."""
    span = hi - lo

    def away_from(value: float, min_rel: float, max_rel: float, p_up: float = 0.5) -> float:
        sign = 1.0 if rng.uniform() < p_up else -1.0
        if not lo + min_rel * span <= value + sign * min_rel * span <= hi:
            sign = -sign  # no room on that side
        return float(np.clip(value + sign * rng.uniform(min_rel, max_rel) * span, lo, hi))

    look = Look(
        away_from(host, 0.12, 0.6, 0.7 if site in ("brain", "breast") else 0.5),
        border_mm=rng.uniform(0.3, 2.5),
        kind="random",
        heterogeneity=rng.uniform(0.0, 0.05) * span,
        spiculated=bool(rng.uniform() < 0.2),
    )
    if rng.uniform() < 0.35:
        look.core, look.core_frac = away_from(look.solid, 0.05, 0.5), rng.uniform(0.25, 0.75)
    if rng.uniform() < 0.3:
        look.rim, look.rim_mm = away_from(look.solid, 0.05, 0.5), rng.uniform(1.0, 5.0)
    if rng.uniform() < (0.6 if site == "brain" else 0.15):
        look.halo, look.halo_mm = away_from(host, 0.05, 0.35), rng.uniform(3.0, 25.0)  # oedema: not lesion
    if rng.uniform() < 0.05:
        look.calcification, look.calc_kind = float(rng.uniform(lo, hi)), "punctate"
    look.cavity = lo
    return look


@dataclass
class Placed:
    """A drawn lesion: work-grid box, soft weight, intensity; acquired-grid box and label."""

    centre: np.ndarray
    extent_mm: float
    box: tuple[slice, ...]
    weight: np.ndarray
    value: np.ndarray
    halo_weight: np.ndarray | None
    acq_box: tuple[slice, ...]
    label: np.ndarray


def draw_lesion(rng, grid, tissue, shape, centre, diameter, look: Look, clip, hosts, instances) -> Placed | None:
    """Rasterise one lesion around ``centre`` (mm), confined to tissues ``clip`` (None: anywhere), its halo to
    ``hosts``; None when it touches the volume border (unless it is too big for the field of view), nothing of it
    is acquired or it comes too close to a lesion of ``instances`` (the cheap checks run first)."""
    radius = diameter / 2.0
    half = radius * shape.half_box
    box = grid.box_around(centre, half + 2.0 * look.border_mm + look.halo_mm + 2.0 * grid.spacing)
    if box is None:
        return None
    k = grid.k
    box = box[:2] + (slice(box[2].start // k * k, -(-box[2].stop // k) * k),)  # whole acquired slices
    if diameter < 0.5 * grid.extent.min() and any(s.start == 0 or s.stop >= n for s, n in zip(box, grid.shape)):
        return None  # only lesions too big for the field of view may leave it
    rel = [g - c for g, c in zip(grid.mesh(box), centre)]
    q, f = shape.q(rel, radius)
    box_shape = q.shape
    if radius > 3.0:
        q *= 1.0 + rng.uniform(0.0, 0.12) * smooth_noise(rng, box_shape, grid.spacing, max(1.0, 0.3 * radius))
    allowed = np.ones(box_shape, bool) if clip is None else in_tissues(tissue[box], clip)
    inside = (q <= 1.0) & allowed
    label = _acquired_label(inside, k, grid.spacing, diameter, q)
    acq_box = box[:2] + (slice(box[2].start // k, box[2].stop // k),)
    if label is None or not separated(acq_box, label, instances, grid.spacing * np.array([1, 1, k])):
        return None
    keep = np.repeat(ndimage.binary_dilation(label, np.ones((3, 3, 3))), k, axis=2)
    weight = (_sigmoid((1.0 - q) * f / look.border_mm) * (allowed & keep)).astype(np.float32)
    value = _lesion_values(rng, grid, look, q, f, radius, rel)
    halo = None
    if look.halo_mm > 0:
        reach = 1.0 + look.halo_mm / radius * (1.0 + 0.3 * smooth_noise(rng, box_shape, grid.spacing, 4.0))
        halo = (_sigmoid((reach - q) * f / 2.0) * (1.0 - weight) * in_tissues(tissue[box], hosts)).astype(np.float32)
    extent = float(np.linalg.norm(half))
    return Placed(np.asarray(centre, float), extent, box, weight, value, halo, acq_box, label)


def _acquired_label(inside, k: int, spacing, diameter: float, q) -> np.ndarray | None:
    """Acquired-grid label: voxels at least half covered (the best-covered ones for a lesion smaller than a voxel),
    the largest 26-connected part; tiny lesions span >= 1.5 mm in-plane so 1.5 mm resampling keeps them."""
    nx, ny, nz = inside.shape
    cover = inside.reshape(nx, ny, nz // k, k).mean(axis=-1)
    if cover.max() <= 0:
        return None
    label = cover >= min(0.5, 0.5 * cover.max())
    comps, n = ndimage.label(label, np.ones((3, 3, 3)))
    if n > 1:
        label = comps == np.argmax(np.bincount(comps.ravel())[1:]) + 1
    if diameter < 5.0:
        idx = np.array(np.unravel_index(np.argmin(q), q.shape))
        idx[2] //= k
        reach = np.maximum(np.ceil(1.5 / np.asarray(spacing[:2])).astype(int), 1)
        label[idx[0] : idx[0] + reach[0], idx[1] : idx[1] + reach[1], idx[2]] = True
    return label


def _lesion_values(rng, grid: WorkGrid, look: Look, q, f, radius, rel) -> np.ndarray:
    """Intensity inside the lesion box: solid part with texture, then core, rim, cavity and calcification."""
    value = np.full(q.shape, look.solid, np.float32)
    if look.heterogeneity:
        value += look.heterogeneity * smooth_noise(rng, q.shape, grid.spacing, rng.uniform(1.0, 3.0))
    wobble = 1.0 + 0.2 * smooth_noise(rng, q.shape, grid.spacing, max(1.0, 0.2 * radius))
    if look.core_frac:
        core = _sigmoid((look.core_frac - q * wobble) * f / 1.0)
        value += (look.core - value) * core
    if look.rim_mm:
        rim = _sigmoid((look.rim_mm - (1.0 - q) * f) / 0.7) * (q < 1.2)
        value += (look.rim - value) * rim
    if look.cavity_frac:
        off = rng.uniform(-0.3, 0.3, 3) * radius
        cavity = np.sqrt(sum(((g - c) / (look.cavity_frac * radius)) ** 2 for g, c in zip(rel, off)))
        value = np.where(cavity * wobble < 1.0, np.float32(look.cavity), value)
    if look.calc_kind == "central":
        value = np.where(q * wobble < rng.uniform(0.2, 0.5), np.float32(look.calcification), value)
    elif look.calc_kind == "punctate":
        spots = smooth_noise(rng, q.shape, grid.spacing, rng.uniform(0.6, 1.2)) > rng.uniform(1.8, 2.6)
        value = np.where(spots & (q < 0.85), np.float32(look.calcification), value)
    return value


def separated(acq_box, label, instances: np.ndarray, spacing) -> bool:
    """True if ``label`` (in ``acq_box``) keeps SEPARATION_MM from every lesion already in ``instances``."""
    pad = np.ceil(SEPARATION_MM / np.array([spacing[0], spacing[1], min(spacing[2], 1.0)])).astype(int)
    lo = [max(s.start - p, 0) for s, p in zip(acq_box, pad)]
    hi = [min(s.stop + p, n) for s, p, n in zip(acq_box, pad, instances.shape)]
    region = instances[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if not region.any():
        return True
    mine = np.zeros(region.shape, bool)
    mine[tuple(slice(s.start - a, s.stop - a) for s, a in zip(acq_box, lo))] = label
    dist = ndimage.distance_transform_edt(~mine, sampling=(spacing[0], spacing[1], min(spacing[2], 1.0)))
    return not np.any(dist[region > 0] < SEPARATION_MM)


def lesion_diameters(rng, n: int, max_mm: float) -> np.ndarray:
    """``n`` equivalent diameters, log-uniform over [MIN_DIAMETER_MM, max_mm] and stratified so that one scene
    spans the range; largest first (they are the hardest to fit)."""
    lo, hi = np.log(MIN_DIAMETER_MM), np.log(max_mm)
    u = (rng.permutation(n) + rng.uniform(size=n)) / n
    return np.sort(np.exp(lo + u * (hi - lo)))[::-1]


PLACEMENTS = ("inside", "border", "vessel", "satellite")


def _voxel_mm(grid: WorkGrid, flat_index) -> np.ndarray:
    return grid.origin + np.array(np.unravel_index(flat_index, grid.shape), dtype=float) * grid.spacing


def _pick_centre(rng, grid, host_mask, host_idx, vessel_idx, placed, radius, mode) -> np.ndarray | None:
    """Centre (mm) for ``mode``: anywhere in the host, straddling its border, beside a vessel, or beside a lesion."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    if mode == "satellite":
        other = placed[int(rng.integers(len(placed)))]
        return other.centre + direction * (0.6 * other.extent_mm + radius + rng.uniform(2.0, 10.0))
    if mode == "vessel":
        return _voxel_mm(grid, vessel_idx[rng.integers(len(vessel_idx))]) + direction * radius * rng.uniform(0.5, 1.1)
    start = _voxel_mm(grid, host_idx[rng.integers(len(host_idx))])
    if mode == "inside":
        return start
    origin = grid.origin
    for step in range(1, 120):  # march to where the host ends: organ capsule, pleura, chest wall, vessel wall
        p = start + direction * step
        idx = np.round((p - origin) / grid.spacing).astype(int)
        if np.any(idx < 0) or np.any(idx >= grid.shape):
            return None  # the field of view ends before the organ does
        if not host_mask[tuple(idx)]:
            return p + direction * radius * rng.uniform(-0.5, 0.2)
    return None


def place_lesions(rng, grid: WorkGrid, anatomy, site: str, diameters, image, instances, look_for) -> list[dict]:
    """Draw, separate and composite lesions of ``diameters`` (mm) into ``image`` (work grid, in place); label them
    1..n in ``instances`` (acquired grid). ``look_for(host_tissue)`` returns a :class:`Look` and the host's mean
    intensity. Returns per-lesion facts."""
    tissue = anatomy.tissue
    hosts, clip = anatomy.hosts[site], anatomy.clip.get(site)
    host_mask = in_tissues(tissue, hosts)
    host_idx = np.flatnonzero(host_mask)
    if not len(host_idx):
        return []
    vessel_idx = host_idx[tissue.ravel()[host_idx] == VESSEL]
    placed, facts = [], []
    for diameter in diameters:
        shapes = {}  # one outline per lesion (and spiculation), whatever the attempt
        for attempt in range(30):
            if attempt and attempt % 6 == 0:
                diameter = max(0.75 * diameter, MIN_DIAMETER_MM)  # does not fit: shrink and retry
            weights = np.array([0.45, 0.3, 0.15 * bool(len(vessel_idx)), 0.2 * bool(placed)])
            mode = str(rng.choice(PLACEMENTS, p=weights / weights.sum()))
            centre = _pick_centre(rng, grid, host_mask, host_idx, vessel_idx, placed, diameter / 2.0, mode)
            if centre is None:
                continue
            host_tissue = int(hosts[0]) if site != "random" else int(tissue[_nearest(grid, centre)])
            look, host_value = look_for(host_tissue)
            confine = clip if (clip is not None and rng.uniform() < 0.8) else None
            if look.spiculated not in shapes:
                shapes[look.spiculated] = LesionShape(rng, look.spiculated)
            shape = shapes[look.spiculated]
            lesion = draw_lesion(rng, grid, tissue, shape, centre, diameter, look, confine, hosts, instances)
            if lesion is None:
                continue
            sub = image[lesion.box]
            if lesion.halo_weight is not None:
                sub += (look.halo - sub) * lesion.halo_weight
            sub += (lesion.value - sub) * lesion.weight
            instances[lesion.acq_box][lesion.label] = len(placed) + 1
            placed.append(lesion)
            polarity = "bright" if look.solid > host_value else "dark"
            facts.append(
                {
                    "kind": look.kind,
                    "placement": mode,
                    "diameter_mm": round(float(diameter), 2),
                    "polarity": polarity,
                    "confined": confine is not None,
                    "spiculated": look.spiculated,
                }
            )
            break
    return facts


def _nearest(grid: WorkGrid, p_mm) -> tuple[int, ...]:
    idx = np.round((p_mm - grid.origin) / grid.spacing).astype(int)
    return tuple(int(i) for i in np.clip(idx, 0, np.asarray(grid.shape) - 1))
