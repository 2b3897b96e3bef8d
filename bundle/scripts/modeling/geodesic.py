"""Geodesic click maps: how far each voxel is from the clicks when crossing an intensity edge costs distance.

A click says "this tissue", not "this far". Inside a homogeneous lesion the geodesic distance from a click stays
small however large the lesion is, and it jumps at the lesion's border, so a local convolution can tell a large
lesion's far side from the background next to it (DeepIGeoS, Wang et al. 2018, feed the same maps to their
refinement network). The refiner's Gaussian click maps say only how near a voxel is to a click, which is why its
first mask was a few voxels across whatever the lesion (docs/experiments.md, sections 18 and 20).

The distance is the shortest path on the 6-connected grid whose steps cost ``step`` plus the intensity change
between the two voxels, in units of the crop's median change (so CT and MR, and any normalisation, give the same
maps). Each pass along one axis is exact in one ``cummin``: with ``C`` the running sum of the step costs,
``D[k] = min_j (D[j] + C[k] - C[j]) = C[k] + cummin(D - C)[k]``. A few forward and backward sweeps over the three
axes let paths turn corners. No library we use computes geodesic distances on tensors in a batch (FastGeodis
builds a compiled extension per torch version), and this is a dozen tensor operations on the refiner's half-res grid.
"""

from __future__ import annotations

import torch

UNREACHED = 1e4  # distance of voxels no click reaches (rows without clicks of a kind)


def edge_costs(image: torch.Tensor, step: float = 0.1) -> list[torch.Tensor]:
    """image (B, 1, X, Y, Z) -> the cost of each step along X, Y and Z: (B, 1, X-1, Y, Z), (.., Y-1, ..), (.., Z-1)."""
    sides = zip((2, 3, 4), image.shape[2:])
    changes = [(image.narrow(d, 1, n - 1) - image.narrow(d, 0, n - 1)).abs() for d, n in sides]
    scale = torch.cat([c.flatten(1) for c in changes], dim=1).median(dim=1).values.clamp_min(1e-6)
    return [step + c / scale[:, None, None, None, None] for c in changes]


def geodesic_distance(seeds: torch.Tensor, costs: list[torch.Tensor], sweeps: int = 3) -> torch.Tensor:
    """seeds (B, 1, X, Y, Z) bool, costs from ``edge_costs`` (batch 1 broadcasts) -> (B, 1, X, Y, Z) distances."""
    distance = torch.where(seeds, 0.0, UNREACHED)
    for _ in range(sweeps):
        for dim, cost in zip((2, 3, 4), costs):
            running = torch.cat([torch.zeros_like(cost.narrow(dim, 0, 1)), cost], dim).cumsum(dim)
            distance = torch.minimum(distance, running + torch.cummin(distance - running, dim).values)
            backward = torch.cummin((distance + running).flip(dim), dim).values.flip(dim)
            distance = torch.minimum(distance, backward - running)
    return distance.clamp_max(UNREACHED)


def click_geodesic_maps(
    image: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, scales: tuple[float, ...] = (4.0, 16.0)
) -> torch.Tensor:
    """image (1 or B, 1, X, Y, Z) on the grid of the clicks divided by 2 (the refiner's half-res grid); points
    (B, N, 3) crop voxel indices; labels (B, N) (1 / 0 / -1 padding) -> (B, 2 * len(scales), X, Y, Z) in [0, 1]:
    exp(-distance / scale) from the positive clicks at each scale, then from the negative clicks."""
    batch, size = points.shape[0], image.shape[2:]
    with torch.no_grad():
        costs = edge_costs(image.float())
        index = (points.long() // 2).clamp_min(0)
        index = torch.minimum(index, index.new_tensor([n - 1 for n in size]))
        flat = (index[..., 0] * size[1] + index[..., 1]) * size[2] + index[..., 2]
        maps = []
        for value in (1, 0):
            seeds = torch.zeros(batch, size.numel(), dtype=torch.bool, device=points.device)
            rows, cols = torch.nonzero(labels == value, as_tuple=True)
            seeds[rows, flat[rows, cols]] = True
            distance = geodesic_distance(seeds.view(batch, 1, *size), costs)
            maps += [torch.exp(-distance / s) for s in scales]
    return torch.cat(maps, dim=1)
