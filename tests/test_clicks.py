"""Tests for bundle/scripts/clicks.py: training clicks, round schedule, evaluation clicks and metrics."""

import math
import random

import numpy as np
import pytest
import torch
from scripts.clicks import (
    click_consistent_logits,
    dice,
    lesion_size_bin,
    next_eval_click,
    number_of_clicks,
    sample_training_click,
    summarise,
    training_round_schedule,
)


# ------------------------------------------------------------------------------------------------ training clicks
def test_training_click_inside_error_region_with_right_label():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        target = torch.rand(4, 1, 6, 7, 5, generator=gen) > 0.7
        pred = torch.rand(4, 1, 6, 7, 5, generator=gen) > 0.7
        points, labels = sample_training_click(pred, target, gen)
        assert points.shape == (4, 1, 3) and points.dtype == torch.float32
        assert labels.shape == (4, 1) and labels.dtype == torch.long
        for b in range(4):
            x, y, z = points[b, 0].long().tolist()
            assert pred[b, 0, x, y, z] != target[b, 0, x, y, z], "click outside the error region"
            assert labels[b, 0].item() == int(target[b, 0, x, y, z]), "label must be 1 for FN, 0 for FP"


def test_training_click_is_uniform_over_error_voxels():
    gen = torch.Generator().manual_seed(1)
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    pred = torch.zeros_like(target)
    target[0, 0, 1, 2, 3] = True  # one FN voxel
    pred[0, 0, 6, 5, 4] = True  # one FP voxel
    pred_b, target_b = pred.expand(400, -1, -1, -1, -1), target.expand(400, -1, -1, -1, -1)
    points, labels = sample_training_click(pred_b, target_b, gen)
    fn = points[:, 0].long().eq(torch.tensor([1, 2, 3])).all(-1)
    fp = points[:, 0].long().eq(torch.tensor([6, 5, 4])).all(-1)
    assert (fn | fp).all()
    assert 120 < fn.sum().item() < 280  # binomial(400, 0.5): ±8 sigma
    assert (labels[:, 0] == fn.long()).all()


def test_training_click_without_error():
    gen = torch.Generator().manual_seed(2)
    target = torch.zeros(2, 1, 5, 5, 5, dtype=torch.bool)
    target[0, 0, 1:3, 2:4, 0:2] = True  # sample 0: solved lesion -> positive click inside it
    pred = target.clone()  # sample 1: both empty -> negative click anywhere
    for _ in range(20):
        points, labels = sample_training_click(pred, target, gen)
        x, y, z = points[0, 0].long().tolist()
        assert target[0, 0, x, y, z] and labels[0, 0] == 1
        assert labels[1, 0] == 0
        assert ((points[1, 0] >= 0) & (points[1, 0] <= 4)).all()


def test_training_click_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    target = torch.rand(2, 1, 16, 16, 16, device="cuda") > 0.5
    pred = torch.rand(2, 1, 16, 16, 16, device="cuda") > 0.5
    points, labels = sample_training_click(pred, target, gen)
    assert points.device.type == "cuda" and labels.device.type == "cuda"


def test_round_schedule():
    seen = set()
    for seed in range(300):
        schedule = training_round_schedule(11, np.random.default_rng(seed))
        assert len(schedule) == 11
        mask_only = [i for i, fed in enumerate(schedule) if not fed]
        assert len(mask_only) == 2 and mask_only[-1] == 10
        assert 2 <= mask_only[0] <= 8  # 0-based index, as upstream's np.random.randint(2, 9)
        assert schedule[0]  # the first round needs its click
        seen.add(mask_only[0])
    assert seen == set(range(2, 9))
    schedule = training_round_schedule(11, random.Random(3))
    assert schedule.count(False) == 2 and not schedule[-1]
    assert training_round_schedule(1) == [True]


# ------------------------------------------------------------------------------------------------ evaluation clicks
def _brute_depth(region, spacing=(1.0, 1.0, 1.0)):
    """Distance of every region voxel to the nearest non-region voxel, the crop border counted as outside."""
    padded = np.pad(region, 1)
    inside = np.argwhere(padded) * np.asarray(spacing)
    outside = np.argwhere(~padded) * np.asarray(spacing)
    d = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1)).min(1)
    depth = np.zeros(padded.shape)
    depth[tuple(np.argwhere(padded).T)] = d
    return depth[1:-1, 1:-1, 1:-1]


def _expected_deepest(region, spacing=(1.0, 1.0, 1.0)):
    depth = _brute_depth(region, spacing)
    best = depth.max()
    flat = int(np.flatnonzero(np.isclose(depth.ravel(), best, rtol=0, atol=1e-9))[0])  # lowest flat index
    return np.array(np.unravel_index(flat, region.shape)), best


def test_first_click_dumbbell_goes_to_bigger_ball_centre():
    grid = np.indices((30, 15, 15)).transpose(1, 2, 3, 0)
    big = ((grid - [20, 7, 7]) ** 2).sum(-1) <= 36  # radius 6
    small = ((grid - [6, 7, 7]) ** 2).sum(-1) <= 9  # radius 3
    bar = np.zeros_like(big)
    bar[6:21, 7, 7] = True
    target = big | small | bar
    point, label = next_eval_click(np.zeros_like(target), target)
    assert label == 1
    assert point.tolist() == [20, 7, 7]


def test_first_click_l_shape_matches_brute_force():
    target = np.zeros((16, 18, 8), dtype=bool)
    target[2:14, 2:7, 1:7] = True
    target[2:7, 2:16, 1:7] = True
    point, label = next_eval_click(np.zeros_like(target), target)
    expected, _ = _expected_deepest(target)
    assert label == 1 and target[tuple(point)]
    assert point.tolist() == expected.tolist()


def test_first_click_touching_crop_border():
    # slab filling the crop in y and z, from the x=0 face to x=5: the crop border must count as outside
    target = np.zeros((10, 10, 10), dtype=bool)
    target[0:6] = True
    point, label = next_eval_click(np.zeros_like(target), target)
    assert label == 1
    assert point.tolist() == [2, 2, 2]  # depth 3 = min(x + 1, 6 - x, y + 1, 10 - y, z + 1, 10 - z), lowest index
    assert point.tolist() == _expected_deepest(target)[0].tolist()


@pytest.mark.parametrize("spacing", [None, (1.0, 2.0, 3.5)])
def test_eval_click_random_blob_matches_brute_force(spacing):
    rng = np.random.default_rng(4)
    target = rng.random((9, 10, 8)) > 0.35
    pred = rng.random((9, 10, 8)) > 0.6
    result = next_eval_click(pred, target, spacing=spacing)
    sp = (1.0, 1.0, 1.0) if spacing is None else spacing
    fn_point, fn_best = _expected_deepest(target & ~pred, sp)
    fp_point, fp_best = _expected_deepest(pred & ~target, sp)
    expected = (fn_point, 1) if fn_best > fp_best + 1e-9 else (fp_point, 0)
    assert result[1] == expected[1]
    assert result[0].tolist() == expected[0].tolist()


def test_eval_click_anisotropic_spacing_changes_the_answer():
    # a 7x7x7 box: in voxels the centre is deepest; with thick z voxels depth is capped by x/y everywhere in z
    target = np.zeros((9, 9, 9), dtype=bool)
    target[1:8, 1:8, 1:8] = True
    iso, _ = next_eval_click(np.zeros_like(target), target)
    aniso, _ = next_eval_click(np.zeros_like(target), target, spacing=(1.0, 1.0, 5.0))
    assert iso.tolist() == [4, 4, 4]
    assert aniso.tolist() == [4, 4, 1]  # every z slice has x/y depth 4: lowest flat index wins


def test_next_click_fn_larger():
    target = np.zeros((20, 20, 20), dtype=bool)
    target[2:12, 2:12, 2:12] = True
    pred = np.zeros_like(target)
    pred[2:12, 2:12, 2:6] = True  # FN slab 10x10x6 remains (depth 3)
    pred[15:17, 15:17, 15:17] = True  # small FP cube (depth 1)
    point, label = next_eval_click(pred, target)
    assert label == 1
    assert target[tuple(point)] and not pred[tuple(point)]


def test_next_click_fp_larger():
    target = np.zeros((20, 20, 20), dtype=bool)
    target[2:8, 2:8, 2:8] = True
    pred = target.copy()
    pred[2, 2, 2] = False  # single FN voxel (depth 1)
    pred[10:18, 10:18, 10:18] = True  # FP cube 8³ (depth 4)
    point, label = next_eval_click(pred, target)
    assert label == 0
    assert point.tolist() == [13, 13, 13]  # lowest flat index among the eight central voxels


def test_next_click_tie_goes_to_fp_and_no_error_is_none():
    target = np.zeros((8, 8, 8), dtype=bool)
    pred = np.zeros_like(target)
    target[1, 1, 1] = True
    pred[5, 5, 5] = True
    assert next_eval_click(pred, target)[1] == 0  # equal depth: FN must be strictly larger (RITM)
    assert next_eval_click(target, target) is None
    assert next_eval_click(np.zeros_like(target), np.zeros_like(target)) is None


# ------------------------------------------------------------------------------------------------ metrics
def test_dice():
    a = np.zeros((4, 4, 4), dtype=bool)
    b = np.zeros_like(a)
    assert dice(a, b) == 1.0
    b[0, 0, 0] = True
    assert dice(b, a) == 0.0  # false positive on an empty target
    assert dice(a, b) == 0.0
    a[0, 0, 0:2] = True
    assert dice(a, b) == pytest.approx(2 * 1 / (2 + 1))
    assert dice(torch.as_tensor(a), torch.as_tensor(a)) == 1.0


def test_number_of_clicks():
    assert number_of_clicks([0.5, 0.86, 0.95], 0.85) == 2
    assert number_of_clicks([0.5, 0.86, 0.95], 0.90) == 3
    assert number_of_clicks([0.9], 0.9) == 1  # reaching the threshold exactly counts
    assert number_of_clicks([0.1] * 25, 0.85) == 20
    assert number_of_clicks([0.1] * 20 + [0.99], 0.85) == 20  # success after the cap does not count
    assert number_of_clicks([], 0.85, max_clicks=7) == 7
    with pytest.raises(ValueError):
        number_of_clicks([0.9], 85)


def test_lesion_size_bin_edges():
    # d = (6 V / pi)^(1/3): 523 voxels of 1 mm³ -> 9.996 mm, 524 -> 10.003 mm
    assert lesion_size_bin(523, 1.0) == "<10mm"
    assert lesion_size_bin(524, 1.0) == "10-30mm"
    # 30 mm: V = 4500 pi = 14137.2 mm³
    assert lesion_size_bin(14137, (1.0, 1.0, 1.0)) == "10-30mm"
    assert lesion_size_bin(14138, (1.0, 1.0, 1.0)) == ">30mm"
    # 1.5 mm isotropic: 3.375 mm³ per voxel, 155 voxels -> 523.1 mm³ -> 9.995 mm
    assert lesion_size_bin(155, 1.5) == "<10mm"
    assert lesion_size_bin(156, (1.5, 1.5, 1.5)) == "10-30mm"
    assert lesion_size_bin(0, 1.0) == "<10mm"


def test_summarise_by_hand():
    records = [
        {"dice": [0.5, 0.7, 0.8, 0.86, 0.9], "size_bin": "<10mm"},  # shorter than 10: carries 0.9 forward
        {"dice": [0.9] + [0.95] * 19, "size_bin": "<10mm"},
        {"dice": [0.2] * 20, "num_voxels": 20000, "spacing": 1.0},  # d = 33.7 mm -> ">30mm"
    ]
    out = summarise(records)
    assert set(out) == {"overall", "<10mm", "10-30mm", ">30mm"}
    overall = out["overall"]
    assert overall["dice@1"]["mean"] == pytest.approx((0.5 + 0.9 + 0.2) / 3)
    assert overall["dice@1"]["n"] == 3
    m = (0.5 + 0.9 + 0.2) / 3
    assert overall["dice@1"]["std"] == pytest.approx(math.sqrt(((0.5 - m) ** 2 + (0.9 - m) ** 2 + (0.2 - m) ** 2) / 3))
    assert overall["dice@3"]["mean"] == pytest.approx((0.8 + 0.95 + 0.2) / 3)
    assert overall["dice@10"]["mean"] == pytest.approx((0.9 + 0.95 + 0.2) / 3)
    # NoC@85: 4, 1, 20; NoC@90: 5, 1, 20
    assert overall["noc@85"]["mean"] == pytest.approx(25 / 3)
    assert overall["noc@90"]["mean"] == pytest.approx(26 / 3)
    small = out["<10mm"]
    assert small["dice@5"]["mean"] == pytest.approx((0.9 + 0.95) / 2) and small["dice@5"]["n"] == 2
    assert small["noc@90"]["mean"] == 3.0 and small["noc@90"]["std"] == 2.0
    assert out[">30mm"]["noc@85"]["mean"] == 20.0 and out[">30mm"]["noc@85"]["std"] == 0.0
    assert out["10-30mm"]["dice@1"]["n"] == 0 and math.isnan(out["10-30mm"]["dice@1"]["mean"])


class _ClickRecorder(torch.nn.Module):
    """A stand-in network exposing the click-round API that records the clicks each round receives."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.size = size
        self.decoded, self.refined = [], []

    low_res_size = property(lambda self: (self.size // 2,) * 3)

    def encode(self, images):
        return images

    def refine_features(self, images):
        return None

    def decode(self, embeddings, points=None, labels=None, mask_input=None):
        self.decoded.append(None if points is None else (points.clone(), labels.clone()))
        return torch.full((embeddings.shape[0], 1, *self.low_res_size), -1.0) + self.bias, None

    def full_res_logits(self, low_res, size, features, prev_logits, points, labels):
        self.refined.append(None if points is None else points.shape[1])
        return torch.nn.functional.interpolate(low_res, size=tuple(size), mode="trilinear", align_corners=False)


def test_training_clicks_are_drawn_in_the_lesion_and_the_refiner_sees_every_click():
    from scripts.training.click_rounds import training_rounds

    target = torch.zeros(2, 1, 16, 16, 16, dtype=torch.bool)
    target[:, :, 3:10, 4:11, 5:12] = True  # a 7^3 cube
    net = _ClickRecorder()
    loss = lambda logits, y: (logits - y).abs().mean()  # noqa: E731
    generator = torch.Generator().manual_seed(3)
    training_rounds(net, target.float(), target.float(), loss, 4, random.Random(0), generator)
    first_points, first_labels = net.decoded[0]
    assert first_labels.tolist() == [[1], [1]]  # round one: the error region is the whole lesion
    assert all(bool(target[b, 0][tuple(first_points[b, 0].long())]) for b in range(2))
    fed = [d is not None for d in net.decoded]
    assert fed[0] and not fed[-1]  # the last round is mask-only
    # the decoder gets the new click only; the refiner every click fed so far
    assert all(d[0].shape[1] == 1 for d in net.decoded if d is not None)
    assert net.refined == list(np.cumsum(fed).astype(int))


def test_central_region_is_the_lesions_core():
    from scripts.clicks import central_region

    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    radius = ((grid - 15.0) ** 2).sum(0).sqrt()
    target = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
    target[0, 0] = radius <= 10  # a ball of radius 10; sample 1 stays empty
    core = central_region(target)
    assert core.shape == target.shape and core.dtype == torch.bool
    assert bool(core[0, 0, 15, 15, 15]) and not core[1].any()
    assert bool((core <= target).all())
    # depth >= half the deepest (11 at the centre): the ball within about 5.5 of the centre
    assert float(radius[core[0, 0]].max()) <= 6.0 and float(radius[core[0, 0]].min()) == 0.0
    assert 0.08 < core[0].sum() / target[0].sum() < 0.2  # about (1/2)^3 of the ball
    # a lesion that fills the crop: the crop's outside is background, so the core sits in the middle
    full = central_region(torch.ones(1, 1, 9, 9, 9, dtype=torch.bool))[0, 0]
    assert bool(full[4, 4, 4]) and not full[0].any() and not full[:, :, 8].any()
    assert torch.nonzero(full).float().mean(0).tolist() == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_first_training_clicks_come_from_the_centre_when_asked(share):
    from scripts.clicks import central_region
    from scripts.training.click_rounds import training_rounds

    target = torch.zeros(64, 1, 16, 16, 16, dtype=torch.bool)
    target[:, :, 1:15, 1:15, 1:15] = True  # a 14^3 cube: its core is a small fraction of it
    core = central_region(target)
    net = _ClickRecorder()
    loss = lambda logits, y: (logits - y).abs().mean()  # noqa: E731
    generator = torch.Generator().manual_seed(5)
    training_rounds(
        net, target.float(), target.float(), loss, 3, random.Random(0), generator, central_first_click=share
    )
    points, labels = net.decoded[0]
    in_core = [bool(core[b, 0][tuple(points[b, 0].long())]) for b in range(64)]
    assert labels.flatten().tolist() == [1] * 64
    # the core holds 8^3 of the cube's 14^3 voxels: a uniform draw lands there about 12 times in 64
    expected = {0.0: (0, 24), 0.5: (26, 52), 1.0: (64, 64)}[share]
    assert expected[0] <= sum(in_core) <= expected[1]


def test_first_round_weight_scales_only_the_first_rounds_loss():
    from scripts.training.click_rounds import training_rounds

    target = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    target[:, :, 3:10, 4:11, 5:12] = True
    totals, per_round = {}, {}
    for weight in (1.0, 3.0):
        net = _ClickRecorder()
        seen = per_round.setdefault(weight, [])
        # round k's loss is scaled by k + 1, so scaling any round but the first would change the totals
        loss = lambda logits, y: seen.append((len(seen) + 1) * (logits - y).abs().mean()) or seen[-1]  # noqa: E731
        totals[weight], _ = training_rounds(
            net, target.float(), target.float(), loss, 4, random.Random(0), first_round_weight=weight
        )
    assert len(per_round[1.0]) == 4
    assert torch.allclose(totals[1.0], sum(per_round[1.0]))
    assert torch.allclose(totals[3.0], 3 * per_round[3.0][0] + sum(per_round[3.0][1:]))
    assert torch.allclose(totals[3.0] - totals[1.0], 2 * per_round[1.0][0])


def test_decoder_loss_weight_adds_the_decoders_own_loss_when_a_refiner_follows_it():
    from scripts.training.click_rounds import training_rounds

    class Refined(_ClickRecorder):
        refiner = torch.nn.Identity()  # marks a refining network; the recorder's full_res_logits stands for it

        def upscale_logits(self, low_res, size):
            return torch.full((low_res.shape[0], 1, *size), 5.0)  # distinct from the refined logits

        def full_res_logits(self, low_res, size, features, prev_logits, points, labels):
            return torch.zeros((low_res.shape[0], 1, *size))

    target = torch.zeros(1, 1, 16, 16, 16)
    target[:, :, 3:10, 4:11, 5:12] = 1.0
    loss = lambda logits, y: (torch.sigmoid(logits) - y).abs().mean()  # noqa: E731
    refined_only = loss(torch.zeros_like(target), target)
    decoded_only = loss(torch.full_like(target, 5.0), target)
    plain, _ = training_rounds(_ClickRecorder(), target, target, loss, 3, random.Random(0))
    for network, weight, expected in (
        (Refined(), 0.0, 3 * refined_only),
        (Refined(), 0.5, 3 * (refined_only + 0.5 * decoded_only)),
        (_ClickRecorder(), 0.5, plain),  # no refiner: the decoder's logits are already what the loss sees
    ):
        total, _ = training_rounds(network, target, target, loss, 3, random.Random(0), decoder_loss_weight=weight)
        assert torch.allclose(total, expected)


def test_multi_click_networks_get_every_click_in_the_decoder():
    """SAM-Med3D's --multi_click: training and evaluation rounds feed the decoder every click so far."""
    from scripts.training.click_rounds import evaluation_clicks, training_rounds

    target = torch.zeros(2, 1, 16, 16, 16, dtype=torch.bool)
    target[:, :, 3:10, 4:11, 5:12] = True
    net = _ClickRecorder()
    net.multi_click = True
    loss = lambda logits, y: (logits - y).abs().mean()  # noqa: E731
    training_rounds(net, target.float(), target.float(), loss, 5, random.Random(0))
    fed = [d is not None for d in net.decoded]
    assert [d[0].shape[1] for d in net.decoded if d is not None] == list(np.cumsum(fed)[np.asarray(fed)])
    assert net.refined == list(np.cumsum(fed).astype(int))
    last = [d for d in net.decoded if d is not None][-1]
    assert torch.equal(last[0][:, :1], net.decoded[0][0])  # the history keeps the first click first

    net.decoded.clear()
    result = evaluation_clicks(net, target[:1].float(), target[0, 0].numpy(), 3)
    assert [d[0].shape[1] for d in net.decoded] == [1, 2, 3][: len(result["dice"])]
    assert [tuple(p) for p in net.decoded[-1][0][0].int().tolist()] == result["points"]


# ------------------------------------------------------------------------------------------------ click consistency
def _two_blobs() -> torch.Tensor:
    """(2, 1, 12, 12, 12) logits: a lesion-like blob and, apart from it, a second one (a neighbour, a vessel)."""
    logits = torch.full((2, 1, 12, 12, 12), -2.0)
    logits[:, :, 2:6, 2:6, 2:6] = 1.5
    logits[:, :, 8:11, 8:11, 8:11] = 0.7
    return logits


def test_click_consistent_logits_obey_every_click_and_keep_the_clicked_lesion():
    logits = _two_blobs()
    points = torch.tensor(
        [[[3.0, 3.0, 3.0], [0.0, 11.0, 0.0], [4.2, 3.9, 5.1]], [[9.0, 9.0, 9.0], [0, 0, 0], [0, 0, 0]]]
    )
    labels = torch.tensor([[1, 1, 0], [1, -1, -1]])  # sample 1: one click, then padding
    out = click_consistent_logits(logits, points, labels)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    mask = out > 0
    # sample 0: the missed foreground click becomes lesion (its own component, kept), the background click (rounded
    # to (4, 4, 5)) leaves the blob, and the unclicked second blob is dropped
    assert mask[0, 0, 0, 11, 0] and out[0, 0, 0, 11, 0] == 4.0
    assert not mask[0, 0, 4, 4, 5] and out[0, 0, 4, 4, 5] == -4.0
    assert int(mask[0, 0, 2:6, 2:6, 2:6].sum()) == 4**3 - 1
    assert not mask[0, 0, 8:11, 8:11, 8:11].any()
    assert int(mask[0].sum()) == 4**3 - 1 + 1
    # sample 1: only the clicked second blob is kept; padding (-1) is no click
    assert mask[1, 0, 8:11, 8:11, 8:11].all() and not mask[1, 0, 2:6, 2:6, 2:6].any() and not mask[1, 0, 0, 0, 0]
    # logits whose sign already agrees keep their value (the refiner's next input stays the network's own)
    agree = (logits > 0) == mask
    assert torch.equal(out[agree], logits[agree])


def test_click_consistent_logits_without_foreground_clicks_or_component_filter():
    logits = _two_blobs()[:1]
    assert torch.equal(click_consistent_logits(logits, None, None), logits)
    assert torch.equal(click_consistent_logits(logits, torch.zeros(1, 0, 3), torch.zeros(1, 0)), logits)
    background_only = click_consistent_logits(logits, torch.tensor([[[3.0, 3.0, 3.0]]]), torch.tensor([[0]]))
    assert int((background_only > 0).sum()) == int((logits > 0).sum()) - 1  # nothing clicked on: both blobs stay
    kept = click_consistent_logits(
        logits, torch.tensor([[[3.0, 3.0, 3.0]]]), torch.tensor([[1]]), keep_clicked_components=False
    )
    assert torch.equal(kept, logits)
    undone = torch.tensor([[[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]]), torch.tensor([[1, 0]])  # a click taken back
    assert not (click_consistent_logits(torch.full_like(logits, -1.0), *undone) > 0).any()
    with pytest.raises(ValueError, match="expected"):
        click_consistent_logits(logits[0], torch.tensor([[[3.0, 3.0, 3.0]]]), torch.tensor([[1]]))


def test_evaluation_rounds_of_a_click_consistent_network_agree_with_every_click():
    """A random network ignores its clicks; with ``click_consistent`` (the default) every mask the evaluation scores
    still holds each foreground click, no background click, and only the clicked component; without it the raw
    output is scored."""
    from scipy import ndimage
    from scripts.modeling import build_sgp_sam
    from scripts.training.click_rounds import evaluation_clicks

    torch.manual_seed(0)
    net = build_sgp_sam("tiny", img_size=32, click_map=True, refiner=True).eval()
    torch.nn.init.normal_(net.refiner.out[1].weight, std=0.3)  # zero-initialised: make the refiner count
    assert net.click_consistent
    image = torch.randn(1, 1, 32, 32, 32)
    target = np.zeros((32, 32, 32), dtype=bool)
    target[10:15, 12:16, 11:14] = True

    def violations(result) -> int:
        """Clicks the scored masks disobey, plus components holding no foreground click."""
        count = 0
        for k, mask in result["masks_at"].items():
            clicks = list(zip(result["points"][:k], result["labels"][:k]))
            count += sum(mask[point] != bool(label) for point, label in clicks)
            components, n = ndimage.label(mask, np.ones((3, 3, 3)))
            count += n - len({components[p] for p, lab in clicks if lab == 1} - {0})
        return count

    ks = (1, 2, 3, 4, 5, 6)
    result = evaluation_clicks(net, image, target, 6, keep_masks_at=ks)
    assert len(result["points"]) == 6 and 0 in result["labels"] and 1 in result["labels"]
    assert len(set(result["points"])) == 6  # a clicked voxel is never wrong again, so never clicked twice
    assert violations(result) == 0

    net.click_consistent = False
    assert violations(evaluation_clicks(net, image, target, 6, keep_masks_at=ks)) > 0  # the raw network disobeys
