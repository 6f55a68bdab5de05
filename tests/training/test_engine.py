from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from byol3d import BYOL, cosine_tau
from byol3d.errors import NonFiniteLossError
from byol3d.training.checkpoint import check_finite_weights
from byol3d.training.engine import create_evaluator, create_trainer, optimizer_steps, resolve_amp
from byol3d.training.handlers import MetricsLogger, Reseed, TargetUpdate


def tiny_model():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    return BYOL(enc, input_shape=(8,), hidden_layer="3", projection_dim=3, hidden_dim=4)


def batches(n=6, b=4):
    g = torch.Generator().manual_seed(1)
    return [
        {"view1": torch.randn(b, 8, generator=g), "view2": torch.randn(b, 8, generator=g)}
        for _ in range(n)
    ]


def target_state(model):
    return [p.detach().clone() for p in model.target_encoder.parameters()]


def test_trainer_updates_online_and_target_with_cosine_tau():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt)
    TargetUpdate(model, base_tau=0.9).attach(trainer)
    taus = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: taus.append(e.state.tau))
    before = target_state(model)
    trainer.run(batches(5), max_epochs=2)
    assert taus == pytest.approx([cosine_tau(k, 10, 0.9) for k in range(10)])
    assert any(not torch.equal(a, b) for a, b in zip(before, target_state(model)))


def test_target_update_only_when_optimizer_stepped():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, accumulate_steps=2)
    TargetUpdate(model, base_tau=0.5).attach(trainer)
    log = []

    def record(engine):
        log.append((engine.state.iteration, engine.state.optimizer_stepped, target_state(model)))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    start = target_state(model)
    trainer.run(batches(4), max_epochs=1)
    prev = start
    for it, stepped, state in log:
        changed = any(not torch.equal(a, b) for a, b in zip(prev, state))
        assert stepped == (it % 2 == 0) and changed == stepped, it
        prev = state


def test_ema_step_is_exact_on_tiny_model():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt)
    TargetUpdate(model, base_tau=0.9).attach(trainer)
    snapshots = {}

    @trainer.on(Events.ITERATION_STARTED)
    def before(engine):
        snapshots["target"] = target_state(model)

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(engine):
        online = [p.detach() for p in model.online_encoder.parameters()]
        tau = engine.state.tau
        for new, old, o in zip(target_state(model), snapshots["target"], online):
            torch.testing.assert_close(new, tau * old + (1 - tau) * o, rtol=1e-6, atol=1e-7)

    trainer.run(batches(3), max_epochs=1)


def test_trainer_output_is_detached_tensors():
    model = tiny_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = trainer.run(batches(2), max_epochs=1)
    assert set(state.output) == {"loss", "collapse", "lr"}
    assert not state.output["loss"].requires_grad and state.output["loss"].ndim == 0


def test_lr_scheduler_steps_per_optimizer_step():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    trainer = create_trainer(model, opt, lr_scheduler=sched, accumulate_steps=2)
    trainer.run(batches(6), max_epochs=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / 4)  # 3 optimizer steps


def test_metrics_logger_writes_every_iteration(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt)
    TargetUpdate(model, 0.99).attach(trainer)
    MetricsLogger(tmp_path / "metrics.csv", log_every=4).attach(trainer)
    trainer.run(batches(5), max_epochs=2)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 11))
    assert [int(r["epoch"]) for r in rows] == [1] * 5 + [2] * 5
    assert float(rows[0]["tau"]) == pytest.approx(0.99)
    assert all(0 <= float(r["loss"]) <= 8 and float(r["collapse"]) > 0 for r in rows)
    assert trainer.state.metrics["loss"] == pytest.approx(float(rows[-1]["loss"]))


def test_non_finite_loss_stops_naming_the_iteration(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt)
    MetricsLogger(tmp_path / "metrics.csv", log_every=100).attach(trainer)
    data = batches(4)
    data[2]["view1"][:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="iteration 3 "):
        trainer.run(data, max_epochs=1)


def test_evaluator_mean_loss_in_eval_mode_without_grad():
    model = tiny_model()
    data = batches(3)
    loss = create_evaluator(model).run(data).metrics["loss"]
    model.eval()
    with torch.no_grad():
        expected = np.mean([model(b["view1"], b["view2"]).item() for b in data])
    assert loss == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_reseed_gives_the_same_draws_per_epoch():
    class Source:
        def __init__(self):
            self.seeds = []

        def set_random_state(self, seed):
            self.seeds.append(seed)

    def draws(epochs):
        src = Source()
        trainer = create_trainer(tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.0))
        Reseed(7, [src]).attach(trainer)
        out = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: out.append(torch.rand(1).item()))
        trainer.run(batches(1), max_epochs=epochs)
        return out, src.seeds

    (a, sa), (b, sb) = draws(3), draws(3)
    assert a == b and sa == sb and len(set(sa)) == 3


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) is None
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(Exception, match="fp16"):
        resolve_amp("fp16", cpu)


def test_bf16_autocast_step_runs_on_cpu():
    model = tiny_model()
    trainer = create_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), amp_dtype=torch.bfloat16
    )
    state = trainer.run(batches(2), max_epochs=1)
    assert torch.isfinite(state.output["loss"]) and state.output["loss"].dtype == torch.float32


def test_accumulation_steps_at_epoch_end_and_tau_counts_real_steps():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, accumulate_steps=2)
    TargetUpdate(model, base_tau=0.9).attach(trainer)
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.optimizer_stepped, e.state.tau))
    )
    trainer.run(batches(5), max_epochs=2)  # steps at iterations 2, 4, 5 of each epoch
    assert [s for s, _ in seen] == [False, True, False, True, True] * 2
    taus = [t for s, t in seen if s]
    assert taus == pytest.approx([cosine_tau(k, 6, 0.9) for k in range(6)])
    assert (
        optimizer_steps(5, 5, 2) == 3
        and optimizer_steps(7, 5, 2) == 4
        and optimizer_steps(10, 5, 2) == 6
    )


def test_logged_lr_is_the_lr_the_step_used(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    trainer = create_trainer(model, opt, lr_scheduler=sched)
    MetricsLogger(tmp_path / "m.csv", log_every=1).attach(trainer)
    trainer.run(batches(3), max_epochs=1)
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1.0, 0.5, 1 / 3])


def test_non_finite_weights_are_never_checkpointed():
    model = tiny_model()
    check_finite_weights(model, 1)
    with torch.no_grad():
        model.predictor[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="iteration 7"):
        check_finite_weights(model, 7)


def test_progress_bar_shows_the_flushed_loss_and_never_nan(tmp_path, capsys):
    from byol3d.training.builders import attach_progress_bar

    model = tiny_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    TargetUpdate(model, 0.99).attach(trainer)
    MetricsLogger(tmp_path / "m.csv", log_every=10).attach(trainer)  # longer than an epoch
    attach_progress_bar(trainer)
    trainer.run(batches(3), max_epochs=2)
    err = capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert "nan" not in err
    # each epoch's persisted bar ends on that epoch's last loss, flushed at the epoch's end
    assert (
        f"loss={float(rows[2]['loss']):.4g}" in err and f"loss={float(rows[5]['loss']):.4g}" in err
    )


def test_epoch_line_without_validation_set_has_no_val_loss(tmp_path, caplog):
    import logging

    from byol3d.training.handlers import attach_epoch_log

    model = tiny_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    attach_epoch_log(trainer, model, tmp_path / "epochs.csv", None, None, "cpu", None, 0, None)
    with caplog.at_level(logging.INFO, logger="byol3d"):
        trainer.run(batches(2), max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1:")]
    assert len(lines) == 1 and "val" not in lines[0] and "nan" not in lines[0]


def test_knn_shards_are_put_back_in_row_order():
    from byol3d.training.handlers import unshard

    n, world = 7, 3
    per = -(-n // world)
    blocks = []
    for r in range(world):
        rows = [float(i) for i in range(r, n, world)]
        blocks += rows + [-1.0] * (per - len(rows))  # padding rows are dropped
    out = unshard(torch.tensor(blocks)[:, None], n, world)
    assert out.flatten().tolist() == [float(i) for i in range(n)]


def test_batch_preview_draws_the_views_in_hand_off_the_training_thread():
    from byol3d.training.handlers import BatchPreview

    class Writer:
        def __init__(self):
            self.calls = []

        def add_figure(self, tag, fig, step):
            self.calls.append((tag, step, len(fig.byol3d_panels)))

    writer, v = Writer(), torch.rand(3, 1, 32, 32, 32)
    engine = Engine(lambda e, b: None)
    BatchPreview(writer, every=2).attach(engine)
    engine.run([{"view1": v, "view2": v}] * 4, max_epochs=1)
    assert writer.calls == [("views", 2, 2), ("views", 4, 2)]  # two samples per picture
