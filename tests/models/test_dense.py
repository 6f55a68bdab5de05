from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.transforms import RandFlipd, RandRotate90d
from torch.utils.data import DataLoader

from byol3d.config import load_config
from byol3d.errors import ConfigError
from byol3d.models.byol import BYOL
from byol3d.models.correspondence import overlap_points, source_to_view
from byol3d.models.dense import dense_byol_loss, dense_term, sample_map
from byol3d.models.encoders import HookedEncoder, build_encoder
from byol3d.models.heads import DenseHead
from byol3d.training.checkpoint import config_changes
from byol3d.training.engine import create_evaluator, create_trainer, view_geometry
from byol3d.training.handlers import MetricsLogger, TargetUpdate
from byol3d.transforms.geometry import RecordedRandFlipd, RecordedRandRotate90d
from byol3d.transforms.volume_views import view_transforms

NO_INTENSITY = {"intensity_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0}


def coordinate_image(shape):
    """A (dims, *shape) image whose channel a holds each voxel's centre coordinate on axis a."""
    axes = [torch.arange(s, dtype=torch.float32) + 0.5 for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


# --- recording transforms ---------------------------------------------------------------


@pytest.mark.parametrize(
    "monai_cls, recorded_cls, kwargs",
    [
        (RandFlipd, RecordedRandFlipd, {"prob": 0.5, "spatial_axis": 1}),
        (RandRotate90d, RecordedRandRotate90d, {"prob": 0.5, "max_k": 3, "spatial_axes": (0, 1)}),
    ],
)
def test_recorded_transforms_draw_exactly_like_monai(monai_cls, recorded_cls, kwargs):
    plain = monai_cls("img", **kwargs).set_random_state(7)
    recorded = recorded_cls("img", **kwargs).set_random_state(7)
    for _ in range(20):
        img = torch.rand(1, 6, 6, 5)
        a, b = plain({"img": img}), recorded({"img": img})
        assert torch.equal(torch.as_tensor(a["img"]), torch.as_tensor(b["img"]))
    assert plain.R.rand() == recorded.R.rand()


def test_recorded_flip_and_rotation_say_what_happened():
    img = torch.arange(24.0).reshape(1, 2, 3, 4)
    out = RecordedRandFlipd("img", prob=1.0, spatial_axis=1)({"img": img})
    assert out["img_flip"].tolist() == [0, 1, 0]
    assert torch.equal(torch.as_tensor(out["img"]), img.flip(2))
    twice = RecordedRandFlipd("img", prob=1.0, spatial_axis=1)(out)
    assert twice["img_flip"].tolist() == [0, 0, 0]  # flipped back
    never = RecordedRandFlipd("img", prob=0.0, spatial_axis=0)({"img": img})
    assert never["img_flip"].tolist() == [0, 0, 0]
    every = RecordedRandFlipd("img", prob=1.0)({"img": img})  # spatial_axis None: all axes
    assert every["img_flip"].tolist() == [1, 1, 1]
    rot = RecordedRandRotate90d("img", prob=1.0, max_k=3).set_random_state(0)
    sq = torch.rand(1, 5, 5, 3)
    r = rot({"img": sq})
    k = int(r["img_rot90"])
    assert 1 <= k <= 3 and torch.equal(torch.as_tensor(r["img"]), torch.rot90(sq, k, (1, 2)))
    assert int(RecordedRandRotate90d("img", prob=0.0)({"img": sq})["img_rot90"]) == 0


def test_view_transforms_with_recording_give_the_same_views_as_plain_monai():
    """Swapping in the recording transforms changes no random draw of the pipeline."""
    views = view_transforms(roi_size=(12, 12, 12))
    plain = view_transforms(roi_size=(12, 12, 12))
    for view in plain.transforms[1:3]:
        view.transforms = tuple(
            RandFlipd(t.keys, prob=t.prob, spatial_axis=t.flipper.spatial_axis)
            if isinstance(t, RecordedRandFlipd)
            else RandRotate90d(t.keys, prob=t.prob, max_k=t.max_k, spatial_axes=t.spatial_axes)
            if isinstance(t, RecordedRandRotate90d)
            else t
            for t in view.transforms
        )
    views.set_random_state(3)
    plain.set_random_state(3)
    for _ in range(5):
        src = torch.rand(1, 20, 18, 16)
        a, b = views({"image": src}), plain({"image": src})
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
        assert "view1_flip" not in b


# --- coordinate mapping -----------------------------------------------------------------


def test_source_to_view_hand_made_case():
    box = torch.tensor([[[10, 20], [0, 8]]])
    pts = torch.tensor([[[12.0, 2.0], [20.0, 8.0]]])
    assert torch.allclose(source_to_view(pts, box), torch.tensor([[[0.2, 0.25], [1.0, 1.0]]]))
    flipped = source_to_view(pts, box, torch.tensor([[1, 0]]))
    assert torch.allclose(flipped, torch.tensor([[[0.8, 0.25], [0.0, 1.0]]]))
    # one quarter turn in (0, 1): (u0, u1) -> (1 - u1, u0); two: (1 - u0, 1 - u1)
    turned = source_to_view(pts, box, None, torch.tensor([1]))
    assert torch.allclose(turned, torch.tensor([[[0.75, 0.2], [0.0, 1.0]]]))
    half = source_to_view(pts, box, None, torch.tensor([2]))
    assert torch.allclose(half, torch.tensor([[[0.8, 0.75], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="points must have shape"):
        source_to_view(torch.zeros(1, 3, 3), box)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_source_to_view_matches_torch_rot90_and_flip(k):
    shape = (6, 6, 4)
    img = coordinate_image(shape)
    view = torch.rot90(img.flip(3), k, (1, 2))  # flip spatial axis 2, then turn
    centres = coordinate_image(shape).reshape(3, -1).T  # view voxel centres, view coordinates
    expected = (centres / torch.tensor(shape, dtype=torch.float32))[None]
    sources = view.reshape(3, -1).T[None]  # the source coordinate each view voxel shows
    box = torch.tensor([[[0, 6], [0, 6], [0, 4]]])
    got = source_to_view(sources, box, torch.tensor([[0, 0, 1]]), torch.tensor([k]))
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    "roi, shape", [((16, 16, 16), (22, 26, 19)), ((24, 24), (40, 33))], ids=["3d", "2d"]
)
def test_mapped_points_read_back_their_source_coordinates_through_the_real_views(roi, shape):
    """Source voxels hold their own coordinates; after crop, flips and turns of the real view
    pipeline, each overlap point mapped into each view reads back its source coordinates."""
    views = view_transforms(roi_size=roi, flip_prob=0.5, rotate90_prob=0.5, **NO_INTENSITY)
    views.set_random_state(11)
    img = coordinate_image(shape)
    batch = list_data_collate([views({"image": img.clone()}) for _ in range(16)])
    g1, g2 = view_geometry(batch, "view1"), view_geometry(batch, "view2")
    assert g1["flip"].any() and g1["rot90"].any()  # the test really exercises flips and turns
    points, valid = overlap_points(g1["box"], g2["box"], grid=3)
    assert valid.sum() >= 8
    for key, g in (("view1", g1), ("view2", g2)):
        coords = source_to_view(points, g["box"], g["flip"], g["rot90"])
        read = sample_map(batch[key], coords).permute(0, 2, 1)
        # interpolation is exact for a linear field except near the view's border, where an
        # upsampling resize clamps (half a source voxel) and grid_sample then mixes in the
        # clamped view voxel (one view voxel)
        size = (g["box"][..., 1] - g["box"][..., 0]).float()
        if g["rot90"] is not None:  # the view's first two axes are the box's, swapped on odd turns
            odd = (g["rot90"] % 2 == 1).unsqueeze(-1)
            size = torch.where(odd, size[:, [1, 0, *range(2, size.shape[1])]], size)
        margin = (0.5 / size + 1.0 / roi[0]).unsqueeze(1)
        inner = ((coords >= margin) & (coords <= 1 - margin)).all(-1) & valid.unsqueeze(1)
        assert inner.float().mean() > 0.3
        assert torch.allclose(read[inner], points[inner], atol=1e-3), key


def test_overlap_points_regular_grid_and_disjoint_boxes():
    b1 = torch.tensor([[[0, 4], [0, 4]], [[0, 2], [0, 2]]])
    b2 = torch.tensor([[[2, 6], [1, 9]], [[2, 6], [0, 2]]])
    points, valid = overlap_points(b1, b2, grid=2)
    assert valid.tolist() == [True, False]
    # overlap [2, 4) x [1, 4): centres of a 2 x 2 subdivision
    assert points[0].tolist() == [[2.5, 1.75], [2.5, 3.25], [3.5, 1.75], [3.5, 3.25]]
    assert torch.isfinite(points).all()
    with pytest.raises(ValueError, match="grid"):
        overlap_points(b1, b2, grid=0)


def test_view_geometry_names_a_missing_key():
    with pytest.raises(KeyError, match="view1_flip"):
        view_geometry({"view1": torch.zeros(1), "view1_box": torch.zeros(1, 3, 2)}, "view1")


# --- the loss ---------------------------------------------------------------------------


def test_dense_byol_loss_equals_the_formula_at_cell_centres():
    torch.manual_seed(0)
    p_map, z_map = torch.randn(3, 5, 4, 4, 4), torch.randn(3, 5, 4, 4, 4)
    idx_p = torch.tensor([[[0, 1, 2], [3, 3, 0]]] * 3)  # (B, P=2, 3) cell indices
    idx_z = torch.tensor([[[1, 1, 1], [0, 2, 3]]] * 3)
    valid = torch.tensor([True, False, True])
    loss = dense_byol_loss(p_map, z_map, (idx_p + 0.5) / 4, (idx_z + 0.5) / 4, valid)
    terms = []
    for b in (0, 2):
        for j in range(2):
            p = p_map[(b, slice(None), *idx_p[b, j])]
            z = z_map[(b, slice(None), *idx_z[b, j])]
            terms.append(2 - 2 * F.cosine_similarity(p, z, dim=0))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def test_dense_term_is_zero_without_nan_when_no_views_overlap():
    p = torch.randn(4, 3, 4, 4, 4, requires_grad=True)
    z = torch.randn(4, 3, 4, 4, 4)
    g1 = {"box": torch.tensor([[[0, 4], [0, 4], [0, 4]]] * 2), "flip": torch.zeros(2, 3)}
    g2 = {"box": torch.tensor([[[4, 8], [0, 4], [0, 4]]] * 2), "flip": torch.ones(2, 3)}
    loss = dense_term(p, z, g1, g2, grid=3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(p.grad, torch.zeros_like(p.grad))


def test_dense_term_of_identical_views_with_equal_maps_is_zero():
    """Two views of the same box, one flipped and turned: reading the maps after undoing the
    geometry finds the same vectors, so the loss is 0; without the geometry it is not."""
    torch.manual_seed(1)
    base = torch.randn(2, 6, 4, 4, 4)
    turned = torch.rot90(base.flip(2), 1, (2, 3))  # flip spatial axis 0, then turn in (0, 1)
    box = torch.tensor([[[0, 8], [0, 8], [0, 8]]] * 2)
    g1 = {"box": box, "flip": torch.zeros(2, 3), "rot90": torch.zeros(2)}
    g2 = {"box": box, "flip": torch.tensor([[1, 0, 0]] * 2), "rot90": torch.ones(2)}
    maps = torch.cat([base, turned])
    assert dense_term(maps, maps, g1, g2, grid=4).item() == pytest.approx(0.0, abs=1e-5)
    plain = {"box": box, "flip": torch.zeros(2, 3)}
    assert dense_term(maps, maps, g1, plain, grid=4).item() > 0.1


def test_dense_head_is_the_mlp_at_every_location():
    head = DenseHead(2, 8, 16, 4).eval()
    x = torch.randn(2, 8, 3, 5)
    out = head(x)
    assert out.shape == (2, 4, 3, 5)
    w1, bn, w2 = head[0], head[1], head[3]
    v = x[1, :, 2, 4]
    h = F.relu(bn(F.linear(v, w1.weight[:, :, 0, 0], w1.bias)[None, :, None, None]).flatten())
    assert torch.allclose(out[1, :, 2, 4], F.linear(h, w2.weight[:, :, 0, 0], w2.bias), atol=1e-6)


# --- the model --------------------------------------------------------------------------

SHAPE = (1, 32, 32, 32)


def _model(dense_weight=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    return BYOL(
        build_encoder("resnet10"),
        input_shape=SHAPE,
        hidden_dim=32,
        projection_dim=8,
        dense_weight=dense_weight,
        dense_layer="layer2",
        **kw,
    )


def _geometry(n):
    g1 = {
        "box": torch.tensor([[[0, 20], [0, 20], [0, 20]]] * n),
        "flip": torch.zeros(n, 3),
        "rot90": torch.zeros(n),
    }
    g2 = {
        "box": torch.tensor([[[5, 30], [5, 30], [5, 30]]] * n),
        "flip": torch.tensor([[1, 0, 1]] * n),
        "rot90": torch.tensor([1] * n),
    }
    return g1, g2


def test_hooked_encoder_gives_representation_and_map_in_one_forward():
    enc = build_encoder("resnet10").eval()
    calls = []
    enc.conv1.register_forward_hook(lambda *_: calls.append(1))
    hooked = HookedEncoder(enc, "avgpool", dense_layer="layer2")
    x = torch.randn(2, *SHAPE)
    rep, fmap = hooked.forward_with_map(x)
    assert len(calls) == 1
    assert torch.equal(rep, hooked(x)) and fmap.shape == (2, 128, 4, 4, 4)
    with pytest.raises(ValueError, match="dense_layer 'layer9'"):
        HookedEncoder(enc, "avgpool", dense_layer="layer9")


def test_dense_weight_zero_is_plain_byol():
    torch.manual_seed(5)
    x1, x2 = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    plain = _model(0.0)
    dense = _model(0.5)
    assert not plain.wants_geometry and dense.wants_geometry
    assert not any("dense" in k for k in plain.state_dict())
    extra = set(dense.state_dict()) - set(plain.state_dict())
    assert extra and all("dense" in k for k in extra)
    torch.manual_seed(9)
    loss0 = plain(x1, x2)
    torch.manual_seed(9)
    loss, stats = dense(
        x1, x2, return_stats=True, geometry1=_geometry(2)[0], geometry2=_geometry(2)[1]
    )
    # the dense heads are built after the global ones: same global network, same global loss
    assert torch.allclose(loss - 0.5 * stats["dense"], loss0, atol=1e-5)
    assert 0 < stats["dense"].item() <= 8
    with pytest.raises(ValueError, match="geometry1 and geometry2"):
        dense(x1, x2)
    with pytest.raises(ValueError, match="dense_weight"):
        _model(-1.0)


def test_ema_covers_the_dense_projector():
    model = _model(1.0)
    with torch.no_grad():
        for p in model.online_dense_projector.parameters():
            p.add_(1.0)
    target, online = model.target_dense_projector, model.online_dense_projector
    before = [p.clone() for p in target.parameters()]
    model.update_target(0.25)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        assert not t.requires_grad
        assert torch.allclose(t, 0.25 * b + 0.75 * o, atol=1e-6)
    assert not any(p.requires_grad for p in model.target_dense_projector.parameters())
    assert all(p.requires_grad for p in model.dense_predictor.parameters())


def test_trainer_passes_geometry_and_logs_the_dense_term(tmp_path):
    views = view_transforms(roi_size=(32, 32, 32))
    views.set_random_state(0)
    data = [views({"image": torch.rand(1, 40, 40, 36)}) for _ in range(4)]
    loader = DataLoader(data, batch_size=2, collate_fn=list_data_collate)
    model = _model(1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = create_trainer(model, optimizer)
    TargetUpdate(model, base_tau=0.9).attach(trainer)
    MetricsLogger(tmp_path / "metrics.csv", log_every=1, extra_columns=("dense",)).attach(trainer)
    before = [p.clone() for p in model.dense_predictor.parameters()]
    target_before = [p.clone() for p in model.target_dense_projector.parameters()]
    trainer.run(loader, max_epochs=1)
    out = trainer.state.output
    assert set(out) == {"loss", "collapse", "lr", "dense"} and math.isfinite(out["dense"].item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.dense_predictor.parameters()))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(target_before, model.target_dense_projector.parameters())
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 2 and all(float(r["dense"]) > 0 for r in rows)
    assert float(rows[-1]["loss"]) > float(rows[-1]["dense"])  # global + 1.0 * dense
    val = create_evaluator(model).run(loader).metrics["loss"]
    assert math.isfinite(val)


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dense_grid=0", "model.dense_grid"),
        ("model.dense_weight=-1", "model.dense_weight"),
        ("model.dense_layer=avgpool", "model.dense_layer"),
    ],
)
def test_bad_dense_settings_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_runs_saved_before_the_dense_keys_existed_resume_unchanged():
    new = load_config(None, [])
    old = {s: dict(v) if isinstance(v, dict) else v for s, v in new.items()}
    for k in ("dense_weight", "dense_layer", "dense_grid"):
        del old["model"][k]
    assert config_changes(old, new) == []
    changed = load_config(None, ["model.dense_weight=1.0"])
    assert config_changes(old, changed) == ["model.dense_weight: 0.0 -> 1.0"]


def test_records_collate_to_tensors():
    views = view_transforms(roi_size=(12, 12))
    items = [views({"image": torch.rand(1, 20, 20)}) for _ in range(3)]
    batch = list_data_collate(items)
    assert batch["view1_flip"].shape == (3, 2) and batch["view1_flip"].dtype == torch.int64
    assert batch["view2_rot90"].shape == (3,)
    assert np.isin(batch["view2_rot90"].numpy(), [0, 1, 2, 3]).all()


def test_dense_loss_under_bf16_autocast_is_finite_float32():
    model = _model(1.0)
    g1, g2 = _geometry(2)
    x1, x2 = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = model(x1, x2, return_stats=True, geometry1=g1, geometry2=g2)
    assert stats["dense"].dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.dense_predictor.parameters()
    )
