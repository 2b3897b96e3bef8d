"""Tests for bundle/scripts/training/losses.py: hand-computed values, edge cases, and the imbalance behaviour."""

import math

import pytest
import torch
from monai.losses import DiceCELoss, FocalLoss
from scripts.training.losses import ZoomLoss, balanced_focal, build_loss, dilate


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _fl(z, y, gamma=2.0):
    """Focal loss of one voxel written out: -(1 - p_t)^gamma * log(p_t)."""
    p = _sig(z)
    pt = p if y == 1 else 1.0 - p
    return -((1.0 - pt) ** gamma) * math.log(pt)


def _tiny(values, fg):
    """(1, 1, 2, 2, 2) tensor from 8 values in C order, and the target with the given flat indices set."""
    logits = torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 2, 2)
    target = torch.zeros(8, dtype=torch.float64)
    target[list(fg)] = 1.0
    return logits, target.reshape(1, 1, 2, 2, 2)


def test_hand_computed_margin0():
    z = [2.0, -1.0, 1.0, -2.0, -2.0, -3.0, -0.5, -2.5]
    logits, target = _tiny(z, fg=[0, 1])
    loss = ZoomLoss(lambda_focal=2.0, gamma=2.0, alpha_fg=0.75, zoom_margin=0, zoom_weight=0.5, dice_weight=1.0)
    got = loss(logits, target).item()

    y = [1, 1, 0, 0, 0, 0, 0, 0]
    p = [_sig(v) for v in z]
    fl = [_fl(v, t) for v, t in zip(z, y)]
    s = 1e-5
    dice = 1.0 - (2.0 * (p[0] + p[1]) + s) / (sum(p) + 2.0 + s)
    m_fg = (fl[0] + fl[1]) / 2.0
    focal_all = 0.75 * m_fg + 0.25 * sum(fl[2:]) / 6.0
    # zoom region with margin 0 = target ∪ {logit > 0} = voxels {0, 1, 2}; its background is voxel 2 alone
    focal_zoom = 0.75 * m_fg + 0.25 * fl[2]
    expected = dice + 2.0 * (focal_all + 0.5 * focal_zoom)
    assert got == pytest.approx(expected, rel=1e-6)
    assert loss.last_terms["zoom"] == pytest.approx(focal_zoom, rel=1e-6)


def test_hand_computed_margin1_covers_crop():
    # any voxel of a 2x2x2 crop is within Chebyshev distance 1 of voxel 7: zoom region = whole crop
    z = [-1.0, 0.3, -2.0, -0.2, 1.5, -1.2, -4.0, 0.7]
    logits, target = _tiny(z, fg=[7])
    loss = ZoomLoss(lambda_focal=1.0, gamma=1.0, alpha_fg=0.5, zoom_margin=1, zoom_weight=2.0, dice_weight=0.5)
    y = [0] * 7 + [1]
    fl = [_fl(v, t, gamma=1.0) for v, t in zip(z, y)]
    p = [_sig(v) for v in z]
    dice = 1.0 - (2.0 * p[7] + 1e-5) / (sum(p) + 1.0 + 1e-5)
    focal = 0.5 * fl[7] + 0.5 * sum(fl[:7]) / 7.0
    expected = 0.5 * dice + 1.0 * (focal + 2.0 * focal)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_empty_target_no_nan_and_value():
    z = [-3.0, -1.0, 0.5, -2.0, -2.0, -1.5, -0.5, -2.5]
    logits, target = _tiny(z, fg=[])
    logits.requires_grad_(True)
    loss = ZoomLoss(lambda_focal=1.0, alpha_fg=0.5, zoom_margin=0, zoom_weight=1.0)
    value = loss(logits, target)
    assert torch.isfinite(value)
    fl = [_fl(v, 0) for v in z]
    p = [_sig(v) for v in z]
    dice = 1.0 - 1e-5 / (sum(p) + 1e-5)
    # no foreground: the background mean takes the full weight; zoom region = predicted voxel 2 only
    expected = dice + (sum(fl) / 8.0 + fl[2])
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_empty_target_and_prediction_zoom_is_zero():
    logits = torch.full((2, 1, 4, 4, 4), -3.0)
    target = torch.zeros_like(logits, dtype=torch.bool)
    loss = ZoomLoss(reduction="none")
    out = loss(logits, target)
    assert out.shape == (2,) and torch.isfinite(out).all()
    assert loss.last_terms["zoom"] == 0.0


def test_gradient_flows_and_batch_reduction():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, 8, requires_grad=True)
    target = torch.rand(3, 1, 8, 8, 8) > 0.8
    per_sample = ZoomLoss(reduction="none")(logits, target)
    assert per_sample.shape == (3,)
    assert ZoomLoss(reduction="mean")(logits, target).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert ZoomLoss(reduction="sum")(logits, target).item() == pytest.approx(per_sample.sum().item(), rel=1e-6)
    per_sample.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_are_safe():
    logits = torch.full((1, 1, 4, 4, 4), -20.0, dtype=torch.float16)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    target[0, 0, 1, 1, 1] = True
    assert torch.isfinite(ZoomLoss()(logits, target))


def test_dilate_is_a_cube_and_clipped_at_border():
    m = torch.zeros(1, 1, 7, 7, 7, dtype=torch.bool)
    m[0, 0, 3, 3, 3] = True
    assert dilate(m, 2).sum() == 125 and dilate(m, 0).sum() == 1
    c = torch.zeros(1, 1, 7, 7, 7, dtype=torch.bool)
    c[0, 0, 0, 0, 0] = True
    d = dilate(c, 2)
    assert d.sum() == 27 and d[0, 0, :3, :3, :3].all()


def test_zoom_region_without_prediction():
    # 5x1x1 line, lesion at x=0, false positive at x=4; margin 1
    logits = torch.tensor([1.0, -2.0, -2.0, -2.0, 3.0]).reshape(1, 1, 5, 1, 1)
    target = torch.tensor([1.0, 0, 0, 0, 0]).reshape(1, 1, 5, 1, 1)
    fl = [_fl(v, t) for v, t in zip([1.0, -2.0, -2.0, -2.0, 3.0], [1, 0, 0, 0, 0])]
    kw = dict(zoom_margin=1, zoom_weight=1.0, dice_weight=0.0, lambda_focal=1.0)
    focal_all = 0.5 * fl[0] + 0.5 * sum(fl[1:]) / 4
    only_target = ZoomLoss(zoom_on_prediction=False, **kw)(logits, target).item()
    assert only_target == pytest.approx(focal_all + 0.5 * fl[0] + 0.5 * fl[1], rel=1e-6)
    region_mean = ZoomLoss(zoom_on_prediction=True, background_divisor="region", **kw)(logits, target).item()
    assert region_mean == pytest.approx(focal_all + 0.5 * fl[0] + 0.5 * (fl[1] + fl[3] + fl[4]) / 3, rel=1e-6)
    # default: the background sum over the zoom region (x = 1, 3, 4) is divided by the lesion rim's size (x = 1)
    with_pred = ZoomLoss(zoom_on_prediction=True, **kw)(logits, target).item()
    assert with_pred == pytest.approx(focal_all + 0.5 * fl[0] + 0.5 * (fl[1] + fl[3] + fl[4]) / 1, rel=1e-6)


def _blob_cost(divisor: str, blob_side: int, lesion_side: int = 2) -> float:
    """Zoom-term loss of a cube lesion fully found plus a false-positive cube touching it, in a 32^3 crop."""
    target = torch.zeros(1, 1, 32, 32, 32, dtype=torch.bool)
    target[0, 0, 4 : 4 + lesion_side, 4 : 4 + lesion_side, 4 : 4 + lesion_side] = True
    logits = torch.where(target, 4.0, -4.0)
    logits[0, 0, 4 + lesion_side : 4 + lesion_side + blob_side, 4 : 4 + blob_side, 4 : 4 + blob_side] = 2.0
    loss = ZoomLoss(dice_weight=0.0, lambda_focal=1.0, zoom_margin=3, background_divisor=divisor)
    loss(logits, target)
    return loss.last_terms["zoom"]


def test_false_positive_blob_cost_grows_with_its_size_against_the_lesion_rim():
    """The reason for the rim divisor: with the zoom region's own background count as divisor, a false-positive
    blob grows the region it is averaged over, so a 12^3 blob (27 times the voxels of a 4^3 one) costs only about
    5 times as much. Divided by the lesion rim's size, its cost grows with its volume."""
    small, large = _blob_cost("rim", 4), _blob_cost("rim", 12)
    assert large > 20 * small
    small_region, large_region = _blob_cost("region", 4), _blob_cost("region", 12)
    assert large_region < 8 * small_region
    assert large > 10 * large_region


def test_lesion_divisor_hand_computed():
    # same line as above: with background_divisor "lesion" the zoom region's background sum is divided by the
    # lesion's own voxel count (x = 0: one voxel); a crop without a lesion falls back to the region's count
    z = [1.0, -2.0, -2.0, -2.0, 3.0]
    logits = torch.tensor(z).reshape(1, 1, 5, 1, 1)
    target = torch.tensor([1.0, 0, 0, 0, 0]).reshape(1, 1, 5, 1, 1)
    fl = [_fl(v, t) for v, t in zip(z, [1, 0, 0, 0, 0])]
    kw = dict(zoom_margin=1, zoom_weight=1.0, dice_weight=0.0, lambda_focal=1.0, alpha_fg=0.25)
    loss = ZoomLoss(background_divisor="lesion", **kw)
    loss(logits, target)
    assert loss.last_terms["zoom"] == pytest.approx(0.25 * fl[0] + 0.75 * (fl[1] + fl[3] + fl[4]) / 1, rel=1e-6)
    empty = torch.zeros_like(target)
    loss(logits, empty)
    fl_empty = [_fl(v, 0) for v in z]
    # region = dilate_1(prediction at x = 0 and x = 4) = x in {0, 1, 3, 4}; background mean alone
    assert loss.last_terms["zoom"] == pytest.approx((fl_empty[0] + fl_empty[1] + fl_empty[3] + fl_empty[4]) / 4)
    with pytest.raises(ValueError, match="background_divisor"):
        ZoomLoss(background_divisor="volume")


def _doubled_cost(divisor: str, lesion_side: int) -> float:
    """Zoom term of a cube lesion found exactly plus a false-positive slab as large as the lesion beside it."""
    target = torch.zeros(1, 1, 48, 48, 48, dtype=torch.bool)
    s = slice(8, 8 + lesion_side)
    target[0, 0, s, s, s] = True
    logits = torch.where(target, 4.0, -4.0)
    logits[0, 0, 8 + lesion_side : 8 + 2 * lesion_side, s, s] = 1.0
    loss = ZoomLoss(dice_weight=0.0, zoom_margin=3, alpha_fg=0.5, background_divisor=divisor)
    loss(logits, target)
    return loss.last_terms["zoom"]


def test_lesion_divisor_prices_false_positives_by_the_lesion_size():
    """Why README command 1 uses the lesion divisor: drawing a lesion twice its size should cost the same whatever
    its size. Divided by the rim, the 8-voxel lesion's doubled mask costs tens of times less than the 4,096-voxel
    one's, since a small lesion's rim is many times its volume: small lesions came out 2-20 times too large."""
    small, large = _doubled_cost("lesion", 2), _doubled_cost("lesion", 16)
    assert small == pytest.approx(large, rel=0.02)
    small_rim, large_rim = _doubled_cost("rim", 2), _doubled_cost("rim", 16)
    assert small_rim < large_rim / 10


def test_balanced_focal_empty_region_is_zero():
    focal = torch.ones(1, 1, 2, 2, 2)
    target = torch.zeros(1, 1, 2, 2, 2)
    region = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    assert balanced_focal(focal, target, region).item() == 0.0
    assert balanced_focal(focal, target, None, alpha_fg=1.0).item() == 0.0  # only class present has weight 0


def _lesion_share(loss_fn, logits_value):
    """Fraction of the total |dL/dlogit| mass that falls on a 10-voxel lesion in a 64³ crop."""
    target = torch.zeros(1, 1, 64, 64, 64)
    target[0, 0, 30:32, 30:35, 30] = 1.0  # 10 voxels
    logits = torch.full_like(target, logits_value, requires_grad=True)
    loss_fn(logits, target).backward()
    g = logits.grad.abs()
    return (g * target).sum().item() / g.sum().item()


def test_imbalance_lesion_gets_its_share_of_the_gradient():
    """The lesion's share of the gradient: balanced Zoom Loss vs Dice+CE vs plain (voxel-mean) focal.

    With 10 lesion voxels among 262,144, voxel-mean losses give the lesion ~1e-4 .. 1e-3 of the gradient; the
    balanced focal mean gives it the alpha_fg share. Fails if the focal term averages over all voxels.
    """
    dice_ce = DiceCELoss(sigmoid=True)
    plain_focal = FocalLoss(gamma=2.0, use_softmax=False)
    zoom = ZoomLoss()

    # untrained model (p = 0.5 everywhere)
    share_zoom = _lesion_share(zoom, 0.0)
    share_dice_ce = _lesion_share(dice_ce, 0.0)
    share_focal = _lesion_share(plain_focal, 0.0)
    assert share_zoom > 0.4
    assert share_dice_ce < 0.01 and share_focal < 0.01

    # confident miss (logits -4 everywhere): the background is nearly right, the lesion totally missed
    share_zoom = _lesion_share(zoom, -4.0)
    share_dice_ce = _lesion_share(dice_ce, -4.0)
    assert share_zoom > 0.9
    assert share_zoom / share_dice_ce > 100.0


def test_build_loss():
    assert isinstance(build_loss("zoom", zoom_margin=2), ZoomLoss)
    dc = build_loss("dice_ce")
    assert isinstance(dc, DiceCELoss)
    logits = torch.zeros(1, 1, 4, 4, 4)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    target[0, 0, 1, 1, 1] = True
    assert torch.isfinite(dc(logits, target))  # bool targets accepted
    with pytest.raises(ValueError):
        build_loss("nope")


@pytest.mark.parametrize("gate_cost", [0.0, 5.0])
def test_gate_cost_closes_the_sgpm_gate_only_when_it_is_priced(gate_cost):
    from scripts.modeling import build_sgp_sam
    from scripts.training.engines import ClickTrainingStep

    torch.manual_seed(0)
    network = build_sgp_sam("tiny", sgpm=True).train()
    step = ClickTrainingStep(network, ZoomLoss(), num_rounds=1, gate_cost=gate_cost)
    optimizer = torch.optim.SGD(network.sgpm.parameters(), lr=1.0)
    images = torch.randn(1, 1, 64, 64, 64)
    targets = torch.zeros(1, 1, 64, 64, 64)
    targets[..., 28:36, 28:36, 28:36] = 1
    opened = []
    for _ in range(4):
        optimizer.zero_grad()
        loss, _ = step(images, targets)
        loss.backward()
        optimizer.step()
        opened.append(step.last_extra_losses["gate_open"])
    assert opened[0] == pytest.approx(0.88, abs=1e-3)  # the gate's initial decision probability, reported
    if gate_cost:
        assert opened[-1] < opened[0] - 0.05  # priced compute: the gate closes
    else:
        assert opened[-1] == pytest.approx(opened[0], abs=0.01)  # only the (small, new) fusion output moves it
