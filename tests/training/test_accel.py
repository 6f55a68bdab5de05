from __future__ import annotations

import copy

import pytest
import torch

from byol3d import BYOL, build_encoder
from byol3d.training.accel import (
    CheckpointedSequential,
    apply_speed_options,
    compile_encoder,
    device_views,
    enable_activation_checkpointing,
    memory_format,
    resolve_channels_last,
)
from byol3d.training.engine import create_trainer
from byol3d.transforms.crops import ShareItemsd
from byol3d.transforms.volume_views import view_transforms


def tiny_byol(spatial_dims=3):
    torch.manual_seed(0)
    enc = build_encoder("resnet10", spatial_dims=spatial_dims, in_channels=1)
    return BYOL(enc, input_shape=(1, *[32] * spatial_dims), hidden_dim=32, projection_dim=8)


def views(spatial_dims=3, b=2):
    g = torch.Generator().manual_seed(1)
    shape = (b, 1, *[32] * spatial_dims)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def loss_and_grads(model, v1, v2, fmt=None):
    model.train()
    if fmt is not None:
        v1, v2 = v1.contiguous(memory_format=fmt), v2.contiguous(memory_format=fmt)
    loss = model(v1, v2)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "setting, device, expected",
    [("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_channels_last_auto_means_gpu_only(setting, device, expected):
    assert resolve_channels_last(setting, device) is expected


def test_channels_last_rejects_unknown_setting():
    with pytest.raises(ValueError, match="invalid channels_last 'yes'.*auto, on, off"):
        resolve_channels_last("yes", "cpu")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_gives_the_same_loss_and_gradients(spatial_dims):
    v1, v2 = views(spatial_dims)
    ref_loss, ref_grads = loss_and_grads(tiny_byol(spatial_dims), v1, v2)
    model = tiny_byol(spatial_dims)
    apply_speed_options(model, channels_last=True, spatial_dims=spatial_dims)
    fmt = memory_format(spatial_dims)
    assert model.online_encoder.net.conv1.weight.is_contiguous(memory_format=fmt)
    loss, grads = loss_and_grads(model, v1, v2, fmt)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    # another summation order: the whole gradient agrees relative to its norm (biases before a
    # batch norm have a true gradient of 0, so they hold only rounding noise)
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    new = torch.cat([grads[name].flatten() for name in ref_grads])
    assert (new - ref).norm() <= 1e-4 * ref.norm()


def test_activation_checkpointing_keeps_loss_gradients_stats_and_keys():
    v1, v2 = views()
    ref = tiny_byol()
    ref_loss, ref_grads = loss_and_grads(ref, v1, v2)
    model = tiny_byol()
    keys = list(model.state_dict())
    apply_speed_options(model, activation_checkpointing=True)
    assert isinstance(model.online_encoder.net.layer1, CheckpointedSequential)
    loss, grads = loss_and_grads(model, v1, v2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # the recompute in backward leaves batch-norm running statistics as one forward does
    state, ref_state = model.state_dict(), ref.state_dict()
    assert list(state) == keys
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_is_off_without_gradients():
    net = build_encoder("resnet10")
    enable_activation_checkpointing(net)
    with torch.no_grad():  # would raise inside checkpoint if it tried to record
        out = net(torch.rand(2, 1, 32, 32, 32))
    assert out.shape == (2, 512)


def test_activation_checkpointing_needs_resnet_stages():
    with pytest.raises(ValueError, match="none of the stages layer1"):
        enable_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_deep_copied_checkpointed_encoder_stays_independent():
    net = build_encoder("resnet10")
    enable_activation_checkpointing(net)
    other = copy.deepcopy(net)
    assert isinstance(other.layer2, CheckpointedSequential)
    with torch.no_grad():
        other.layer1[0].conv1.weight.zero_()
    assert net.layer1[0].conv1.weight.abs().sum() > 0


def test_trainer_converts_batches_to_channels_last():
    model = tiny_byol()
    apply_speed_options(model, channels_last=True)
    seen = []
    model.online_encoder.net.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    trainer = create_trainer(model, opt, memory_format=torch.channels_last_3d)
    v1, v2 = views()
    trainer.run([{"view1": v1, "view2": v2}], max_epochs=1)
    assert seen == [True]
    assert torch.isfinite(trainer.state.output["loss"])


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss():
    v1, v2 = views()
    ref_loss, _ = loss_and_grads(tiny_byol(), v1, v2)
    model = tiny_byol()
    apply_speed_options(model, compile=True)
    loss, _ = loss_and_grads(model, v1, v2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)


def test_compile_makes_one_graph_per_network_and_mode_without_breaks_or_recompiles():
    from torch._dynamo.utils import counters

    model = tiny_byol()
    assert model.online_encoder.direct and model.target_encoder.direct  # avgpool: no hook
    torch._dynamo.reset()
    counters.clear()
    for enc in (model.online_encoder, model.target_encoder):
        assert compile_encoder(enc, backend="eager") == ["net"]
    v1, v2 = views()
    model(v1, v2).backward()
    first = counters["stats"]["unique_graphs"]
    assert first == 2  # the online encoder (with grad) and the target (no grad)
    model(v2, v1).backward()  # the same shapes again: nothing is traced again
    assert counters["stats"]["unique_graphs"] == first and "graph_break" not in counters
    assert sum(counters["frames"].values()) == 2 * first  # 'total' and 'ok' of 2 frames


def test_compile_with_hooks_compiles_only_the_stages_without_a_hooked_layer():
    torch.manual_seed(0)
    enc = build_encoder("resnet10")
    model = BYOL(enc, (1, 32, 32, 32), hidden_layer="layer3", hidden_dim=32, projection_dim=8)
    assert not model.online_encoder.direct
    assert compile_encoder(model.online_encoder, backend="eager") == ["layer1", "layer2", "layer4"]
    assert getattr(enc.layer3, "_compiled_call_impl", None) is None
    # layer4 averaged is the network's output: no hook needed, the whole forward compiles
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet10"), (1, 32, 32, 32), hidden_layer="layer4", hidden_dim=32, projection_dim=8)  # fmt: skip
    assert model.online_encoder.direct


def test_views_share_the_source_and_never_modify_it():
    source = torch.rand(1, 48, 40, 36)
    before = source.clone()
    tf = view_transforms(roi_size=(32, 32, 32), intensity_prob=1.0, noise_prob=1.0)
    tf.set_random_state(seed=0)
    out = tf({"image": source})
    torch.testing.assert_close(source, before, rtol=0, atol=0)
    assert "image" not in out
    assert out["view1"].data_ptr() != source.data_ptr() != out["view2"].data_ptr()


def test_share_items_puts_the_same_object_under_each_name():
    x = torch.zeros(1, 4, 4)
    d = ShareItemsd("image", names=["a", "b"])({"image": x})
    assert d["a"] is x and d["b"] is x
    with pytest.raises(ValueError, match="one source key"):
        ShareItemsd(["image", "label"], names=["a"])


def test_device_views_move_the_source_then_draw_views():
    tf = device_views(view_transforms(roi_size=(32, 32, 32)), "cpu")
    tf.set_random_state(seed=0)
    out = tf({"image": torch.rand(1, 40, 40, 40)})
    assert out["view1"].shape == out["view2"].shape == (1, 32, 32, 32)
