"""Synaptic Intelligence (continual.method = "si"): importance = path integral, penalty, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client.trainer import BaseHook, LocalTrainer
from fedcl.config import ExperimentConfig, FedclError
from fedcl.config.experiment import TrainSpec
from fedcl.continual.methods import SiteContext, get_method
from fedcl.continual.si import SIHook, SIState, state_path
from fedcl.continual.streams import build_stream
from fedcl.models.registry import CLASSIFIER, Objective

LR = 0.1
A = torch.tensor([1.0, 0.5, 2.0, 0.05])
B = torch.tensor([1.0, -2.0, 0.5, 3.0])
THETA0 = torch.tensor([0.0, 0.5, -1.0, 0.0])


class Point(nn.Module):
    """θ itself is the model's output, for every example: the loss is a quadratic in θ."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(len(x), -1)


def _quadratic(outputs, targets, reduction="mean"):
    per = 0.5 * (A * (outputs - B) ** 2).sum(1)  # gradient in θ: A·(θ − B)
    return {"mean": per.mean, "sum": per.sum}.get(reduction, lambda: per)()


QUADRATIC = Objective("quadratic", _quadratic, CLASSIFIER.metric, "none")
DATA = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


def _experiment(**options) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"train": {"lr": LR, "batch_size": 4}, "continual": {"method": "si", "options": options}}
    )


def _ctx(tmp_path, model, task: int, server_round: int, **options) -> SiteContext:
    return SiteContext(
        experiment=_experiment(**options),
        stream=build_stream("domain-il", num_classes=10, num_tasks=5),
        data=DATA,
        state_dir=tmp_path,
        model=model,
        run_id="run",
        site_id="site-0",
        task_index=task,
        round_in_task=0,
        server_round=server_round,
    )


def _round(tmp_path, model, task: int, server_round: int, epochs: int, **options):
    """One training message at the site: the row's hooks, then K plain-SGD steps."""
    hooks = get_method("si").hooks(_ctx(tmp_path, model, task, server_round, **options))
    trainer = LocalTrainer(TrainSpec(lr=LR, batch_size=4, local_epochs=epochs), seed=0)
    trainer.fit(model, DATA, hooks=hooks, objective=QUADRATIC)
    return hooks[0]


def _by_hand(theta: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ after ``steps`` SGD steps, ω = Σ −g·Δθ), in float64."""
    theta, a, b = theta.double(), A.double(), B.double()
    omega = torch.zeros_like(theta)
    for _ in range(steps):
        g = a * (theta - b)
        new = theta - LR * g
        omega += -g * (new - theta)
        theta = new
    return theta, omega


def test_importance_is_the_path_integral_on_a_quadratic(tmp_path) -> None:
    """Two rounds of task 0 (K = 7 and 5 steps), then task 1 starts: Ω = ω / (Δ² + ξ)."""
    xi = 0.05
    model = Point(THETA0)
    _round(tmp_path, model, task=0, server_round=1, epochs=7, xi=xi, c=0.5)
    _round(tmp_path, model, task=0, server_round=2, epochs=5, xi=xi, c=0.5)
    theta_end, omega = _by_hand(THETA0, 12)
    assert torch.allclose(model.theta.detach().double(), theta_end, atol=1e-6)
    state = SIState.load(state_path(tmp_path))
    assert torch.allclose(state.omega["theta"].double(), omega, rtol=1e-5, atol=1e-7)
    assert state.tags == ["round-1", "round-2"] and not state.importance

    # The site's first message of task 1: task 0 is closed with the model it received.
    received = Point(model.theta.detach())
    hook = get_method("si").hooks(_ctx(tmp_path, received, 1, 3, xi=xi, c=0.5))[0]
    delta = theta_end - THETA0.double()
    importance = omega / (delta**2 + xi)
    assert torch.allclose(hook.state.importance["theta"].double(), importance, rtol=1e-5)
    assert torch.equal(hook.state.anchor["theta"], received.theta.detach())
    assert float(hook.state.omega["theta"].abs().sum()) == 0.0  # task 1's path starts anew
    assert torch.equal(hook.state.start["theta"], received.theta.detach())


def test_a_retried_round_is_not_counted_twice(tmp_path) -> None:
    model = Point(THETA0)
    _round(tmp_path, model, task=0, server_round=1, epochs=3)
    once = SIState.load(state_path(tmp_path)).omega["theta"].clone()
    _round(tmp_path, Point(THETA0), task=0, server_round=1, epochs=3)  # the same message again
    assert torch.equal(SIState.load(state_path(tmp_path)).omega["theta"], once)


def test_penalty_gradient_is_added_after_the_data_gradient(tmp_path) -> None:
    c, xi = 0.2, 0.05
    model = Point(THETA0)
    _round(tmp_path, model, task=0, server_round=1, epochs=6, c=c, xi=xi)
    trained = Point(model.theta.detach())
    hook = get_method("si").hooks(_ctx(tmp_path, trained, 1, 2, c=c, xi=xi))[0]
    student = Point(trained.theta.detach() + torch.tensor([0.3, -0.2, 0.1, 0.4]))
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    hook.setup(student, opt, None)
    _quadratic(student(torch.zeros(2, 1)), None).backward()
    data_grad = student.theta.grad.clone()
    hook.add_gradients(student)
    omega_t, anchor = hook.state.importance["theta"], hook.state.anchor["theta"]
    curvature = (2 * c * omega_t).clamp(max=1 / LR)  # capped at 1/lr with plain SGD
    expected = data_grad + curvature * (student.theta.detach() - anchor)
    assert torch.allclose(student.theta.grad, expected, atol=1e-6)
    assert hook.penalty() == pytest.approx(
        c * float((omega_t * (student.theta.detach() - anchor) ** 2).sum()), rel=1e-5
    )


def test_path_integral_uses_the_privatised_gradient(tmp_path) -> None:
    """Under DP-SGD, ω = Σ lr·g̃² with g̃ the clipped, noised gradient the optimizer stepped with."""
    from fedcl.privacy.dp import DPHook

    class Recorder(BaseHook):
        def __init__(self) -> None:
            self.grads: list[torch.Tensor] = []

        def add_gradients(self, model):
            self.grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    state = SIState()
    state.begin_task(0, {n: p.detach() for n, p in model.named_parameters()}, xi=0.1)
    si, recorder = SIHook(state, c=0.0, tag="round-1"), Recorder()
    dp = DPHook(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-5, noise_seed=3)
    trainer = LocalTrainer(TrainSpec(lr=LR, batch_size=16, local_epochs=2), seed=0)
    trainer.fit(model, data, hooks=[dp, recorder, si])
    omega = torch.cat([state.omega[n].flatten() for n, _ in model.named_parameters()])
    expected = sum(LR * g.double() ** 2 for g in recorder.grads)
    assert len(recorder.grads) == 8
    assert torch.allclose(omega.double(), expected, rtol=1e-4, atol=1e-9)


def test_state_must_match_the_model(tmp_path) -> None:
    state = SIState()
    state.begin_task(0, {"weight": torch.zeros(2, 2)}, xi=0.1)
    with pytest.raises(FedclError, match="SI state does not match"):
        SIHook(state, c=1.0, tag="r").setup(nn.Linear(2, 2), None, None)
    state.begin_task(2, {"weight": torch.zeros(2, 2)}, xi=0.1)
    with pytest.raises(FedclError, match="task 2"):
        state.begin_task(1, {"weight": torch.zeros(2, 2)}, xi=0.1)


def test_si_forgets_less_than_naive_on_domain_il(tmp_path) -> None:
    from test_continual_federation import _results

    naive = _results(tmp_path / "naive", "digits-domain-il")
    si = _results(tmp_path / "si", "digits-domain-il", 'continual.method="si"')
    assert si["bwt"] > naive["bwt"] + 0.05, (si["bwt"], naive["bwt"])
    assert si["avg_accuracy"] > naive["avg_accuracy"]
    assert "consolidate" not in [r["kind"] for r in si["rounds"]]
    states = list((tmp_path / "si" / "sites").glob("site-*/runs/*/si.safetensors"))
    assert len(states) == 5  # each site keeps its own path integral on its own disk
    state = SIState.load(states[0])
    assert (
        state.task == 4
        and state.importance
        and all(bool((w >= 0).all()) for w in state.importance.values())
    )
