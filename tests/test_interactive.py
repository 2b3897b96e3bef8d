"""InteractiveSegmenter on real NRRD cases with a tiny random-init network: geometry, cache, undo, objects, extension,
and the click-consistent output (a random network ignores its clicks; the served mask must not).
"""

import copy

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from scripts.interactive import ClickError, InteractiveSegmenter
from scripts.interactive.cache import ByteLRU as _ByteLRU
from scripts.modeling import build_sgp_sam

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return build_sgp_sam("tiny", sgpm=True).eval()


@pytest.fixture(scope="module")
def brain1(real_data_dir):
    path = str(real_data_dir / "brain1_image.nrrd")
    return path, LoadImage(image_only=True, ensure_channel_first=True)(path)


@pytest.fixture(scope="module")
def segmenter(tiny_net):
    return InteractiveSegmenter(tiny_net, max_extra_windows=0)


CLICK_A, CLICK_B, CLICK_C = [128, 120, 12], [134, 118, 12], [120, 140, 13]


def test_geometry_and_embedding_cache(segmenter, brain1):
    path, loaded = brain1
    first = segmenter.segment(path, path, [CLICK_A], [], session_key="geometry")
    assert first.mask.shape == tuple(loaded.shape[1:]) == (256, 256, 25)
    assert first.mask.dtype == np.uint8 and set(np.unique(first.mask)) <= {0, 1}
    np.testing.assert_allclose(first.affine, np.asarray(loaded.affine), atol=1e-5)
    assert first.info["encoder_runs"] == 1 and first.info["decoder_runs"] == 1 and first.info["objects"] == 1

    second = segmenter.segment(path, path, [CLICK_A, CLICK_B], [], session_key="geometry")
    assert second.info["encoder_runs"] == 0 and second.info["cache_hits"] >= 1  # embedding reused
    assert second.info["decoder_runs"] == 1 and second.info["new_clicks"] == 1
    assert segmenter.stats["encoder_runs"] >= 1 and segmenter.stats["cache_hits"] >= 1


def test_undo_edit_reset(segmenter, brain1):
    path, _ = brain1
    key = "undo"
    m1 = segmenter.segment(path, path, [CLICK_A], [], session_key=key).mask
    m2 = segmenter.segment(path, path, [CLICK_A, CLICK_B], [], session_key=key).mask
    r3 = segmenter.segment(path, path, [CLICK_A, CLICK_B], [CLICK_C], session_key=key)
    assert r3.info["new_clicks"] == 1 and r3.info["decoder_runs"] == 1

    undo = segmenter.segment(path, path, [CLICK_A, CLICK_B], [], session_key=key)
    assert undo.info["undone_clicks"] == 1 and undo.info["decoder_runs"] == 0 and undo.info["encoder_runs"] == 0
    np.testing.assert_array_equal(undo.mask, m2)
    undo2 = segmenter.segment(path, path, [CLICK_A], [], session_key=key)
    np.testing.assert_array_equal(undo2.mask, m1)

    # an edited (moved) click is not a prefix: recomputed from the last common round boundary
    edited = segmenter.segment(path, path, [CLICK_A, [135, 118, 12]], [], session_key=key)
    assert edited.info["decoder_runs"] == 1 and edited.info["new_clicks"] == 1

    reset = segmenter.segment(path, path, [CLICK_A], [], session_key=key, reset=True)
    assert reset.info["reset"] and reset.info["decoder_runs"] == 1 and reset.info["encoder_runs"] == 0
    np.testing.assert_array_equal(reset.mask, m1)  # deterministic: same state as the first call

    segmenter.clear_session(key)
    again = segmenter.segment(path, path, [CLICK_A], [], session_key=key)
    assert again.info["decoder_runs"] == 1 and again.info["undone_clicks"] == 0


def test_far_apart_clicks_make_two_objects(segmenter, real_data_dir):
    # breast1 is 45x120x21 at 0.66 x 0.66 x 2.1 mm: clicks at both ends of j are ~75 mm apart (> 0.4 * 64 * 1.5)
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(real_data_dir / "breast1_image.nrrd"))
    assert isinstance(image, MetaTensor)
    res = segmenter.segment("breast1", image, [[22, 4, 10], [22, 115, 10]], [], session_key="objects")
    assert res.info["objects"] == 2 and res.info["encoder_runs"] == 2 and res.info["decoder_runs"] == 2
    assert res.mask.shape == tuple(image.shape[1:])
    near = segmenter.segment("breast1", image, [[22, 4, 10], [22, 115, 10], [24, 10, 10]], [], session_key="objects")
    assert near.info["objects"] == 2 and near.info["encoder_runs"] == 0 and near.info["decoder_runs"] == 1


def test_set_network_invalidates_cache(tiny_net, brain1):
    path, _ = brain1
    seg = InteractiveSegmenter(tiny_net, max_extra_windows=0, model_version="a")
    assert seg.segment(path, path, [CLICK_A], []).info["encoder_runs"] == 1
    assert seg.segment(path, path, [CLICK_A], [], reset=True).info["encoder_runs"] == 0
    seg.set_network(tiny_net, "b")
    res = seg.segment(path, path, [CLICK_A], [])
    assert res.info["encoder_runs"] == 1 and seg.model_version == "b"


def _constant_positive(net):
    """A copy whose decoder outputs large positive logits everywhere (mask = whole crop)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        up = net.mask_decoder.output_upscaling[3]
        up.weight.zero_()
        up.bias.fill_(1.0)  # GELU(1) > 0 everywhere
        last = net.mask_decoder.output_hypernetworks_mlps[0].layers[2]
        last.weight.zero_()
        last.bias.fill_(10.0)
    return net


def test_large_object_extends_with_overlapping_windows(tiny_net, brain1):
    path, _ = brain1
    seg = InteractiveSegmenter(_constant_positive(tiny_net), max_extra_windows=0)
    single = seg.segment(path, path, [CLICK_A], [])
    assert single.info["windows"] == 1 and single.mask.sum() > 0
    seg.max_extra_windows = 2
    extended = seg.segment(path, path, [CLICK_A], [], reset=True)
    assert extended.info["windows"] == 3 and extended.info["encoder_runs"] == 2  # main window came from the cache
    assert extended.mask.sum() > single.mask.sum()
    assert np.all(extended.mask[single.mask > 0] == 1)  # union: the main window's mask is kept


def test_refiner_output_is_served_with_exact_undo_and_extension(brain1):
    """A model with the high-resolution refiner: the app serves the refined mask (not the plain upsampling), keeps
    the refiner's per-window history so undo is exact, and refines extension windows too."""
    path, _ = brain1
    torch.manual_seed(0)
    plain = build_sgp_sam("tiny", sgpm=True, refiner=True).eval()
    refined = copy.deepcopy(plain)
    torch.nn.init.normal_(refined.refiner.out[1].weight, std=0.5)  # zero-initialised: make it count
    plain_mask = InteractiveSegmenter(plain, max_extra_windows=0).segment(path, path, [CLICK_A], []).mask
    seg = InteractiveSegmenter(refined, max_extra_windows=0)
    first = seg.segment(path, path, [CLICK_A], [], session_key="refined")
    assert not np.array_equal(first.mask, plain_mask)
    second = seg.segment(path, path, [CLICK_A, CLICK_B], [], session_key="refined")
    assert second.info["encoder_runs"] == 0 and second.info["decoder_runs"] == 1
    undo = seg.segment(path, path, [CLICK_A], [], session_key="refined")
    assert undo.info["decoder_runs"] == 0
    np.testing.assert_array_equal(undo.mask, first.mask)
    replay = seg.segment(path, path, [CLICK_A, CLICK_B], [], session_key="refined")
    np.testing.assert_array_equal(replay.mask, second.mask)  # the previous refined logits were kept for round 2

    wide = InteractiveSegmenter(_constant_positive(refined), max_extra_windows=2)
    extended = wide.segment(path, path, [CLICK_A], [])
    assert extended.info["windows"] == 3 and extended.mask.sum() > 0


def test_served_masks_obey_the_clicks_and_multi_click_decoders_see_them_all(brain1):
    """With ``click_consistent`` (the default) the file-grid mask holds every foreground click and no background
    click, whatever the network does; a ``multi_click`` network's decoder gets every click of the window. Undo
    restores the consistent mask exactly."""
    path, _ = brain1
    torch.manual_seed(0)
    net = build_sgp_sam("tiny", sgpm=True, click_map=True, refiner=True, multi_click=True).eval()
    torch.nn.init.normal_(net.refiner.out[1].weight, std=0.5)
    fed = []
    decode = net.decode
    net.decode = lambda emb, points, labels, mask: fed.append(points.shape[1]) or decode(emb, points, labels, mask)
    seg = InteractiveSegmenter(net, max_extra_windows=0)
    fg, bg = [CLICK_A, CLICK_B], [[131, 119, 12]]
    first = seg.segment(path, path, fg[:1], [], session_key="obey")
    result = seg.segment(path, path, fg, bg, session_key="obey")
    assert fed == [1, 3]  # round two: A again, then the new B and the background click
    assert all(result.mask[tuple(c)] == 1 for c in fg) and result.mask[tuple(bg[0])] == 0
    undo = seg.segment(path, path, fg[:1], [], session_key="obey")
    np.testing.assert_array_equal(undo.mask, first.mask)
    assert first.mask[tuple(CLICK_A)] == 1

    net.click_consistent = False
    raw = InteractiveSegmenter(net, max_extra_windows=0).segment(path, path, fg, bg).mask
    assert not np.array_equal(raw, result.mask)  # the random network's own mask disobeys somewhere


@pytest.mark.parametrize(
    "fg, bg, message",
    [
        ([[1, 2]], [], "foreground click #1 is not a list of 3 numbers"),
        ([[1, 2, float("nan")]], [], "non-finite"),
        ([[10, 10, 10]], [[1, "a", 2]], "background click #1 is not a list of 3 numbers"),
        ([[300, 10, 10]], [], "outside the image"),
        ([[10, 10, -3]], [], "outside the image"),
        ([], [], "no clicks"),
        ("12,3,4", [], "must be a list"),
    ],
)
def test_bad_clicks_raise_click_error(segmenter, brain1, fg, bg, message):
    path, _ = brain1
    with pytest.raises(ClickError, match=message) as err:
        segmenter.segment(path, path, fg, bg, session_key="bad")
    assert "\n" not in str(err.value)


def test_multichannel_image_needs_channel(segmenter):
    image = MetaTensor(torch.rand(2, 16, 16, 8), affine=torch.diag(torch.tensor([1.2, 1.2, 3.0, 1.0])))
    with pytest.raises(ClickError, match="2 channels") as err:
        segmenter.segment("four-d", image, [[5, 5, 4]], [])
    assert "\n" not in str(err.value)


def test_byte_lru_evicts_oldest():
    lru = _ByteLRU(100)
    assert lru.put("a", 1, 40) == 0 and lru.put("b", 2, 40) == 0
    assert lru.get("a") == 1  # "a" becomes most recent
    assert lru.put("c", 3, 40) == 1  # evicts "b"
    assert lru.get("b") is None and lru.get("a") == 1 and lru.total == 80
    assert lru.put("huge", 4, 1000) == 0 and lru.get("huge") is None  # larger than the cap: not stored
