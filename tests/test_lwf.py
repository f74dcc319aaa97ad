"""Learning without Forgetting (continual.method = "lwf"): the term, the teacher, DP, forgetting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fedcl.config import ExperimentConfig
from fedcl.continual.lwf import (
    LwFHook,
    LwFOptions,
    distillation_loss,
    old_outputs,
    previous_task_model,
    site_hooks,
    teacher_path,
)
from fedcl.continual.methods import SiteContext, get_method
from fedcl.continual.streams import build_stream


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))


def _ctx(tmp_path, model, task: int, round_in_task: int = 0, scenario="domain-il") -> SiteContext:
    stream = build_stream(scenario, num_classes=8 if scenario == "domain-il" else 4, num_tasks=4)
    exp = ExperimentConfig.model_validate({"continual": {"method": "lwf"}})
    return SiteContext(
        experiment=exp,
        stream=stream,
        data=TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
        state_dir=tmp_path,
        model=model,
        run_id="run",
        site_id="site-0",
        task_index=task,
        round_in_task=round_in_task,
        server_round=1 + task * 3 + round_in_task,
    )


# ------------------------------------------------------------------------- the distillation term


def test_distillation_is_temperature_scaled_kl_per_example() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    t = 2.0
    expected = (
        F.kl_div(
            F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
            reduction="none",
        ).sum(1)
        * t**2
    )  # fmt: skip
    got = distillation_loss(student, teacher, t)
    assert got.shape == (5,) and torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(distillation_loss(teacher, teacher, t), torch.zeros(5), atol=1e-6)
    # restricted to some outputs: the softmax over those only
    sub = distillation_loss(student, teacher, t, outputs=(0, 2))
    assert torch.allclose(sub, distillation_loss(student[:, [0, 2]], teacher[:, [0, 2]], t))


def test_old_outputs_per_scenario() -> None:
    domain = build_stream("domain-il", num_classes=10, num_tasks=5)
    assert old_outputs(domain, 1) is None  # every output is shared by every task
    classes = build_stream("class-il", num_classes=10, num_tasks=5)
    assert old_outputs(classes, 2) == (0, 1, 2, 3)
    tasks = build_stream("task-il", num_classes=10, num_tasks=5)
    assert old_outputs(tasks, 1) == (0, 1)


# ----------------------------------------------------------------------------- the teacher


def test_teacher_is_the_model_received_first_in_the_task(tmp_path) -> None:
    received = _mlp(1)
    assert previous_task_model(_ctx(tmp_path, received, task=0)) is None  # nothing to distil
    assert site_hooks(_ctx(tmp_path, received, task=0), LwFOptions()) == []
    teacher = previous_task_model(_ctx(tmp_path, received, task=1, round_in_task=0))
    assert teacher_path(tmp_path, 1).exists()
    later = _mlp(2)  # round 2 of task 1 receives a model already trained on task 1
    again = previous_task_model(_ctx(tmp_path, later, task=1, round_in_task=1))
    for a, b in zip(again.state_dict().values(), received.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # still the end-of-task-0 model, read from the state folder
    assert teacher is not received and all(not p.requires_grad for p in again.parameters())


def test_a_site_joining_mid_task_keeps_the_model_it_received(tmp_path) -> None:
    joined = _mlp(3)
    teacher = previous_task_model(_ctx(tmp_path, joined, task=2, round_in_task=2))
    for a, b in zip(teacher.state_dict().values(), joined.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert teacher_path(tmp_path, 2).exists() and not teacher_path(tmp_path, 1).exists()


def test_the_row_builds_a_hook_from_the_second_task(tmp_path) -> None:
    hooks = get_method("lwf").hooks(_ctx(tmp_path, _mlp(), task=1, scenario="class-il"))
    assert len(hooks) == 1 and isinstance(hooks[0], LwFHook)
    assert hooks[0].outputs == (0,) and hooks[0].temperature == 2.0 and hooks[0].alpha == 1.0


# -------------------------------------------------------------------------------- privacy


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_grads_of_the_lwf_loss_equal_one_at_a_time(mode: str) -> None:
    """The distillation term is inside each example's loss, which DP-SGD clips and noises."""
    from opacus import GradSampleModule

    from fedcl.client.trainer import batch_loss
    from fedcl.models.registry import CLASSIFIER

    model, teacher = _mlp(0), _mlp(1)
    hook = LwFHook(copy.deepcopy(teacher), temperature=2.0, alpha=0.8, outputs=(0, 1, 3))
    torch.manual_seed(5)
    x, y = torch.randn(7, 4), torch.randint(0, 4, (7,))
    gsm = GradSampleModule(model, loss_reduction="mean", force_functorch=mode == "functorch")
    batch_loss(gsm, x, y, objective=CLASSIFIER, hooks=[hook]).backward()
    per_sample = [p.grad_sample.clone() for p in model.parameters()]
    gsm._close()
    for i in range(len(x)):
        xi, out = x[i : i + 1], model(x[i : i + 1])
        with torch.no_grad():
            target = teacher(xi)
        loss = (
            F.cross_entropy(out, y[i : i + 1])
            + 0.8 * distillation_loss(out, target, 2.0, (0, 1, 3)).sum()
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for ps, g in zip(per_sample, grads, strict=True):
            assert torch.allclose(ps[i], g, atol=1e-6), (mode, i, g.shape)
    # and the distillation really contributes (the check above is not vacuous)
    assert any(float(ps.abs().sum()) > 0 for ps in per_sample)


def test_lwf_costs_no_extra_epsilon_under_dp(tmp_path) -> None:
    """Same ledger entries (mechanism, q, σ, steps) per site with and without LwF."""
    from federation_helpers import run_inprocess, small_experiment

    from fedcl.privacy.ledger import PrivacyLedger

    ledgers = {}
    for method in ("naive", "lwf"):
        exp = small_experiment(
            "digits-domain-il", f'continual.method="{method}"', "dp.epsilon=8", "data.num_tasks=2"
        )
        status, _, _ = run_inprocess(exp, tmp_path / method)
        assert status == "completed"
        ledgers[method] = [
            [
                (e.task_index, e.server_round, e.mechanism, e.sample_rate, e.noise_multiplier,
                 e.steps, e.delta)
                for e in PrivacyLedger(tmp_path / method / "sites" / f"site-{i}").entries()
            ]
            for i in range(3)
        ]  # fmt: skip
    # one DP-SGD release per round (and the noised evaluations, the same for both methods)
    assert all(sum(e[2] == "dp-sgd" for e in entries) == 2 for entries in ledgers["lwf"])
    assert ledgers["lwf"] == ledgers["naive"]
    teachers = list((tmp_path / "lwf" / "sites").glob("site-*/runs/*/lwf/teacher-task-1.*"))
    assert len(teachers) == 3  # and LwF did distil at every site in task 1


# ----------------------------------------------------------------------------- what it does


def test_lwf_forgets_less_than_naive_on_domain_il(tmp_path) -> None:
    from test_continual_federation import _results

    naive = _results(tmp_path / "naive", "digits-domain-il")
    lwf = _results(tmp_path / "lwf", "digits-domain-il", 'continual.method="lwf"')
    assert lwf["bwt"] > naive["bwt"] + 0.05, (lwf["bwt"], naive["bwt"])
    assert lwf["avg_accuracy"] > naive["avg_accuracy"]
    kinds = [r["kind"] for r in lwf["rounds"]]
    assert "consolidate" not in kinds  # LwF needs no consolidation round
