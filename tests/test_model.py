"""Core network: SAM-Med3D compatibility, exact fast attention, SGPM identity/gating, encode/decode API."""

import re

import pytest
import torch
from conftest import REFERENCE_DIR

from scripts.checkpoint import load_weights
from scripts.clicks import dice
from scripts.export import traceable_gates
from scripts.training.losses import build_loss
from scripts.modeling import build_sgp_sam
from scripts.modeling.attention import Attention3D, add_upstream_bias, upstream_bias_terms
from scripts.modeling.common import Conv3d
from scripts.modeling.refine import MaskRefiner
from scripts.training.trainable import count_parameters, optimizer_param_groups, set_trainable


def reference_entries() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in (REFERENCE_DIR / "sam_med3d_state_dict.txt").read_text().splitlines():
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert match, f"unparsable reference line: {line!r}"
        shape = tuple(int(s) for s in match.group(2).split(",") if s.strip())
        entries.append((match.group(1), shape))
    return entries


@pytest.fixture(scope="module")
def full_backbone():
    torch.manual_seed(0)
    return build_sgp_sam("sam_med3d", sgpm=False).eval()


def test_backbone_state_dict_equals_reference(full_backbone):
    reference = reference_entries()
    assert len(reference) == 324
    ours = [(k, tuple(v.shape)) for k, v in full_backbone.state_dict().items()]
    assert sorted(ours) == sorted(reference)
    assert sum(p.numel() for p in full_backbone.parameters()) == 100_509_232


def test_sgpm_keys_live_outside_backbone_prefixes():
    model = build_sgp_sam("sam_med3d", sgpm=True)
    reference = {k for k, _ in reference_entries()}
    assert set(model.backbone_state_keys()) == reference
    extra = set(model.state_dict()) - reference
    assert extra and all(k.startswith("sgpm.stages.") for k in extra)


def _randomise(module: torch.nn.Module, std: float = 0.5) -> None:
    """Non-trivial relative-position tables and qkv biases, so padded keys and their bias really matter."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name or name.endswith("qkv.bias"):
                param.normal_(0.0, std)


def test_fast_padded_window_attention_equals_naive_full_size():
    torch.manual_seed(1)
    attn = Attention3D(dim=768, num_heads=12, rel_pos_size=14, window_size=14)
    _randomise(attn)
    x = torch.randn(1, 8, 8, 8, 768)
    with torch.no_grad():
        attn.impl = "fast"
        fast = attn(x)
        attn.impl = "naive"
        naive = attn(x)
    assert fast.shape == (1, 8, 8, 8, 768)
    assert (fast - naive).abs().max().item() <= 1e-4


def _axis_table(rel_pos: torch.Tensor, side: int) -> torch.Tensor:
    """R[a, m] = rel_pos[a - m + side - 1], written out index by index."""
    return torch.stack([torch.stack([rel_pos[a - m + side - 1] for m in range(side)]) for a in range(side)])


def _literal_upstream_bias(q_cube: torch.Tensor, tables, real: int) -> torch.Tensor:
    """Loop-level bias for real queries (i, j, l) < real and every key (p, r, s) of the cube (one head).

    bias = q(i,j,l).R_d[i,s] + q(i,j,p).R_h[j,s] + q(i,j,r).R_w[r,s]   (upstream SAM-Med3D's layout)
    """
    side = q_cube.shape[0]
    r_d, r_h, r_w = (_axis_table(t, side) for t in tables)
    q = q_cube.double().tolist()
    rd, rh, rw = (r.double().tolist() for r in (r_d, r_h, r_w))
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    bias = torch.zeros(real, real, real, side, side, side, dtype=torch.float64)
    for i in range(real):
        for j in range(real):
            for l in range(real):  # noqa: E741
                for p in range(side):
                    for r in range(side):
                        for s in range(side):
                            bias[i, j, l, p, r, s] = (
                                dot(q[i][j][l], rd[i][s]) + dot(q[i][j][p], rh[j][s]) + dot(q[i][j][r], rw[r][s])
                            )
    return bias


def _textbook_bias(q_cube: torch.Tensor, tables, real: int) -> torch.Tensor:
    """The textbook decomposed bias q(i,j,l).(R_d[i,p] + R_h[j,r] + R_w[l,s]), for the regression guard."""
    side = q_cube.shape[0]
    r_d, r_h, r_w = (_axis_table(t, side).double() for t in tables)
    q = q_cube[:real, :real, :real].double()
    return (
        torch.einsum("ijlc,ipc->ijlp", q, r_d[:real])[..., :, None, None]
        + torch.einsum("ijlc,jrc->ijlr", q, r_h[:real])[..., None, :, None]
        + torch.einsum("ijlc,lsc->ijls", q, r_w[:real])[..., None, None, :]
    )


def _padded_queries(real: int, side: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q_real = torch.randn(real, real, real, head_dim, generator=gen)
    q_pad = torch.randn(head_dim, generator=gen)
    q_cube = q_pad.expand(side, side, side, head_dim).clone()
    q_cube[:real, :real, :real] = q_real
    tables = tuple(torch.randn(2 * side - 1, head_dim, generator=gen) for _ in range(3))
    return q_cube, tables


def test_production_bias_equals_loop_level_upstream_formula():
    """Grid 5 padded to a window of 7: the production bias over the padded cube, at the real queries."""
    real, side, head_dim = 5, 7, 4
    q_cube, tables = _padded_queries(real, side, head_dim, seed=11)
    cube = (side, side, side)
    terms = upstream_bias_terms(q_cube[None], q_cube[None], side, tables)
    production = add_upstream_bias(torch.zeros(1, side**3, side**3), terms, cube, cube)
    production = production.view(side, side, side, side, side, side)[:real, :real, :real].double()
    literal = _literal_upstream_bias(q_cube, tables, real)
    assert (production - literal).abs().max().item() <= 1e-4
    # The guard: the textbook layout is a different function, so the assertion above fails for it.
    textbook = _textbook_bias(q_cube, tables, real)
    assert (textbook - literal).abs().max().item() > 0.5


def test_fast_padded_window_equals_literal_small_grid():
    """Fast path against the literal padded computation at grid 5, window 7 (keys read padded queries too)."""
    torch.manual_seed(12)
    attn = Attention3D(dim=16, num_heads=2, rel_pos_size=7, window_size=7)
    _randomise(attn, std=1.0)
    x = torch.randn(2, 5, 5, 5, 16)
    with torch.no_grad():
        attn.impl = "fast"
        fast = attn(x)
        attn.impl = "naive"
        naive = attn(x)
    assert (fast - naive).abs().max().item() <= 1e-5


def test_global_block_uses_upstream_bias_not_textbook():
    """A global block's output equals softmax(qk + literal upstream bias) v, and differs from the textbook one."""
    torch.manual_seed(13)
    side, dim, heads = 4, 8, 1
    attn = Attention3D(dim=dim, num_heads=heads, rel_pos_size=side, window_size=0)
    _randomise(attn, std=1.0)
    x = torch.randn(1, side, side, side, dim)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn._split_heads(attn.qkv(x).reshape(1, side**3, -1))
        tables = (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)
        logits = (q * attn.scale) @ k.transpose(-2, -1)

        def attend(bias: torch.Tensor) -> torch.Tensor:
            probs = (logits.double() + bias.reshape(1, side**3, side**3)).softmax(-1)
            mixed = (probs @ v.double()).float().view(1, 1, side, side, side, -1)
            return attn.proj(mixed.permute(0, 2, 3, 4, 1, 5).reshape(1, side, side, side, -1))

        q_cube = q.reshape(side, side, side, -1)
        upstream = attend(_literal_upstream_bias(q_cube, tables, side))
        textbook = attend(_textbook_bias(q_cube, tables, side))
    assert (out - upstream).abs().max().item() <= 1e-4
    assert (out - textbook).abs().max().item() > 1e-2


def test_padding_keys_change_the_output():
    """Guard against a 'fast' path that silently ignores the padded keys."""
    torch.manual_seed(2)
    attn = Attention3D(dim=64, num_heads=2, rel_pos_size=14, window_size=14)
    _randomise(attn)
    x = torch.randn(2, 8, 8, 8, 64)
    with torch.no_grad():
        padded = attn(x)
        attn.window_size = 0  # global attention over the real grid only, same tables (first rows)
        attn.rel_pos_d.data, attn.rel_pos_h.data, attn.rel_pos_w.data = (
            t[6:21].clone() for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)
        )
        unpadded = attn(x)
    assert (padded - unpadded).abs().max().item() > 1e-2


def test_whole_encoder_fast_equals_naive_full_size(full_backbone):
    torch.manual_seed(3)
    encoder = full_backbone.image_encoder
    _randomise(encoder, std=0.1)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.no_grad():
        encoder.set_attention_impl("fast")
        fast = encoder(x)
        encoder.set_attention_impl("naive")
        naive = encoder(x)
        encoder.set_attention_impl("fast")
    assert fast.shape == (1, 384, 8, 8, 8)
    assert (fast - naive).abs().max().item() <= 1e-4


def _random_clicks(batch: int, num: int, size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randint(0, size, (batch, num, 3), generator=gen).float()
    labels = torch.randint(0, 2, (batch, num), generator=gen)
    return points, labels


@pytest.mark.parametrize("preset", ["tiny", "sam_med3d"])
def test_sgpm_at_init_reproduces_backbone(preset):
    torch.manual_seed(4)
    backbone = build_sgp_sam(preset, sgpm=False).eval()
    model = build_sgp_sam(preset, sgpm=True).eval()
    model.load_state_dict(backbone.state_dict(), strict=False)
    size = model.img_size
    batch = 2 if preset == "tiny" else 1
    images = torch.randn(batch, 1, size, size, size)
    points, labels = _random_clicks(batch, 3, size, seed=5)
    mask = torch.randn(batch, 1, *model.low_res_size)
    with torch.no_grad():
        ours, theirs = model.encode(images), backbone.encode(images)
        assert torch.equal(ours, theirs)
        for mask_input in (None, mask):
            assert torch.equal(model.decode(ours, points, labels, mask_input)[0], backbone.decode(theirs, points, labels, mask_input)[0])
    # Gates were evaluated and open at init (fusion ran), yet the output is unchanged: zero-initialised fusion.
    assert all(stage.fusion_calls > 0 for stage in model.sgpm.stages.values())


def test_gate_closed_skips_fusion_and_open_runs_it():
    torch.manual_seed(6)
    model = build_sgp_sam("tiny", sgpm=True)
    # Make the fusion non-trivial so skipping it is visible in the output.
    for stage in model.sgpm.stages.values():
        torch.nn.init.normal_(stage.fusion.out_proj.weight, std=0.2)
    images = torch.randn(2, 1, 64, 64, 64)
    points, labels = _random_clicks(2, 1, 64, seed=7)
    backbone = build_sgp_sam("tiny", sgpm=False)
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("sgpm.")})
    model.eval(), backbone.eval()

    def run(bias: float) -> torch.Tensor:
        for stage in model.sgpm.stages.values():
            stage.gate.decision_head.bias.data.fill_(bias)
        model.sgpm.reset_counters()
        with torch.no_grad():
            return model(images, points, labels)

    closed = run(-10.0)
    assert all(stage.fusion_calls == 0 for stage in model.sgpm.stages.values())
    with torch.no_grad():
        assert torch.equal(closed, backbone(images, points, labels))
    opened = run(10.0)
    assert all(stage.fusion_calls == 2 for stage in model.sgpm.stages.values())
    assert (opened - closed).abs().max().item() > 1e-4
    # Soft gating in training mode always runs the block (gradients reach the gate).
    model.train()
    run(-10.0)
    assert all(stage.fusion_calls == 2 for stage in model.sgpm.stages.values())


def test_per_sample_hard_gate_mixes_open_and_closed_rows():
    torch.manual_seed(8)
    model = build_sgp_sam("tiny", sgpm=True, sgpm_stages=(2,)).eval()
    stage = model.sgpm.stages["2"]
    torch.nn.init.normal_(stage.fusion.out_proj.weight, std=0.2)
    torch.nn.init.normal_(stage.gate.decision_head.weight, std=5.0)
    images = torch.randn(6, 1, 64, 64, 64)
    with torch.no_grad():
        model.encode(images)
        # Centre the decision logits on the threshold so about half the samples open the gate.
        logits = torch.logit(stage.last_decision_prob).sort().values
        stage.gate.decision_head.bias -= (logits[2] + logits[3]) / 2
        emb_batch = model.encode(images)
        probs = stage.last_decision_prob
        emb_single = torch.cat([model.encode(images[i : i + 1]) for i in range(6)])
    assert 0 < int((probs >= 0.5).sum()) < 6, "test needs a mix of open and closed gates"
    assert torch.allclose(emb_batch, emb_single, atol=1e-4)


def test_gate_open_mode_ignores_gate():
    model = build_sgp_sam("tiny", sgpm=True, gate_mode="open").eval()
    with torch.no_grad():
        model.encode(torch.randn(1, 1, 64, 64, 64))
    assert all(stage.fusion_calls == 1 for stage in model.sgpm.stages.values())
    with pytest.raises(ValueError, match="gate_mode"):
        build_sgp_sam("tiny", gate_mode="sometimes")


def test_gate_closed_mode_is_the_backbone_alone_in_training_too():
    torch.manual_seed(10)
    model = build_sgp_sam("tiny", sgpm=True, gate_mode="closed")
    for stage in model.sgpm.stages.values():
        torch.nn.init.normal_(stage.fusion.out_proj.weight, std=0.2)  # a trained, non-zero fusion block
    backbone = build_sgp_sam("tiny", sgpm=False)
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("sgpm.")})
    images = torch.randn(2, 1, 64, 64, 64)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(backbone, mode)()
        with torch.no_grad():
            assert torch.equal(model.encode(images), backbone.encode(images))
        assert all(stage.fusion_calls == 0 for stage in model.sgpm.stages.values())
    with torch.no_grad(), traceable_gates(model):  # the branch-free stages that torch.export traces
        assert torch.equal(model.encode(images), backbone.encode(images))


def test_encode_once_decode_matches_forward_and_shares_embedding():
    torch.manual_seed(9)
    model = build_sgp_sam("tiny").eval()
    images = torch.randn(1, 1, 64, 64, 64)
    points, labels = _random_clicks(3, 2, 64, seed=10)
    with torch.no_grad():
        embedding = model.encode(images)
        logits, iou = model.decode(embedding, points, labels)  # one embedding, three prompts
        direct = model(images.expand(3, -1, -1, -1, -1), points, labels)
        mask_only, _ = model.decode(embedding, mask_input=logits[:1])
        multi, multi_iou = model.decode(embedding, points[:1], labels[:1], multimask_output=True)
    assert embedding.shape == (1, 96, 8, 8, 8)
    assert logits.shape == (3, 1, 32, 32, 32) and iou.shape == (3, 1)
    assert torch.allclose(logits, direct, atol=1e-5)
    assert mask_only.shape == (1, 1, 32, 32, 32)
    assert multi.shape == (1, 3, 32, 32, 32) and multi_iou.shape == (1, 3)
    assert model.upscale_logits(logits).shape == (3, 1, 64, 64, 64)


def test_point_and_dense_encodings_follow_reference_axis_conventions():
    """Points read as [axis0, axis1, axis2]; dense PE stacks [axis1, axis0, axis2] (SAM-Med3D quirk)."""
    model = build_sgp_sam("sam_med3d", sgpm=False)
    pe = model.prompt_encoder.pe_layer
    dense = model.prompt_encoder.get_dense_pe()[0]  # (384, 8, 8, 8)
    a, b, c = 1, 5, 3
    # Voxel coordinate whose (v + 0.5) / 128 equals the centre of grid cell g: v = 16 g + 7.5.
    centre = lambda g: 16 * g + 7.5  # noqa: E731
    point = torch.tensor([[[centre(a), centre(b), centre(c)]]]) + 0.5
    encoded = pe.forward_with_coords(point, (128, 128, 128))[0, 0]
    assert torch.allclose(encoded, dense[:, b, a, c], atol=1e-5)  # swapped first two axes
    assert not torch.allclose(encoded, dense[:, a, b, c], atol=1e-3)
    # Sparse embeddings: N clicks + 1 padding point with the not-a-point embedding.
    sparse, _ = model.prompt_encoder((point - 0.5, torch.tensor([[1]])), None)
    assert sparse.shape == (1, 2, 384)
    assert torch.allclose(sparse[0, 1], model.prompt_encoder.not_a_point_embed.weight[0])


def test_frozen_encoder_policy_counts_and_groups():
    model = build_sgp_sam("tiny", sgpm=True)
    counts = set_trainable(model)
    assert counts["image_encoder"]["trainable"] == 0
    assert counts["image_encoder"]["total"] > 0
    for group in ("prompt_encoder", "mask_decoder", "sgpm"):
        assert counts[group]["trainable"] == counts[group]["total"] > 0
    assert counts["all"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = optimizer_param_groups(model, 1e-3, {"mask_decoder": 0.1}, weight_decay=0.1)
    decoder_lrs = {g["lr"] for g in groups if g["name"].startswith("mask_decoder")}
    assert len(decoder_lrs) == 1 and decoder_lrs.pop() == pytest.approx(1e-4)
    assert not any(g["name"].startswith("image_encoder") for g in groups)
    set_trainable(model, ["image_encoder", "prompt_encoder", "mask_decoder", "sgpm"])
    assert count_parameters(model)["image_encoder"]["trainable"] == counts["image_encoder"]["total"]


def _two_ball_scene(generator: torch.Generator, size: int = 32, radius: float = 3.5):
    """A bright ball in each half of axis 0 (random positions); returns image (1, S, S, S) and the two ball masks."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    centres = []
    for low in (radius + 1, size / 2 + radius):
        span = size / 2 - 2 * radius - 2
        centre = torch.rand(3, generator=generator) * torch.tensor([span, size - 2 * radius - 2, size - 2 * radius - 2])
        centres.append(centre + torch.tensor([low, radius + 1, radius + 1]))
    balls = [((grid - c[:, None, None, None]) ** 2).sum(0) <= radius**2 for c in centres]
    image = 0.2 * torch.randn(size, size, size, generator=generator) + sum(b.float() for b in balls)
    return image[None], balls, centres


def _train_two_ball_task(model, steps: int, generator: torch.Generator) -> None:
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        images, targets, points = [], [], []
        for _ in range(4):
            image, balls, centres = _two_ball_scene(generator)
            pick = int(torch.randint(2, (1,), generator=generator))
            images.append(image)
            targets.append(balls[pick][None].float())
            points.append(centres[pick].round())
        logits, _ = model.decode(
            model.encode(torch.stack(images)), torch.stack(points)[:, None], torch.ones(4, 1, dtype=torch.long)
        )
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model.upscale_logits(logits), torch.stack(targets), pos_weight=torch.tensor(20.0)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _clicked_ball_hits(model, generator: torch.Generator, scenes: int = 8) -> int:
    """How often the mask lies mostly (2:1) on the clicked one of two identical balls, clicking each in turn."""
    model.eval()
    hits = 0
    for _ in range(scenes):
        image, balls, centres = _two_ball_scene(generator)
        for pick in (0, 1):
            with torch.no_grad():
                point = centres[pick].round()[None, None]
                low, _ = model.decode(model.encode(image[None]), point, torch.ones(1, 1, dtype=torch.long))
            mask = model.upscale_logits(low)[0, 0] > 0
            hits += int((mask & balls[pick]).sum() > 2 * (mask & balls[1 - pick]).sum())
    return hits


@pytest.mark.usefixtures("one_thread")
def test_positive_click_selects_the_clicked_object_after_brief_training():
    """Point semantics as behaviour: two identical balls per image, the target is the one under the click, so the
    mask can only follow the click. With the click-map prompt a tiny model learns this in 60 steps (a broken
    point rasterisation or an axis mix-up between clicks and the image fails here)."""
    torch.manual_seed(0)
    model = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True)
    _train_two_ball_task(model, 60, torch.Generator().manual_seed(0))
    hits = _clicked_ball_hits(model, torch.Generator().manual_seed(99))
    assert hits >= 14, f"the mask followed the click in only {hits} of 16 cases"


def _load_without_extension(extended, plain, prefix: str) -> None:
    """``plain``'s weights load into ``extended``; only keys under ``prefix`` are missing, the backbone is the same."""
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(prefix) for k in missing)
    assert set(extended.backbone_state_keys()) == set(plain.backbone_state_keys())


def test_click_map_starts_as_identity_and_sits_outside_the_backbone():
    torch.manual_seed(3)
    plain = build_sgp_sam("tiny", sgpm=False).eval()
    with_map = build_sgp_sam("tiny", sgpm=False, click_map=True).eval()
    _load_without_extension(with_map, plain, "click_map.")
    assert set(with_map.backbone_state_keys()) == set(plain.state_dict())
    images = torch.randn(2, 1, 64, 64, 64)
    points, labels = _random_clicks(2, 3, 64, seed=4)
    with torch.no_grad():
        assert torch.equal(with_map(images, points, labels), plain(images, points, labels))
        clicks = torch.tensor([[[10.0, 20.0, 30.0], [40.0, 40.0, 40.0]]])
        maps = with_map.click_map.heat_maps(clicks, torch.tensor([[1, 0]]))
    assert maps.shape == (1, 2, 32, 32, 32)
    # positive click at voxel (10, 20, 30) of the 64^3 crop peaks at low-res (5, 10, 15); the negative one in channel 1
    assert tuple(int(i) for i in (maps[0, 0] == maps[0, 0].max()).nonzero()[0]) == (5, 10, 15)
    assert tuple(int(i) for i in (maps[0, 1] == maps[0, 1].max()).nonzero()[0]) == (20, 20, 20)


def test_refiner_starts_as_identity_and_sits_outside_the_backbone():
    torch.manual_seed(5)
    plain = build_sgp_sam("tiny", sgpm=False, click_map=True).eval()
    refined = build_sgp_sam("tiny", sgpm=False, click_map=True, refiner=True).eval()
    _load_without_extension(refined, plain, "refiner.")
    images = torch.randn(2, 1, 64, 64, 64)
    points, labels = _random_clicks(2, 3, 64, seed=6)
    with torch.no_grad():
        low, _ = refined.decode(refined.encode(images), points, labels)
        features = refined.refine_features(images)
        assert features.shape[2:] == (32, 32, 32)
        up = refined.upscale_logits(low)
        first = refined.full_res_logits(low, None, features, None, points, labels)
        second = refined.full_res_logits(low, None, features, first, None, None)  # a mask-only round
        assert torch.equal(first, up) and torch.equal(second, up)
        assert torch.equal(plain.full_res_logits(low), up)  # no refiner: plain upsampling, no features needed
        with pytest.raises(ValueError, match="refine_features"):
            refined.full_res_logits(low, None, None, None, points, labels)
        with pytest.raises(ValueError, match="even crop size"):
            refined.refine_features(torch.randn(1, 1, 63, 63, 63))
        with pytest.raises(ValueError, match="crop"):
            refined.full_res_logits(low[:, :, :16, :16, :16], (32, 32, 32), features, None, points, labels)


def test_refiner_crop_context_starts_as_the_local_refiner():
    from scripts.modeling.refine import MaskRefiner

    torch.manual_seed(7)
    local = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True, refiner=True).eval()
    wide = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True, refiner=True, refiner_context="crop").eval()
    torch.nn.init.normal_(local.refiner.out[1].weight, std=0.1)  # leave the identity start
    report = load_weights(wide, local.state_dict())
    assert report["initialised"] and all(k.startswith("refiner.wide.") for k in report["initialised"])
    images = torch.randn(1, 1, 32, 32, 32)
    points, labels = torch.tensor([[[4.0, 4.0, 4.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        low, _ = local.decode(local.encode(images), points, labels)
        first = [m.full_res_logits(low, None, m.refine_features(images), None, points, labels) for m in (local, wide)]
        assert torch.equal(first[0], first[1])  # zero-initialised: a file trained without it computes the same
        torch.nn.init.normal_(wide.refiner.wide[-1].weight, std=0.1)
        trained = wide.full_res_logits(low, None, wide.refine_features(images), None, points, labels)
    assert not torch.allclose(trained, first[0])  # the branch feeds the output
    with pytest.raises(ValueError, match="'local' or 'crop'"):
        build_sgp_sam("tiny", sgpm=False, refiner=True, refiner_context="global")
    refiner = MaskRefiner(context="crop")
    crop = torch.randn(1, 1, 36, 36, 36)  # even, but not a multiple of 8
    with pytest.raises(ValueError, match="multiples of 8"):
        refiner(refiner.image_features(crop), torch.zeros(1, 1, 36, 36, 36))


def _small_cube_scene(generator: torch.Generator, size: int = 32):
    """A 2 x 3 x 2-voxel bright or dark cube at a random place on a noisy background, and its centre voxel."""
    image = 0.15 * torch.randn(1, size, size, size, generator=generator)
    corner = torch.randint(4, size - 6, (3,), generator=generator)
    sign = 1.0 if bool(torch.rand(1, generator=generator) < 0.5) else -1.0
    target = torch.zeros(1, size, size, size, dtype=torch.bool)
    target[0, corner[0] : corner[0] + 2, corner[1] : corner[1] + 3, corner[2] : corner[2] + 2] = True
    image = image + sign * target.float()
    return image, target, (corner + torch.tensor([0, 1, 0])).float()


def test_refiner_learns_lesions_smaller_than_a_low_res_voxel():
    """The refiner's job as behaviour: 12-voxel cubes (smaller than the 4^3 voxels of the decoder's low-res grid
    at img_size 32) are segmented at full resolution after brief training of the refiner alone, while the
    trilinearly upsampled decoder output of the same frozen model cannot follow them."""
    torch.manual_seed(0)
    model = build_sgp_sam("tiny", sgpm=False, img_size=32, click_map=True, refiner=True)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("refiner."))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn = build_loss("zoom")
    generator = torch.Generator().manual_seed(0)
    labels = torch.ones(4, 1, dtype=torch.long)
    for _ in range(80):
        scenes = [_small_cube_scene(generator) for _ in range(4)]
        images = torch.stack([s[0] for s in scenes])
        targets = torch.stack([s[1] for s in scenes]).float()
        points = torch.stack([s[2] for s in scenes])[:, None]
        with torch.no_grad():
            low, _ = model.decode(model.encode(images), points, labels)
        logits = model.full_res_logits(low, None, model.refine_features(images), None, points, labels)
        loss = loss_fn(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    refined_dice, upsampled_dice = [], []
    with torch.no_grad():
        for _ in range(8):
            image, target, point = _small_cube_scene(generator)
            clicks = (point[None, None], labels[:1])
            low, _ = model.decode(model.encode(image[None]), *clicks)
            logits = model.full_res_logits(low, None, model.refine_features(image[None]), None, *clicks)
            refined_dice.append(float(dice((logits[0] > 0).numpy(), target.numpy())))
            upsampled_dice.append(float(dice((model.upscale_logits(low)[0] > 0).numpy(), target.numpy())))
    assert sum(refined_dice) / 8 > 0.7, refined_dice
    assert sum(upsampled_dice) / 8 < 0.2, upsampled_dice


@pytest.mark.parametrize("kernel, stride, groups", [(3, 1, 1), (1, 1, 1), (2, 2, 1), (3, 1, 4)])
def test_single_image_cpu_convolution_equals_default_path(kernel, stride, groups):
    """Conv3d's oneDNN route for batch-1 CPU inference computes nn.Conv3d's result; training keeps nn.Conv3d's."""
    torch.manual_seed(7)
    fast = Conv3d(16, 8, kernel_size=kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0, groups=groups)
    plain = torch.nn.Conv3d(16, 8, kernel_size=kernel, stride=stride, padding=fast.padding, groups=groups)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(1, 16, 20, 18, 16)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    fast(x).sum().backward()  # with gradients it is the default path, so autograd works as usual
    assert fast.weight.grad is not None and fast.weight.grad.abs().sum() > 0


def test_refiner_single_image_path_equals_batched_path():
    """The interactive (batch 1, CPU, no grad) refiner equals the same rows computed in a batch of two."""
    torch.manual_seed(8)
    model = build_sgp_sam("tiny", sgpm=False, click_map=True, refiner=True).eval()
    for param in model.refiner.out[1].parameters():
        torch.nn.init.normal_(param, std=0.1)  # leave the identity start, so the convolutions matter
    images = torch.randn(2, 1, 64, 64, 64)
    points, labels = _random_clicks(2, 3, 64, seed=9)
    with torch.no_grad():
        low, _ = model.decode(model.encode(images), points, labels)
        features = model.refine_features(images)
        batched = model.full_res_logits(low, None, features, None, points, labels)
        single = model.full_res_logits(low[:1], None, features[:1], None, points[:1], labels[:1])
    assert not torch.allclose(batched[:1], model.upscale_logits(low[:1]), atol=1e-3)
    assert torch.allclose(single, batched[:1], atol=1e-4, rtol=1e-4)


def test_refiner_local_mean_equals_average_pooling():
    image = torch.randn(2, 1, 9, 6, 3, requires_grad=True)
    pooled = torch.nn.functional.avg_pool3d(image, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    separable = MaskRefiner.local_mean(image)
    assert torch.allclose(separable, pooled, atol=1e-6)
    separable.sum().backward()  # trains through it
    assert image.grad is not None
