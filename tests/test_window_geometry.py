"""Windows are resampled from the file's grid one at a time, and the mask goes back only over the windows' box:
both must give what resampling the whole volume gives (the definition the training transforms use)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from scripts.data.crops import crop_at
from scripts.data.inference_image import file_voxel_to_resampled, preprocess_image_for_inference
from scripts.interactive.sessions import ObjectState, pack_mask, unpack_mask
from scripts.interactive.windows import LogitVolume, merge_windows, to_file_grid

S = 32


def oblique_image() -> MetaTensor:
    """A smooth random volume on a rotated, anisotropic grid (0.7 x 0.9 x 2.5 mm), so no axis lines up."""
    rng = np.random.default_rng(0)
    coarse = torch.as_tensor(rng.normal(0, 100, (1, 1, 9, 8, 6)), dtype=torch.float32)
    values = torch.nn.functional.interpolate(coarse, size=(70, 60, 24), mode="trilinear")[0]
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.array([[c, -s, 0], [s * 0.9, c * 0.9, 0.3], [0, -0.3, 1.0]])
    rotation /= np.linalg.norm(rotation, axis=0)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 13.0, 40.0]
    return MetaTensor(values, affine=torch.as_tensor(affine))


@pytest.fixture(scope="module", params=["oblique", "lung1crop"])
def inference_image(request, real_data_dir):
    if request.param == "oblique":
        return preprocess_image_for_inference(oblique_image())
    return preprocess_image_for_inference(str(real_data_dir / "lung1crop_image.nrrd"), ct_clamp=True)


def test_window_crops_equal_crops_of_the_whole_resampled_volume(inference_image):
    inf = inference_image
    whole = inf.image
    assert tuple(whole.shape[1:]) == inf.resampled_shape
    np.testing.assert_allclose(whole.affine.numpy(), inf.resampled_affine)
    shape = np.asarray(inf.resampled_shape)
    starts = [(0, 0, 0), tuple(int(v) for v in shape // 2 - S // 2), (-7, 3, -20), tuple(int(v) for v in shape - 5)]
    scale = float(whole.abs().max())
    for start in starts:
        expected = crop_at(whole, start, S).as_tensor()
        got = inf.crop(start, S)
        assert got.shape == (1, S, S, S)
        torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=0)
    assert not inf.crop((-S - 5, 0, 0), S).any()  # entirely outside the volume: zero, like crop_at's padding


def whole_grid_mask(objects, inf) -> np.ndarray:
    """The definition: the union of the windows pasted into the whole resampled grid, resampled onto the file."""
    vol = torch.zeros(inf.resampled_shape, dtype=torch.bool)
    for obj in objects:
        for start, full in [(obj.start, obj.full), *obj.extra]:
            padded = torch.zeros([n + 2 * S for n in inf.resampled_shape], dtype=torch.bool)
            padded[tuple(slice(s + S, s + 2 * S) for s in start)] = full > 0
            vol |= padded[tuple(slice(S, S + n) for n in inf.resampled_shape)]
    src = MetaTensor(vol[None].float(), affine=torch.as_tensor(inf.resampled_affine))
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(inf.original_affine), spatial_size=inf.original_shape
    )
    return (torch.as_tensor(out)[0] > 0.5).numpy().astype(np.uint8)


def test_mask_goes_back_to_the_file_grid_as_the_whole_grid_resampling_does(inference_image):
    inf = inference_image
    rng = np.random.default_rng(1)
    shape = np.asarray(inf.resampled_shape)
    objects = []
    for start in [tuple(int(v) for v in shape // 3 - S // 2), (-9, int(shape[1]) - 20, 2)]:
        obj = ObjectState(start=start)
        obj.full = torch.as_tensor(rng.normal(-1.5, 1.0, (S, S, S)), dtype=torch.float16)  # scattered blobs
        obj.extra = [((start[0] + S // 2, start[1], start[2]), torch.as_tensor(rng.normal(-1.5, 1, (S, S, S))))]
        objects.append(obj)
    start, part = to_file_grid(merge_windows(objects, inf.resampled_shape, S), inf)
    got = unpack_mask(pack_mask(part, inf.original_shape, offset=start))
    expected = whole_grid_mask(objects, inf)
    assert expected.sum() > 100
    # Nearest-neighbour ties (a file voxel exactly halfway between two resampled voxels, common on CT grids) may
    # round either way in float arithmetic; every other voxel must agree.
    differ = np.argwhere(got != expected)
    coords = file_voxel_to_resampled(differ, inf.original_affine, inf.resampled_affine)
    at_tie = np.any(np.abs(coords - np.floor(coords) - 0.5) < 1e-6, axis=1)
    assert at_tie.all(), f"{int((~at_tie).sum())} voxels differ away from a nearest-neighbour tie"
    assert len(differ) < 1e-3 * got.size


def test_empty_and_outside_windows_give_an_empty_file_mask(inference_image):
    inf = inference_image
    obj = ObjectState(start=(-3 * S, 0, 0))
    obj.full = torch.ones((S, S, S))
    assert merge_windows([obj], inf.resampled_shape, S) is None
    start, part = to_file_grid(None, inf)
    assert unpack_mask(pack_mask(part, inf.original_shape, offset=start)).shape == inf.original_shape
    assert not part.any()


def test_logit_volume_prior_takes_the_maximum_where_windows_overlap():
    volume = LogitVolume((40, 40, 40), 8)
    a, b = torch.full((8, 8, 8), -2.0), torch.full((8, 8, 8), 3.0)
    b[:2] = -5.0
    volume.add((0, 0, 0), a)
    volume.add((4, 0, 0), b)
    prior = volume.prior((2, 0, 0))
    assert torch.all(prior[:2] == -2)  # only window a covers x 2..3
    assert torch.all(prior[2:4] == -2)  # x 4..5: max(-2, -5)
    assert torch.all(prior[4:6] == 3)  # x 6..7: max(-2, 3)
    assert torch.all(prior[6:] == 3)  # x 8..9: only b
    assert torch.all(volume.prior((30, 30, 30)) == 0)  # no window looked there: the "no prior" value
    edge = LogitVolume((10, 10, 10), 8)
    edge.add((5, 0, 0), torch.ones((8, 8, 8)))
    assert torch.all(edge.prior((5, 0, 0))[5:] == 0)  # outside the volume stays 0
