"""One synthetic MR-like lesion case, drawn from a numpy Generator (no other randomness).

Each case is an MR-like volume: air (~0, Rician noise floor) around a body (elliptic cylinder with a bright
fat rim), an irregular ellipsoidal "organ" with smooth texture, a few vessels, and 2-5 lesions (label 1) that
are irregular (lobulated star-shaped blobs), hypo- or hyper-intense, with blurred borders, equivalent
diameters 3-40 mm (log-uniform, so small lesions are common) and separated so that connected components of
the label are exactly the lesions. Voxels are anisotropic (in-plane 0.85-1.25 mm, slices 2.5-4 mm) and the
affine is LPS-flipped like DICOM-derived NIfTI (``diag(-sx, -sy, sz)``), so loaders must reorient to RAS.
The draws happen in a fixed order (spacing, body, organ, intensities, vessels, texture, lesions, shading, noise),
so a case depends only on its Generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_SHAPE", "generate_case", "generate_case_with_organ"]

# 128 x 0.85-1.25 mm in-plane and 40 x 2.5-4 mm slices -> about 72-107 voxels per side at 1.5 mm isotropic.
DEFAULT_SHAPE = (128, 128, 40)
INPLANE_SPACING_RANGE = (0.85, 1.25)
SLICE_SPACING_RANGE = (2.5, 4.0)
DIAMETER_RANGE_MM = (3.0, 40.0)
NUM_LESIONS_RANGE = (2, 5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form avoids overflow warnings for large |x|


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field, white noise blurred with a ``sigma_mm`` Gaussian; (X, Y, Z) float32.

    Large correlation lengths are drawn on a coarse grid and linearly upsampled: blurring the full grid with a
    wide kernel would dominate the generation time.
    """
    shape = np.asarray(shape)
    step = np.maximum(spacing, sigma_mm / 2.0)  # coarse grid never finer than the voxels
    coarse = np.maximum(np.ceil(shape * spacing / step).astype(int), 2)
    field = rng.standard_normal(tuple(coarse)).astype(np.float32)
    field = ndimage.gaussian_filter(field, sigma=sigma_mm / step, mode="wrap")
    if tuple(coarse) != tuple(shape):
        field = ndimage.zoom(field, shape / coarse, order=1, mode="nearest")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _random_rotation(rng: np.random.Generator, max_tilt_deg: float | None = None) -> np.ndarray:
    """3x3 rotation matrix: uniform over SO(3), or a z-rotation with small tilts if ``max_tilt_deg`` is set."""
    if max_tilt_deg is None:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    a, b, c = np.deg2rad([rng.uniform(-180, 180), *rng.uniform(-max_tilt_deg, max_tilt_deg, size=2)])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


class _LesionShape:
    """Star-shaped lobulated blob: boundary radius ``f(u)`` over unit directions ``u``, then stretched and rotated.

    ``f(u) = 1 + sum_j a_j (exp(k_j (u.v_j - 1)) - m_j)``: broad lobes (small k) and sharp spikes (large k) around
    random directions v_j; m_j (the bump's mean over the sphere) keeps the mean radius near 1. Star-shaped sets
    are connected, so one lesion is one component; f is rescaled to unit equivalent radius.
    """

    def __init__(self, rng: np.random.Generator):
        n_lobes, n_spikes = int(rng.integers(2, 6)), int(rng.integers(0, 7))
        self.dirs = rng.standard_normal((n_lobes + n_spikes, 3))
        self.dirs /= np.linalg.norm(self.dirs, axis=1, keepdims=True)
        self.amps = np.concatenate([rng.uniform(0.2, 0.6, n_lobes), rng.uniform(0.05, 0.15, n_spikes)])
        self.kappas = np.concatenate([rng.uniform(1.5, 5.0, n_lobes), rng.uniform(15.0, 40.0, n_spikes)])
        self.means = (1.0 - np.exp(-2.0 * self.kappas)) / (2.0 * self.kappas)
        stretch = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        self.stretch = rng.permutation(stretch) / np.prod(stretch) ** (1.0 / 3.0)  # volume-preserving
        self.rotation = _random_rotation(rng)
        self.roughness = rng.uniform(0.0, 0.15)
        self.scale = 1.0
        u = rng.standard_normal((1024, 3))
        f = self.radius(u / np.linalg.norm(u, axis=1, keepdims=True))
        self.scale = float(np.mean(f**3)) ** (-1.0 / 3.0)  # unit equivalent radius: V = mean(f^3) * 4/3 pi
        # Upper bound on the farthest boundary point, in units of the equivalent radius (roughness can push out).
        self.max_extent = (
            float(f.max()) * self.scale * 1.1 * float(self.stretch.max()) / max(1.0 - 2.5 * self.roughness, 0.5)
        )

    def radius(self, u: np.ndarray) -> np.ndarray:
        """Boundary radius for unit directions ``u`` (N, 3) -> (N,)."""
        bumps = np.exp(self.kappas * (u @ self.dirs.T - 1.0)) - self.means
        return self.scale * np.maximum(1.0 + bumps @ self.amps, 0.3)

    def local_coords(self, offsets_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets from the centre (N, 3) mm -> (distance in shape space (N,), boundary radius (N,))."""
        y = (offsets_mm @ self.rotation) / self.stretch
        r = np.linalg.norm(y, axis=1)
        u = y / np.maximum(r, 1e-6)[:, None]
        return r, self.radius(u)


def _stratified_diameters(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` equivalent diameters (mm), log-uniform over DIAMETER_RANGE_MM, stratified so each case spans the range."""
    lo, hi = np.log(DIAMETER_RANGE_MM[0]), np.log(DIAMETER_RANGE_MM[1])
    u = (rng.permutation(n) + rng.uniform(size=n)) / n
    return np.sort(np.exp(lo + u * (hi - lo)))[::-1]  # place large lesions first, they are hardest to fit


def generate_case(
    rng: np.random.Generator, shape: Sequence[int] = DEFAULT_SHAPE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one synthetic case.

    Args:
        rng: numpy Generator; the only source of randomness.
        shape: voxel grid (X, Y, Z); Z is the thick-slice axis.

    Returns:
        image (X, Y, Z) int16 MR-like intensities >= 0, label (X, Y, Z) uint8 (1 = lesion), affine (4, 4) float64,
        info dict (spacing, per-lesion centre voxel / equivalent diameter / contrast / voxel count).
    """
    image, label, _, affine, info = generate_case_with_organ(rng, shape)
    return image, label, affine, info


def generate_case_with_organ(
    rng: np.random.Generator, shape: Sequence[int] = DEFAULT_SHAPE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`generate_case` plus the organ mask (X, Y, Z) uint8, returned third: 1 inside the organ's surface or a
    lesion. The mask draws no random numbers, so image, label and affine equal ``generate_case``'s for the same rng.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.array([*rng.uniform(*INPLANE_SPACING_RANGE, size=2), rng.uniform(*SLICE_SPACING_RANGE)])
    grid = _Grid(shape, spacing)
    body_w, fat_w, b_axes = _draw_body(rng, grid)
    organ = _draw_organ(rng, grid, b_axes)

    organ_i = rng.uniform(500.0, 900.0)
    body_i, fat_i = organ_i * rng.uniform(0.45, 0.65), organ_i * rng.uniform(1.2, 1.5)
    image = body_w * body_i + fat_w * (fat_i - body_i) + organ.weight * (organ_i - body_i)
    _add_vessels(rng, image, grid, organ, organ_i)
    fine_tex = _smooth_noise(rng, shape, spacing, 1.2)
    image *= 1.0 + rng.uniform(0.03, 0.06) * fine_tex + rng.uniform(0.03, 0.06) * _smooth_noise(rng, shape, spacing, 6)
    label, lesions = _add_lesions(rng, image, grid, organ, organ_i, fine_tex)
    image = _scanner_noise(rng, image, grid, organ_i)

    # DICOM-derived NIfTI are typically LPS-flipped in-plane; the volume centre sits at world (0, 0, 0).
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    for les in lesions:  # internal placement bookkeeping (centre_mm is not in world coordinates)
        les.pop("extent_mm")
        les.pop("centre_mm")
    info = {"spacing": [float(s) for s in spacing], "lesions": lesions}
    # Lesions that bulge out of the organ belong to it, as a liver mask includes its tumours.
    organ_mask = ((organ.depth > 0) | (label > 0)).astype(np.uint8)
    return image, label, organ_mask, affine, info


class _Grid:
    """Voxel grid of a case: shape, spacing (mm), field of view, centred axes (mm) and their sparse meshgrid."""

    def __init__(self, shape: tuple[int, ...], spacing: np.ndarray) -> None:
        self.shape, self.spacing = shape, spacing
        self.fov = np.asarray(shape) * spacing
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        self.gx, self.gy, self.gz = np.meshgrid(*self.axes, indexing="ij", sparse=True)


@dataclass
class _Organ:
    """The organ: ellipsoid semi-axes, centre and rotation, signed depth below its surface (mm) and soft weight."""

    axes: np.ndarray
    centre: np.ndarray
    rotation: np.ndarray
    depth: np.ndarray
    weight: np.ndarray


def _draw_body(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body: elliptic cylinder along z with a fat rim; returns (body weight, fat weight, body semi-axes)."""
    gx, gy = grid.gx, grid.gy
    b_axes = grid.fov[:2] * np.array([rng.uniform(0.42, 0.47), rng.uniform(0.36, 0.44)])
    depth_b = (1.0 - np.sqrt((gx / b_axes[0]) ** 2 + (gy / b_axes[1]) ** 2)) * np.sqrt(b_axes.prod())  # mm inside
    body_w = _sigmoid(depth_b / 0.6)
    fat_w = body_w * (1.0 - _sigmoid((depth_b - rng.uniform(4.0, 10.0)) / 0.8))
    return body_w, fat_w, b_axes


def _draw_organ(rng: np.random.Generator, grid: _Grid, b_axes: np.ndarray) -> _Organ:
    """Organ: rotated ellipsoid with a low-frequency wobbly surface."""
    fov = grid.fov
    o_axes = fov * np.array([rng.uniform(0.28, 0.34), rng.uniform(0.26, 0.32), rng.uniform(0.32, 0.4)])
    o_axes[:2] = np.minimum(o_axes[:2], b_axes * 0.75)
    o_centre = np.array([*(fov[:2] * rng.uniform(-0.05, 0.05, 2)), fov[2] * rng.uniform(-0.05, 0.05)])
    o_rot = _random_rotation(rng, max_tilt_deg=15.0)
    rel = [grid.gx - o_centre[0], grid.gy - o_centre[1], grid.gz - o_centre[2]]
    r_o2 = sum((sum(o_rot[i, j] * rel[i] for i in range(3)) / o_axes[j]) ** 2 for j in range(3))
    wobble = 1.0 + 0.06 * _smooth_noise(rng, grid.shape, grid.spacing, 15.0)
    depth_o = (1.0 - np.sqrt(r_o2) * wobble) * float(o_axes.min())
    organ_w = _sigmoid(depth_o / rng.uniform(0.5, 1.0))
    return _Organ(o_axes, o_centre, o_rot, depth_o, organ_w)


def _add_vessels(rng: np.random.Generator, image: np.ndarray, grid: _Grid, organ: _Organ, organ_i: float) -> None:
    """Unlabelled tubes inside the organ, added in place; their cross-sections look like small lesions (hard
    negatives)."""
    gx, gy, gz = grid.gx, grid.gy, grid.gz
    for _ in range(int(rng.integers(2, 5))):
        p0 = organ.centre + organ.rotation @ (organ.axes * rng.uniform(-0.6, 0.6, 3))
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        rad = rng.uniform(1.0, 3.0)
        px, py, pz = gx - p0[0], gy - p0[1], gz - p0[2]
        t = px * d[0] + py * d[1] + pz * d[2]
        dist2 = px**2 + py**2 + pz**2 - t**2
        vessel_w = _sigmoid((rad - np.sqrt(np.maximum(dist2, 0.0))) / 0.5) * organ.weight
        image += vessel_w * organ_i * (rng.uniform(0.25, 0.5) if rng.uniform() < 0.5 else -rng.uniform(0.2, 0.35))


def _add_lesions(
    rng: np.random.Generator, image: np.ndarray, grid: _Grid, organ: _Organ, organ_i: float, fine_tex: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Place 2-5 lesions in the organ (image changed in place); returns (label (X, Y, Z) uint8, lesion facts)."""
    spacing, axes = grid.spacing, grid.axes
    label = np.zeros(grid.shape, dtype=np.uint8)
    lesions: list[dict[str, Any]] = []
    n_lesions = int(rng.integers(NUM_LESIONS_RANGE[0], NUM_LESIONS_RANGE[1] + 1))
    # Extents bound the voxel cubes, so voxel centres of two lesions are >= gap + one voxel diagonal apart; after
    # nearest resampling to 1.5 mm, 26-neighbours (<= 2.6 mm apart) then never come from two different lesions.
    gap_mm = 4.0
    voxel_volume = float(np.prod(spacing))
    queue, extra = list(_stratified_diameters(rng, n_lesions)), 0
    while queue:
        placed = _fit_lesion(
            rng, queue.pop(0), organ.centre, organ.rotation, organ.axes, axes, spacing, lesions, gap_mm
        )
        if placed is not None:
            box = placed.box
            hyper = bool(rng.uniform() < 0.5)
            contrast = rng.uniform(1.35, 1.9) if hyper else rng.uniform(0.35, 0.7)
            rim = rng.uniform(-0.3, 0.3) if rng.uniform() < 0.4 else 0.0  # rim enhancement / necrotic-core look
            lesion_i = (
                organ_i * contrast * (1.0 + rim * np.clip(placed.q_rel, 0, 1) ** 3) * (1.0 + 0.05 * fine_tex[box])
            )
            image[box] = image[box] * (1.0 - placed.weight) + lesion_i * placed.weight
            label[box][placed.mask] = 1
            n_vox = int(placed.mask.sum())
            lesions.append(
                {
                    "centre_voxel": [int(round(c)) for c in _mm_to_voxel(placed.centre, axes)],
                    "centre_mm": [float(c) for c in placed.centre],
                    "extent_mm": placed.extent_mm,
                    "equivalent_diameter_mm": float((6.0 * n_vox * voxel_volume / np.pi) ** (1.0 / 3.0)),
                    "voxels": n_vox,
                    "contrast": "hyper" if hyper else "hypo",
                }
            )
        if not queue and len(lesions) < NUM_LESIONS_RANGE[0] and extra < 8:
            queue.append(rng.uniform(3.0, 8.0))  # crowded organ (small grids): top up with small lesions
            extra += 1
    return label, lesions


def _scanner_noise(rng: np.random.Generator, image: np.ndarray, grid: _Grid, organ_i: float) -> np.ndarray:
    """Smooth multiplicative bias field (receive-coil shading), then Rician noise as in magnitude MR; int16."""
    fov, shape = grid.fov, grid.shape
    g = rng.normal(0.0, 0.06, 3)
    hcoef = rng.normal(0.0, 0.04, 3)
    xn, yn, zn = (grid.gx / (fov[0] / 2), grid.gy / (fov[1] / 2), grid.gz / (fov[2] / 2))
    image *= np.exp(g[0] * xn + g[1] * yn + g[2] * zn + hcoef[0] * xn**2 + hcoef[1] * yn**2 + hcoef[2] * zn**2)
    sigma_n = organ_i * rng.uniform(0.02, 0.045)
    real = image + sigma_n * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma_n * rng.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real**2 + imag**2)
    return np.clip(np.round(image), 0, np.iinfo(np.int16).max).astype(np.int16)


@dataclass
class _Placed:
    """A rasterised lesion: centre (mm), its box in the volume, boolean mask, soft weight and q/k in the box."""

    centre: np.ndarray
    box: tuple[slice, ...]
    mask: np.ndarray
    weight: np.ndarray
    q_rel: np.ndarray
    extent_mm: float  # farthest voxel from the centre plus half a voxel diagonal


def _mm_to_voxel(p_mm: np.ndarray, axes: list[np.ndarray]) -> np.ndarray:
    return np.array([(p - a[0]) / (a[1] - a[0]) for p, a in zip(p_mm, axes)])


def _fit_lesion(rng, diameter, o_centre, o_rot, o_axes, axes, spacing, lesions, gap_mm) -> _Placed | None:
    """Try shapes and centres for a lesion of equivalent ``diameter`` mm, shrinking it when it does not fit."""
    for attempt in range(40):
        if attempt and attempt % 3 == 0:
            diameter = max(0.85 * diameter, DIAMETER_RANGE_MM[0])  # too big or too crowded: shrink, retry
        shape_fn = _LesionShape(rng)
        radius = diameter / 2.0
        extent = radius * shape_fn.max_extent
        # Centre deep enough that most of the lesion lies in the organ (a bulge out of it is realistic).
        r_allow = 0.95 - 0.6 * extent / float(o_axes.min())
        if r_allow <= 0.05:
            continue
        placed = _place_lesion(
            rng, shape_fn, radius, extent, r_allow, o_centre, o_rot, o_axes, axes, spacing, lesions, gap_mm
        )
        if placed is not None and _separated(placed.centre, placed.extent_mm, lesions, gap_mm):
            return placed
    return None


def _place_lesion(rng, shape_fn, radius, extent, r_allow, o_centre, o_rot, o_axes, axes, spacing, lesions, gap_mm):
    """Pick a centre inside the organ and rasterise the lesion in a local box; None if it does not fit."""
    y = rng.standard_normal(3)
    y *= r_allow * rng.uniform() ** (1.0 / 3.0) / np.linalg.norm(y)  # uniform in the inner ellipsoid
    centre = o_centre + o_rot @ (o_axes * y)
    if not _separated(centre, extent, lesions, gap_mm):  # cheap early reject with the upper-bound extent
        return None
    c_vox = _mm_to_voxel(centre, axes)
    half = (extent * 1.2 + 2.0) / spacing + 1.0
    lo, hi = np.floor(c_vox - half).astype(int), np.ceil(c_vox + half).astype(int) + 1
    if np.any(lo < 1) or np.any(hi > np.array([len(a) for a in axes]) - 1):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = np.meshgrid(*[a[s] for a, s in zip(axes, box)], indexing="ij")
    offsets = np.stack([s.ravel() for s in sub], axis=1) - centre
    r, f = shape_fn.local_coords(offsets)
    box_shape = tuple(b.stop - b.start for b in box)
    # Smooth noise on the boundary makes the outline irregular beyond the lobes (margins are rarely smooth).
    rough = _smooth_noise(rng, box_shape, spacing, max(1.0, 0.25 * radius)).ravel()
    roughness = shape_fn.roughness * min(1.0, radius / 6.0)  # voxel-sized lesions cannot show a rough margin
    q = r / (radius * f) * (1.0 + roughness * rough)  # <= 1 inside the nominal boundary

    # Calibrate the size exactly: keep the n voxels with the smallest q, n = target volume / voxel volume.
    n_target = max(1, int(round(np.pi / 6.0 * (2 * radius) ** 3 / float(np.prod(spacing)))))
    q_sorted = np.partition(q, [n_target - 1, min(n_target, q.size - 1)])
    k = 0.5 * (q_sorted[n_target - 1] + q_sorted[min(n_target, q.size - 1)])
    mask = (q <= k).reshape(box_shape)
    # Tiny lesions always cover the 2 x 2 in-plane voxels around the centre (>= 1.7 mm per axis), so a 1.5 mm
    # nearest-neighbour resampling cannot miss them (a diagonal 3-4 voxel lesion could fall between samples).
    core = np.floor(c_vox - lo).astype(int)
    mask[core[0] : core[0] + 2, core[1] : core[1] + 2, int(round(c_vox[2] - lo[2]))] = True
    # Discretisation can detach a thin spike; keep the main 26-connected part so one lesion = one component.
    comp, n_comp = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n_comp > 1:
        mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    if np.any(mask[0]) or np.any(mask[-1]) or np.any(mask[:, 0]) or np.any(mask[:, -1]):
        return None
    if np.any(mask[:, :, 0]) or np.any(mask[:, :, -1]):
        return None
    tau = rng.uniform(0.4, 1.5)  # border blur (mm)
    weight = _sigmoid((k - q) * radius * f / tau).reshape(box_shape)
    weight = np.where(mask, np.maximum(weight, 0.5), np.minimum(weight, 0.5)).astype(np.float32)
    extent = float(np.linalg.norm(offsets[mask.ravel()], axis=1).max() + 0.5 * np.linalg.norm(spacing))
    return _Placed(centre, box, mask, weight, (q / k).reshape(box_shape), extent)


def _separated(centre: np.ndarray, extent_mm: float, lesions: list[dict[str, Any]], gap_mm: float) -> bool:
    """True if a lesion bounded by a ball (centre, extent_mm) keeps ``gap_mm`` from every placed lesion."""
    return all(
        np.linalg.norm(centre - np.asarray(other["centre_mm"])) >= extent_mm + other["extent_mm"] + gap_mm
        for other in lesions
    )
