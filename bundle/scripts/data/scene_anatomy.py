"""Anatomy of the domain-randomised lesion scenes: a tissue label map on a fine working grid.

As in SynthSeg, a scene starts as a map of tissue labels; intensities come later (``lesion_scenes``), so one map can
be rendered in Hounsfield units or with random contrasts. The working grid has the acquisition's in-plane spacing and
``k`` sub-slices per acquired slice, so averaging the sub-slices later gives slice-thickness partial volume.

Shapes are (X, Y, Z) with Z the slice axis, coordinates in mm centred on the volume; Y grows towards the back
(posterior), X towards the patient's left. Every builder takes the numpy Generator as its only source of randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

TISSUES = tuple(
    "air fat muscle cortical_bone cancellous_bone lung airway blood liver spleen kidney vessel fluid white_matter "
    "grey_matter gland".split()
)
AIR, FAT, MUSCLE, CORTICAL, CANCELLOUS, LUNG, AIRWAY, BLOOD, LIVER, SPLEEN, KIDNEY, VESSEL, FLUID, WM, GM, GLAND = (
    range(len(TISSUES))
)


@dataclass
class WorkGrid:
    """Working grid: ``shape`` (X, Y, Z * k) voxels of ``spacing`` mm; ``k`` sub-slices make one acquired slice."""

    shape: tuple[int, int, int]
    spacing: np.ndarray
    k: int = 1
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3))  # anatomy coordinates of the volume centre

    @property
    def extent(self) -> np.ndarray:
        return np.asarray(self.shape) * self.spacing

    @property
    def origin(self) -> np.ndarray:
        """Anatomy coordinates (mm) of voxel (0, 0, 0)."""
        return -(np.asarray(self.shape) - 1) / 2.0 * self.spacing + self.shift

    def axes(self) -> list[np.ndarray]:
        return [(o + np.arange(n) * s).astype(np.float32) for o, n, s in zip(self.origin, self.shape, self.spacing)]

    def mesh(self, box: tuple[slice, ...] | None = None) -> list[np.ndarray]:
        """Sparse coordinate arrays (mm) broadcasting to the grid, or to ``box`` of it."""
        axes = self.axes() if box is None else [a[s] for a, s in zip(self.axes(), box)]
        return np.meshgrid(*axes, indexing="ij", sparse=True)

    def box_around(self, centre_mm: np.ndarray, half_mm: np.ndarray | float) -> tuple[slice, ...] | None:
        """Voxel box holding ``centre +- half`` mm, clipped to the grid; None if it misses the grid."""
        lo = np.floor((centre_mm - half_mm - self.origin) / self.spacing).astype(int)
        hi = np.ceil((centre_mm + half_mm - self.origin) / self.spacing).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        return None if np.any(hi <= lo) else tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@dataclass
class Anatomy:
    """A tissue map and where lesions may grow: ``hosts`` maps a lesion site (``lung``, ``liver``, ...) to the
    tissue labels it lives in; ``clip`` maps a site to the labels a lesion is confined to (None: may bulge out)."""

    tissue: np.ndarray
    hosts: dict[str, tuple[int, ...]]
    clip: dict[str, tuple[int, ...] | None] = field(default_factory=dict)


def smooth_noise(rng: np.random.Generator, shape, spacing, sigma_mm: float, planar: bool = False) -> np.ndarray:
    """Unit-variance Gaussian random field of correlation length ~``sigma_mm``, float32 of ``shape`` ((X, Y, 1) if
    ``planar``). Drawn on a grid of ``sigma_mm / 1.5`` steps and upsampled trilinearly: filtering the full grid
    would dominate the run time."""
    shape = np.array(shape)
    if planar:
        shape[2] = 1
    step = np.maximum(np.asarray(spacing, dtype=float), sigma_mm / 1.5)
    coarse = np.maximum(np.ceil(shape * np.asarray(spacing) / step).astype(int) + 1, 2)
    coarse[shape == 1] = 1
    noise = rng.standard_normal(tuple(coarse), dtype=np.float32)
    if np.any(sigma_mm / step > 0.5):  # else trilinear upsampling alone makes it smooth enough
        noise = ndimage.gaussian_filter(noise, sigma_mm / step, mode="wrap")
    noise = (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    if tuple(coarse) == tuple(shape):
        return noise
    return torch.nn.functional.interpolate(
        torch.from_numpy(noise)[None, None], size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True
    )[0, 0].numpy()


def in_tissues(tissue: np.ndarray, labels) -> np.ndarray:
    """``np.isin`` for uint8 label maps through a lookup table (several times faster)."""
    table = np.zeros(256, bool)
    table[list(labels)] = True
    return table[tissue]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding ``mask`` (from its axis projections, cheaper than ``np.nonzero``), None if empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hits):
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def random_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float] = (180.0, 180.0, 180.0)):
    """Rotation matrix from Euler angles uniform in +-``max_deg`` about z, x, y."""
    a, b, c = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * np.asarray(max_deg))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def ellipsoid_depth(rng, grid: WorkGrid, centre, semi_axes, rotation=None, wobble: float = 0.0, wobble_mm=20.0):
    """Approximate depth (mm, > 0 inside) of a rotated ellipsoid with a noisy surface, inside its bounding box.

    Returns (box, depth) or (None, None) when the ellipsoid misses the grid."""
    semi_axes = np.asarray(semi_axes, dtype=float)
    box = grid.box_around(np.asarray(centre), semi_axes.max() * (1.0 + 3.0 * wobble) + 2.0)
    if box is None:
        return None, None
    rel = [g - c for g, c in zip(grid.mesh(box), centre)]
    rot = np.eye(3) if rotation is None else rotation
    rho = np.zeros([s.stop - s.start for s in box], np.float32)
    for j in range(3):  # (x, y) terms are planar, so only one full-size temporary per axis
        planar = float(rot[0, j] / semi_axes[j]) * rel[0] + float(rot[1, j] / semi_axes[j]) * rel[1]
        rho += np.square(planar + float(rot[2, j] / semi_axes[j]) * rel[2])
    np.sqrt(rho, out=rho)
    if wobble:
        rho *= 1.0 + wobble * smooth_noise(rng, rho.shape, grid.spacing, wobble_mm)
    return box, ((1.0 - rho) * semi_axes.min()).astype(np.float32)


def paint_ellipsoid(rng, tissue, grid, label, centre, semi_axes, rotation=None, wobble=0.0, where=None, shell=None):
    """Set ``label`` inside an ellipsoid (only where ``tissue`` is in ``where``); ``shell=(label, mm)`` paints a
    rim of that thickness. Returns (box, inside mask) for later use, or (None, None)."""
    box, depth = ellipsoid_depth(rng, grid, centre, semi_axes, rotation, wobble)
    if box is None:
        return None, None
    inside = depth > 0
    if where is not None:
        inside &= in_tissues(tissue[box], where)
    sub = tissue[box]
    sub[inside] = label
    if shell is not None:
        sub[inside & (depth < shell[1])] = shell[0]
    return box, inside


def tube_along_z(grid: WorkGrid, centre_xy, radius, drift=(0.0, 0.0), wiggle=0.0, phase=0.0):
    """Boolean (X, Y, Z) tube along z whose centre drifts linearly (``drift`` mm per mm) and wiggles sinusoidally."""
    gx, gy, gz = grid.mesh()
    cx = centre_xy[0] + drift[0] * gz + wiggle * np.sin(gz / 40.0 + phase)
    cy = centre_xy[1] + drift[1] * gz + wiggle * np.cos(gz / 55.0 + phase)
    return (gx - cx) ** 2 + (gy - cy) ** 2 < radius**2


def vessel_tree(rng, grid: WorkGrid, box, sigma_mm: float, radii, hilum=None, taper_mm: float = 60.0):
    """Tube networks inside ``box``, one per entry of ``radii``: where two smooth fields are both near given levels
    (the level sets are surfaces; two surfaces meet along curves). Tubes thicken towards ``hilum`` (mm) like
    pulmonary and portal trees. Networks share the two fields but sit at different levels, so they do not cross."""
    shape = tuple(s.stop - s.start for s in box)
    n1, n2 = (smooth_noise(rng, shape, grid.spacing, sigma_mm) for _ in range(2))
    taper = np.float32(1.0)
    if hilum is not None:
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid.mesh(box), hilum)))
        taper = 0.6 + 1.2 * np.exp(-dist / taper_mm)
    return [np.square(n1 - 0.8 * i) + np.square(n2) < np.square(np.float32(r) * taper) for i, r in enumerate(radii)]


def build_body(rng, grid: WorkGrid, tissue: np.ndarray, semi_mm, wall_mm=(6.0, 18.0)):
    """Elliptic body along z (skin fat, muscle wall) of absolute size ``semi_mm`` ((lo, hi) per in-plane axis),
    placed so that the field of view may show only part of it, as a cropped reconstruction does.

    Returns (planar depth below the muscle wall (X, Y, 1) mm, inner half-width mm)."""
    semi = np.array([rng.uniform(*semi_mm[0]), rng.uniform(*semi_mm[1])])
    grid.shift[:2] = rng.uniform(-1.0, 1.0, 2) * np.maximum(semi - 0.5 * grid.extent[:2], 0.0) * 0.8
    gx, gy, _ = grid.mesh()  # the body is centred on (0, 0); the field of view looks at part of it
    rho = np.sqrt((gx / semi[0]) ** 2 + (gy / semi[1]) ** 2)
    rho = rho * (1.0 + 0.03 * smooth_noise(rng, grid.shape, grid.spacing, 30.0, planar=True))
    depth = ((1.0 - rho) * np.sqrt(semi.prod())).astype(np.float32)
    fat, wall = rng.uniform(4.0, 25.0), rng.uniform(*wall_mm)
    tissue[...] = np.where(depth > 0, FAT, AIR)
    tissue[np.broadcast_to((depth > fat) & (depth < fat + wall), tissue.shape)] = MUSCLE
    return depth - (fat + wall), float(np.sqrt(semi.prod()) - fat - wall)


def add_ribs(rng, grid: WorkGrid, tissue: np.ndarray, inner_depth: np.ndarray) -> None:
    """Oblique rib cross-sections in a band just inside the muscle wall (cortical bone, cancellous core)."""
    gx, gy, gz = grid.mesh()
    thickness, period, slope = rng.uniform(5.0, 9.0), rng.uniform(22.0, 34.0), rng.uniform(0.3, 0.7)
    band = (inner_depth > 0) & (inner_depth < thickness)
    phase = np.cos(2.0 * np.pi * (gz - slope * (gy + 0.6 * np.abs(gx))) / period + rng.uniform(0, 2 * np.pi))
    rib = band & (phase > rng.uniform(0.3, 0.6))
    tissue[rib] = CORTICAL
    tissue[rib & (phase > 0.85) & (inner_depth > 2.0) & (inner_depth < thickness - 2.0)] = CANCELLOUS


def add_spine(rng, grid: WorkGrid, tissue: np.ndarray, centre_xy) -> None:
    """Vertebral bodies (cancellous, cortical shell) with discs every 25-35 mm, and the spinal canal behind."""
    radius = rng.uniform(14.0, 22.0)
    gx, gy, gz = grid.mesh()
    r2 = ((gx - centre_xy[0]) / radius) ** 2 + ((gy - centre_xy[1]) / (0.85 * radius)) ** 2
    body = np.broadcast_to(r2 < 1.0, tissue.shape)
    tissue[body] = CORTICAL
    tissue[np.broadcast_to(r2 < (1.0 - 2.0 / radius) ** 2, tissue.shape)] = CANCELLOUS
    disc = np.cos(2.0 * np.pi * gz / rng.uniform(25.0, 35.0) + rng.uniform(0, 6.3)) > 0.75
    tissue[body & np.broadcast_to(disc, tissue.shape)] = MUSCLE
    canal = tube_along_z(grid, (centre_xy[0], centre_xy[1] + 1.5 * radius), 0.5 * radius)
    tissue[tube_along_z(grid, (centre_xy[0], centre_xy[1] + 1.5 * radius), 0.75 * radius)] = CORTICAL
    tissue[canal] = FLUID


def build_chest(rng, grid: WorkGrid) -> Anatomy:
    """Chest: body wall, ribs, spine, two lungs with tapering vessels, mediastinum, heart, aorta, airways."""
    tissue = np.zeros(grid.shape, np.uint8)
    inner, width = build_body(rng, grid, tissue, ((140, 190), (100, 140)), wall_mm=(3.0, 10.0))
    add_ribs(rng, grid, tissue, inner)
    inside = np.broadcast_to(inner > rng.uniform(6.0, 10.0), tissue.shape)
    spine_xy = (rng.uniform(-5, 5), width * rng.uniform(0.55, 0.75))
    z_len = grid.extent[2]
    for side in (-1.0, 1.0):  # lungs: big ellipsoids that the wall and mediastinum cut
        centre = (side * width * rng.uniform(0.45, 0.6), rng.uniform(-10, 10), rng.uniform(-0.1, 0.1) * z_len)
        semi = np.array([width, width, max(z_len, 150.0)]) * rng.uniform((0.6, 1.0, 0.8), (0.8, 1.3, 1.5))
        paint_ellipsoid(rng, tissue, grid, LUNG, centre, semi, random_rotation(rng, (10, 5, 5)), 0.04, (FAT,))
    tissue[~inside & (tissue == LUNG)] = MUSCLE  # pleura / chest wall: lung never reaches the skin fat
    gx, gy, _ = grid.mesh()
    bend = rng.uniform(5, 15) * smooth_noise(rng, grid.shape, grid.spacing, 40.0)  # curved pleural reflections
    mediastinum = np.abs(gx - rng.uniform(-10, 10) - 0.2 * gy + bend) < rng.uniform(10, 22)
    tissue[mediastinum & (tissue == LUNG)] = FAT
    hilum = np.array([0.0, rng.uniform(-5, 15), rng.uniform(-0.2, 0.2) * z_len])
    heart_c = (rng.uniform(-15, 25), -width * rng.uniform(0.2, 0.4), hilum[2] - rng.uniform(20, 70))
    heart_semi, myocardium = rng.uniform(30, 55, 3), (MUSCLE, rng.uniform(3.0, 6.0))
    paint_ellipsoid(rng, tissue, grid, BLOOD, heart_c, heart_semi, random_rotation(rng), 0.03, (FAT, LUNG), myocardium)
    aorta_xy = (spine_xy[0] + rng.uniform(18, 30), spine_xy[1] - rng.uniform(8, 20))
    tissue[tube_along_z(grid, aorta_xy, rng.uniform(10, 15), wiggle=3.0) & (tissue != CORTICAL)] = BLOOD
    trachea = tube_along_z(grid, (rng.uniform(-8, 8), hilum[1] - rng.uniform(5, 20)), rng.uniform(7, 11), wiggle=2)
    tissue[trachea & (tissue != CORTICAL)] = AIRWAY
    add_spine(rng, grid, tissue, spine_xy)
    lung = tissue == LUNG
    box = bounding_box(lung)
    if box is not None:
        radii = (rng.uniform(0.2, 0.32), rng.uniform(0.08, 0.14))
        tubes, airways = vessel_tree(rng, grid, box, rng.uniform(7, 12), radii, hilum, rng.uniform(40, 80))
        tissue[box][tubes & lung[box]] = VESSEL
        tissue[box][airways & lung[box]] = AIRWAY
    return Anatomy(tissue, hosts={"lung": (LUNG, VESSEL)}, clip={"lung": (LUNG, VESSEL, AIRWAY)})


def build_abdomen(rng, grid: WorkGrid) -> Anatomy:
    """Upper abdomen: wall, spine, large liver with hepatic/portal vein tree, spleen, kidneys, stomach, aorta, IVC,
    gallbladder (a cyst-like non-lesion) and bowel loops."""
    tissue = np.zeros(grid.shape, np.uint8)
    inner, width = build_body(rng, grid, tissue, ((130, 190), (100, 150)))
    spine_xy = (rng.uniform(-5, 5), width * rng.uniform(0.55, 0.75))
    z_len = max(grid.extent[2], 120.0)
    loops, threshold = smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(6, 12)), rng.uniform(0.3, 0.9)
    free = (tissue == FAT) & np.broadcast_to(inner > 10, tissue.shape)
    tissue[free & (loops > threshold)] = MUSCLE  # bowel wall, contents inside
    tissue[free & (loops > threshold + 0.5)] = FLUID if rng.uniform() < 0.6 else AIRWAY
    liver_c = np.array([width, width, z_len]) * rng.uniform((-0.45, -0.2, -0.15), (-0.25, 0.15, 0.15))
    liver_semi = np.array([width, width, z_len]) * rng.uniform((0.55, 0.6, 0.5), (0.8, 0.85, 0.8))
    rot, replaces = random_rotation(rng, (20, 8, 8)), (FAT, MUSCLE, FLUID, AIRWAY)
    box, liver = paint_ellipsoid(rng, tissue, grid, LIVER, liver_c, liver_semi, rot, rng.uniform(0.03, 0.08), replaces)
    for label, side, semi in ((SPLEEN, 1.0, (35, 50, 45)), (KIDNEY, 1.0, (30, 28, 50)), (KIDNEY, -1.0, (30, 28, 50))):
        y = spine_xy[1] - (0.1 if label == KIDNEY else 0.3) * width
        centre = (side * width * rng.uniform(0.45, 0.65), y, rng.uniform(-0.3, 0.3) * z_len)
        semi, rot_organ = np.asarray(semi) * rng.uniform(0.8, 1.25, 3), random_rotation(rng, (30, 10, 10))
        paint_ellipsoid(rng, tissue, grid, label, centre, semi, rot_organ, 0.04, (FAT, MUSCLE, FLUID, AIRWAY))
    stomach_c = np.array([width, width, z_len]) * rng.uniform((0.1, -0.5, -0.2), (0.4, -0.2, 0.4))
    wall = (MUSCLE, rng.uniform(2.0, 5.0))
    paint_ellipsoid(
        rng, tissue, grid, FLUID, stomach_c, rng.uniform(25, 50, 3), None, 0.06, (FAT, MUSCLE, AIRWAY), wall
    )
    for label, dx in ((BLOOD, rng.uniform(5, 20)), (VESSEL, -rng.uniform(20, 35))):  # aorta, inferior vena cava
        tube = tube_along_z(grid, (spine_xy[0] + dx, spine_xy[1] - rng.uniform(25, 40)), rng.uniform(8, 13))
        tissue[tube & (tissue != LIVER)] = label
    add_spine(rng, grid, tissue, spine_xy)
    if box is not None:
        liver &= tissue[box] == LIVER
        hilum = liver_c + rot @ (liver_semi * np.array([0.3, -0.2, 0.0]))
        (tubes,) = vessel_tree(rng, grid, box, rng.uniform(14, 24), (rng.uniform(0.15, 0.22),), hilum, 50.0)
        tissue[box][tubes & liver] = VESSEL
        gb_c = liver_c + rot @ (liver_semi * np.array([0.5, -0.6, rng.uniform(-0.4, 0.0)]))
        paint_ellipsoid(rng, tissue, grid, FLUID, gb_c, rng.uniform(12, 22, 3), random_rotation(rng), 0.02, (LIVER,))
    return Anatomy(tissue, hosts={"liver": (LIVER, VESSEL)}, clip={"liver": (LIVER, VESSEL)})


def build_soft_tissue(rng, grid: WorkGrid) -> Anatomy:
    """Neck, pelvis or limb: muscle groups split by fat planes, long bones with marrow, lymph-node-like blobs."""
    tissue = np.zeros(grid.shape, np.uint8)
    inner, width = build_body(rng, grid, tissue, ((50, 180), (50, 140)))
    inside = np.broadcast_to(inner > -rng.uniform(0, 10), tissue.shape)
    groups = smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(12, 25))
    planes = np.abs(smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(10, 20))) < rng.uniform(0.05, 0.15)
    tissue[inside & (groups > rng.uniform(-0.8, 0.2))] = MUSCLE
    tissue[inside & planes] = FAT
    for _ in range(int(rng.integers(0, 3))):
        centre = width * rng.uniform(-0.6, 0.6, 2)
        radius = rng.uniform(8, 20)
        tissue[tube_along_z(grid, centre, radius, drift=rng.uniform(-0.15, 0.15, 2))] = CORTICAL
        tissue[tube_along_z(grid, centre, radius - rng.uniform(2, 5), drift=(0, 0))] = CANCELLOUS
    for _ in range(int(rng.integers(2, 7))):  # benign nodes and vessels in the fat: lesion look-alikes
        centre = np.array([*(width * rng.uniform(-0.8, 0.8, 2)), grid.extent[2] * rng.uniform(-0.4, 0.4)])
        label, semi = rng.choice([MUSCLE, VESSEL]), rng.uniform(3, 9, 3)
        paint_ellipsoid(rng, tissue, grid, label, centre, semi, random_rotation(rng), 0.05, (FAT,))
    return Anatomy(tissue, hosts={"soft": (MUSCLE, FAT)}, clip={"soft": None})


def build_brain(rng, grid: WorkGrid) -> Anatomy:
    """Head: scalp, skull, CSF, folded cortex over white matter, ventricles and deep grey nuclei."""
    tissue = np.zeros(grid.shape, np.uint8)
    semi = np.array([rng.uniform(65, 80), rng.uniform(80, 100), rng.uniform(60, 80)])
    centre = np.array([*(grid.extent[:2] * rng.uniform(-0.04, 0.04, 2)), grid.extent[2] * rng.uniform(-0.3, 0.1)])
    rot = random_rotation(rng, (10, 10, 10))
    box, depth = ellipsoid_depth(rng, grid, centre, semi, rot, 0.02, 40.0)
    if box is None:
        return Anatomy(tissue, hosts={"brain": (FAT,)})
    folds = smooth_noise(rng, depth.shape, grid.spacing, rng.uniform(2.5, 4.0))
    layers = np.cumsum([0.0, rng.uniform(3, 7), rng.uniform(4, 9), rng.uniform(1, 4), rng.uniform(2.5, 4.5)])
    sub = tissue[box]
    for label, top in zip((FAT, CORTICAL, FLUID, GM, WM), layers):
        sub[depth > top + (3.0 * folds if label == WM else 0.0)] = label
    sub[(depth > layers[1] + 1.5) & (depth < layers[2] - 1.5)] = CANCELLOUS  # diploe
    sub[(tissue[box] == GM) & (folds < -1.2)] = FLUID  # sulci
    for side in (-1.0, 1.0):  # lateral ventricles and deep grey nuclei
        vc = centre + rot @ np.array([side * rng.uniform(6, 14), rng.uniform(-10, 5), rng.uniform(0, 15)])
        semi, tilt = rng.uniform((4, 20, 6), (9, 35, 12)), rot @ random_rotation(rng, (15, 10, 10))
        paint_ellipsoid(rng, tissue, grid, FLUID, vc, semi, tilt, 0.1, (WM,))
        nc = centre + rot @ np.array([side * rng.uniform(18, 28), rng.uniform(-5, 10), rng.uniform(-5, 8)])
        paint_ellipsoid(rng, tissue, grid, GM, nc, rng.uniform(7, 13, 3), rot, 0.05, (WM,))
    return Anatomy(tissue, hosts={"brain": (WM, GM)}, clip={"brain": (WM, GM, FLUID)})


def build_breast(rng, grid: WorkGrid) -> Anatomy:
    """Prone breast: a fatty mound with fibroglandular tissue (denser towards the nipple), skin, pectoral muscle
    and chest wall; lungs and heart behind it."""
    tissue = np.zeros(grid.shape, np.uint8)
    semi = np.array([rng.uniform(60, 110), rng.uniform(40, 110), rng.uniform(60, 110)])
    wall_y = semi[1] * rng.uniform(0.0, 0.3)  # chest wall plane; the breast hangs towards -y
    grid.shift[:] = rng.uniform(-1.0, 1.0, 3) * np.maximum(semi - 0.5 * grid.extent, 0.0) * 0.7
    grid.shift[1] += rng.uniform(-0.2, 0.4) * semi[1]
    centre = np.array([0.0, wall_y, 0.0])
    box, depth = ellipsoid_depth(rng, grid, centre, semi, random_rotation(rng, (8, 5, 5)), 0.03, 30.0)
    _, gy, _ = grid.mesh()
    tissue[np.broadcast_to(gy > wall_y, grid.shape)] = MUSCLE
    tissue[np.broadcast_to(gy > wall_y + rng.uniform(8, 20), grid.shape)] = LUNG
    if box is not None:
        sub = tissue[box]
        sub[(depth > 0) & (sub == AIR)] = FAT
        density = smooth_noise(rng, depth.shape, grid.spacing, rng.uniform(3, 8))
        trend = np.clip(depth / rng.uniform(15, 40), 0, 1.5)  # glandular tissue sits deep, fat rims it
        sub[(sub == FAT) & (density + trend > rng.uniform(1.0, 2.2))] = GLAND
        sub[(depth > 0) & (depth < rng.uniform(1.0, 2.5)) & (sub != MUSCLE) & (sub != LUNG)] = MUSCLE  # skin
    heart = (rng.uniform(-40, 40), wall_y + rng.uniform(50, 90), 0.0)
    paint_ellipsoid(rng, tissue, grid, BLOOD, heart, rng.uniform(40, 60, 3), random_rotation(rng), 0.03, (LUNG,))
    return Anatomy(tissue, hosts={"breast": (GLAND, FAT)}, clip={"breast": (GLAND, FAT)})


def build_random(rng, grid: WorkGrid) -> Anatomy:
    """SynthSeg's extreme: 3-9 random regions (argmax of smooth fields), optionally inside a body on air."""
    n = int(rng.integers(3, 10))
    labels = rng.choice(np.arange(1, len(TISSUES)), n, replace=False).astype(np.uint8)
    best = np.full(grid.shape, -np.inf, np.float32)
    tissue = np.zeros(grid.shape, np.uint8)
    for label in labels:
        score = smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(8, 40)) + rng.normal(0, 0.3)
        tissue[score > best] = label
        np.maximum(best, score, out=best)
    if rng.uniform() < 0.5:
        box, depth = ellipsoid_depth(rng, grid, np.zeros(3), grid.extent * rng.uniform(0.4, 0.6, 3), None, 0.05)
        body = np.zeros(grid.shape, bool)
        body[box] = depth > 0
        tissue[~body] = AIR
    return Anatomy(tissue, hosts={"random": tuple(int(x) for x in labels)}, clip={"random": None})


BUILDERS = dict(
    lung=build_chest,
    liver=build_abdomen,
    soft=build_soft_tissue,
    brain=build_brain,
    breast=build_breast,
    random=build_random,
)
