"""Geodesic click maps: exact shortest paths, edges that stop them, and a refiner input that starts switched off."""

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from scripts.checkpoint import load_weights
from scripts.modeling import build_sgp_sam
from scripts.modeling.geodesic import UNREACHED, click_geodesic_maps, edge_costs, geodesic_distance


def _dijkstra_reference(costs: list[torch.Tensor], shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Shortest paths on the same 6-connected graph by scipy's Dijkstra."""
    index = np.arange(np.prod(shape)).reshape(shape)
    rows, cols, weights = [], [], []
    for axis, cost in enumerate(costs):
        near = index.take(range(shape[axis] - 1), axis=axis).ravel()
        far = index.take(range(1, shape[axis]), axis=axis).ravel()
        rows += [near, far]
        cols += [far, near]
        weights += [cost[0, 0].numpy().ravel()] * 2
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(index.size,) * 2)
    return dijkstra(graph.tocsr(), indices=seed).reshape(shape)


def test_sweeps_give_the_exact_shortest_paths():
    torch.manual_seed(0)
    shape = (9, 7, 8)
    image = torch.randn(1, 1, *shape)
    costs = edge_costs(image)
    seeds = torch.zeros(1, 1, *shape, dtype=torch.bool)
    seeds[0, 0, 4, 3, 2] = True
    distance = geodesic_distance(seeds, costs, sweeps=8)[0, 0].numpy()
    expected = _dijkstra_reference(costs, shape, int(np.ravel_multi_index((4, 3, 2), shape)))
    np.testing.assert_allclose(distance, expected, rtol=1e-4)
    three = geodesic_distance(seeds, costs)[0, 0].numpy()  # the refiner's three sweeps: never shorter, nearly there
    assert (three >= expected - 1e-3).all() and np.median(three / np.maximum(expected, 1e-6)) < 1.05


def test_uniform_image_gives_step_times_city_block_distance():
    image = torch.full((1, 1, 6, 6, 6), 3.0)
    seeds = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    seeds[0, 0, 1, 2, 3] = True
    grid = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"))
    city_block = (grid - torch.tensor([1, 2, 3])[:, None, None, None]).abs().sum(0).float()
    assert torch.allclose(geodesic_distance(seeds, edge_costs(image, step=0.5))[0, 0], 0.5 * city_block)
    assert (geodesic_distance(torch.zeros_like(seeds), edge_costs(image)) == UNREACHED).all()


def test_far_side_of_a_large_lesion_is_nearer_than_the_tissue_beside_the_click():
    """What the Gaussian click maps cannot say: a homogeneous lesion is one region, however large."""
    torch.manual_seed(1)
    image = 0.02 * torch.randn(1, 1, 32, 32, 32)
    image[..., 4:28, 4:28, 4:28] += 1.0  # a lesion 24 voxels across (half-res voxels)
    points, labels = torch.tensor([[[48, 32, 32]]]), torch.tensor([[1]])  # crop voxels: half-res (24, 16, 16)
    maps = click_geodesic_maps(image, points, labels)
    assert maps.shape == (1, 4, 32, 32, 32)
    far_inside, near_outside = maps[0, 1, 6, 16, 16], maps[0, 1, 29, 16, 16]  # 18 voxels in, 5 voxels out
    assert far_inside > 4 * near_outside
    assert maps[0, 2:].max() == 0  # no negative click: nothing reached


def test_refiner_geodesic_input_starts_switched_off():
    torch.manual_seed(7)
    plain = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True, refiner=True).eval()
    geodesic = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True, refiner=True, refiner_geodesic=True)
    geodesic.eval()
    torch.nn.init.normal_(plain.refiner.out[1].weight, std=0.1)  # leave the identity start
    report = load_weights(geodesic, plain.state_dict())
    assert sorted(report["initialised"]) == ["refiner.geodesic_in.bias", "refiner.geodesic_in.weight"]
    images = torch.randn(1, 1, 32, 32, 32)
    points, labels = torch.tensor([[[4.0, 5.0, 6.0], [20.0, 20.0, 20.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        low, _ = plain.decode(plain.encode(images), points, labels)
        outputs = [
            m.full_res_logits(low, None, m.refine_features(images), None, points, labels) for m in (plain, geodesic)
        ]
        assert torch.equal(outputs[0], outputs[1])  # a file trained without the maps computes the same
        torch.nn.init.normal_(geodesic.refiner.geodesic_in.weight, std=0.1)
        trained = geodesic.full_res_logits(low, None, geodesic.refine_features(images), None, points, labels)
    assert not torch.allclose(trained, outputs[0])  # the maps feed the output


@pytest.mark.parametrize("batch", [1, 3])
def test_maps_of_one_crop_broadcast_over_prompts(batch):
    refiner = build_sgp_sam("tiny", sgpm=False, img_size=32, refiner=True, refiner_geodesic=True).refiner
    features = refiner.image_features(torch.randn(1, 1, 32, 32, 32))
    points = torch.tensor([[[3, 4, 5]], [[20, 21, 22]], [[9, 9, 30]]])[:batch]
    labels = torch.ones(batch, 1, dtype=torch.long)
    broadcast = refiner.geodesic_maps(features, points, labels)  # one crop, a batch of prompts
    for row in range(batch):
        single = refiner.geodesic_maps(features, points[row : row + 1], labels[row : row + 1])
        assert torch.equal(broadcast[row : row + 1], single)
        assert single[0, 0][tuple(points[row, 0] // 2)] == 1.0  # the clicked half-res voxel is at distance 0
