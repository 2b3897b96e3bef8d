"""experiments/zoom_out_click.py, decoder_signal.py and first_click_logits.py: their geometry and that they replay the
bundle's evaluation protocol, on the vendored real CT nodule with the shipped default model."""

import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import decoder_signal, first_click_logits, zoom_out_click  # noqa: E402
from scripts.clicks import dice  # noqa: E402
from scripts.data.crops import lesion_crops  # noqa: E402
from scripts.data.transforms import get_preprocess_transforms  # noqa: E402
from scripts.model_file import default_model_path, read_model_file  # noqa: E402
from scripts.training.click_rounds import evaluation_clicks  # noqa: E402


def test_coarse_crop_lines_up_with_the_fine_crop():
    size = 16
    volume = torch.zeros((1, 64, 64, 64))
    start = np.array([20, 20, 20])
    volume[0, 26:30, 24:28, 28:32] = 1.0  # fine-crop voxels 6..9, 4..7, 8..11: whole coarse voxels
    coarse = zoom_out_click.coarse_image(volume, start, size, "upstream")[0, 0]
    peak = np.argwhere((coarse == coarse.max()).numpy())
    # fine-crop voxel 6 lies 14 voxels into the 32-wide crop: coarse voxel 7
    assert peak.min(0).tolist() == [7, 6, 8] and peak.max(0).tolist() == [8, 7, 9]
    centre = zoom_out_click.to_coarse([7.5, 5.5, 9.5], size)[0, 0].tolist()
    assert centre == pytest.approx([7.5, 6.5, 8.5])  # the middle of those coarse voxels
    back = zoom_out_click.to_fine(coarse[None, None]) > 0.5 * float(coarse.max())
    assert back.shape == (1, 1, size, size, size)
    assert np.argwhere(back[0, 0].numpy()).mean(0) == pytest.approx([7.5, 5.5, 9.5])


@pytest.fixture(scope="module")
def nodule(real_data_dir, one_thread):
    model = read_model_file(default_model_path())
    network, pre = model.network.eval(), model.preprocessing
    pipeline = get_preprocess_transforms(1, pre.image_channel, pre.ct_clamp, pre.spacing)
    case = {kind: str(real_data_dir / f"lung1crop_{kind}.nrrd") for kind in ("image", "label")}
    data = pipeline(case)
    _, _, start, crop, target = next(lesion_crops(data["image"], data["label"], pre.roi_size, 3, pre.normalisation))
    return network, pre, data["image"], start, crop[None].float(), np.asarray(target, dtype=bool)


def test_fine_start_replays_the_bundle_evaluation(nodule):
    network, _, _, _, image, target = nodule
    expected = evaluation_clicks(network, image, target, 3)["dice"]
    assert zoom_out_click.play(network, image, target, 3, "fine") == pytest.approx(expected, abs=1e-6)
    assert max(expected) >= 0.6  # the shipped model on this nodule (an untrained network stays near 0)


def test_both_coarse_paths_play_the_same_first_round(nodule):
    network, pre, volume, start, _, target = nodule
    wide = zoom_out_click.coarse_image(volume, start, pre.roi_size, pre.normalisation)
    first = zoom_out_click.next_eval_click(np.zeros_like(target), target)[0]
    full, low = zoom_out_click.coarse_round(network, wide, first, pre.roi_size)
    assert full.shape[2:] == target.shape and low.shape[2:] == network.low_res_size
    first_dice = dice((full > 0)[0, 0].numpy(), target)
    assert zoom_out_click.play(network, wide, target, 2, "coarse_all")[0] == pytest.approx(first_dice, abs=1e-6)


def test_decoder_variants_keep_or_flatten_the_decoder_pattern(nodule):
    network, _, _, _, image, target = nodule
    variants = decoder_signal.decoder_variants(network.upscale_logits, [2.0])
    low = torch.linspace(-2, 1, int(np.prod(network.low_res_size))).reshape(1, 1, *network.low_res_size)
    served, flat, doubled = (variants[k](low, target.shape) for k in ("as served", "crop mean only", "deviation x 2"))
    assert torch.equal(served, network.upscale_logits(low, target.shape)) and served.std() > 0.1
    assert flat.std() < 1e-6 and flat.mean() == pytest.approx(float(served.mean()), abs=1e-5)
    spread = float((served - served.mean()).abs().max())
    assert float((doubled - doubled.mean()).abs().max()) == pytest.approx(2 * spread, rel=1e-4)


def test_geodesic_distance_from_the_click_outlines_the_nodule(nodule):
    """The image alone outlines this CT nodule from one click, when crossing its edge costs distance."""
    network, _, _, _, image, target = nodule
    point = evaluation_clicks(network, image, target, 1)["points"][0]
    distance = first_click_logits.click_distance(network, image, point)
    assert distance.shape == target.shape and distance[point] == 0
    cut = {t: dice(first_click_logits.click_component(-distance, -t, point), target) for t in (2, 16)}
    assert cut[16] > 0.6 > 0.3 > cut[2]  # near the click only a core; at 16 the nodule and little else
