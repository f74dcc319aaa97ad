"""Training that is good under DP: the DP recipe's defaults and parameter averaging (issue 12).

The recipe (``[train.dp]``, ``fedcl.config.experiment.dp_recipe``) changes what DP-SGD trains
with and nothing else; the weight average (``train.ema``) changes what the site sends and not
what it spends.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client.trainer import BaseHook, LocalTrainer
from fedcl.config import ExperimentConfig
from fedcl.config.experiment import TrainSpec
from fedcl.continual.plan import RunPlan
from fedcl.models import build_model
from fedcl.privacy import DPHook
from fedcl.simulations.catalog import load_scenario

DELTA = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


def _train(exp: ExperimentConfig) -> tuple[int, float, float, float]:
    t = exp.train
    return t.batch_size, t.lr, t.momentum, t.ema


def test_without_dp_nothing_changes() -> None:
    _, plain = load_scenario("digits-class-il")
    assert _train(plain) == (16, 0.1, 0.0, 0.0)
    assert _train(ExperimentConfig()) == (32, 0.05, 0.0, 0.0)


def test_under_dp_a_scenario_takes_the_recipe_and_the_users_values_win() -> None:
    _, dp = load_scenario("digits-class-il", ["dp.epsilon=8"])
    assert _train(dp) == (128, 1.0, 0.0, 0.9)  # the scenario's [train.dp] base = "recipe"
    # --set train.X is the user's: it holds under DP, over the scenario's [train.dp] ...
    _, mine = load_scenario("digits-class-il", ["dp.epsilon=8", "train.lr=0.3"])
    assert _train(mine) == (128, 0.3, 0.0, 0.9)
    # ... and --set train.dp.X sets the DP value alone (the last --set naming a field decides).
    _, both = load_scenario(
        "digits-class-il", ["dp.epsilon=8", "train.batch_size=32", "train.dp.batch_size=64"]
    )
    assert both.train.batch_size == 64
    _, plain = load_scenario("digits-class-il", ["train.dp.lr=0.3"])
    assert plain.train.lr == 0.1  # [train.dp] is not read without DP


def test_augmentation_is_a_training_table_dp_can_take_its_own_of() -> None:
    """``[train.dp.augment]`` (augmentation multiplicity, issue 12) applies under DP only; a
    ``--set train.augment.<field>`` is the user's whole table and holds under DP too."""
    copies = ["train.dp.augment.shift=1", "train.dp.augment.multiplicity=4"]
    _, plain = load_scenario("digits-domain-il", copies)
    assert plain.train.augment.multiplicity == 1  # not read without DP
    _, dp = load_scenario("digits-domain-il", ["dp.epsilon=8", *copies])
    assert (dp.train.augment.shift, dp.train.augment.multiplicity) == (1, 4)
    _, mine = load_scenario("digits-domain-il", ["dp.epsilon=8", *copies, "train.augment.shift=2"])
    assert (mine.train.augment.shift, mine.train.augment.multiplicity) == (2, 1)
    again = ExperimentConfig.model_validate(dp.model_dump(mode="json"))  # what a site reads
    assert again.train.augment == dp.train.augment


def test_an_experiment_file_keeps_its_explicit_values_and_fills_the_rest() -> None:
    """No [train.dp]: what the experiment sets wins, unset fields come from the recipe."""
    unset = ExperimentConfig(dp={"epsilon": 8})
    assert _train(unset) == (128, 1.0, 0.0, 0.9)
    mine = ExperimentConfig(dp={"epsilon": 8}, train={"lr": 0.2, "momentum": 0.5, "ema": 0.0})
    assert _train(mine) == (128, 0.2, 0.5, 0.0)
    # The recipe keeps the effective SGD step lr / (1 - momentum) at 1.0.
    heavy = ExperimentConfig(dp={"epsilon": 8}, train={"momentum": 0.9})
    assert heavy.train.lr == pytest.approx(0.1)
    # Adam: the recipe leaves everything as the experiment says (batch 128 was worse with Adam).
    adam = ExperimentConfig(dp={"epsilon": 8}, train={"optimizer": "adam", "lr": 0.003})
    assert _train(adam) == (32, 0.003, 0.0, 0.0)
    # A scenario's own [train.dp] (naive digits domain-IL: a smaller step, no average).
    _, domain = load_scenario("digits-domain-il", ["dp.epsilon=8"])
    assert _train(domain) == (128, 0.3, 0.0, 0.0)


def test_a_scenario_can_train_with_sgd_under_dp_only() -> None:
    """digits-vl trains with Adam in clear and with SGD under DP ([train.dp] optimizer): SGD
    takes the recipe's batch and average; the user's --set train.optimizer wins under DP too."""
    _, plain = load_scenario("digits-vl")
    assert (plain.train.optimizer, *_train(plain)) == ("adam", 16, 0.003, 0.0, 0.0)
    _, dp = load_scenario("digits-vl", ["dp.epsilon=8"])
    assert (dp.train.optimizer, *_train(dp)) == ("sgd", 128, 0.3, 0.0, 0.9)
    _, mine = load_scenario("digits-vl", ["dp.epsilon=8", 'train.optimizer="adam"'])
    assert mine.train.optimizer == "adam" and mine.train.batch_size == 16  # no Adam recipe
    again = ExperimentConfig.model_validate_json(dp.model_dump_json())  # what a site reads
    assert again.train == dp.train


def test_resolution_survives_the_round_trip_to_the_sites() -> None:
    """Every site re-validates the experiment it receives: it must train with the same values."""
    for overrides in (["dp.epsilon=8"], ["dp.epsilon=8", "train.lr=0.3", "train.dp.ema=0.9"]):
        _, exp = load_scenario("digits-domain-il", overrides)
        again = ExperimentConfig.model_validate_json(exp.model_dump_json())
        assert again.train == exp.train
        assert again.model_dump() == exp.model_dump()


def _data(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, image_size=8, num_classes=10)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


class Iterates(BaseHook):
    """Records the weights before every optimizer step (after the previous one)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def add_gradients(self, model: nn.Module) -> None:
        self.seen.append(_flat(model).clone())


def _dp_fit(ema: float) -> tuple[torch.Tensor, list[torch.Tensor], DPHook, object]:
    model = _model()
    dp = DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, noise_seed=5)
    probe = Iterates()
    spec = TrainSpec(batch_size=8, local_epochs=2, lr=0.5, ema=ema)
    result = LocalTrainer(spec, seed=0).fit(model, _data(40), hooks=[dp, probe])
    return _flat(model), probe.seen, dp, result


def test_weight_average_is_post_processing_of_the_dp_iterates() -> None:
    """Same draws, noise, steps and release with EMA on; the sent weights are the EMA."""
    last, iterates, dp_off, res_off = _dp_fit(0.0)
    averaged, iterates_on, dp_on, res_on = _dp_fit(0.9)
    # The same DP-SGD ran: identical iterates, noisy steps and the release the ledger charges.
    assert len(iterates) == len(iterates_on) == res_off.steps == res_on.steps == 10
    for a, b in zip(iterates, iterates_on, strict=True):
        torch.testing.assert_close(a, b)
    assert dp_on.release() == dp_off.release()
    assert res_on.metrics["dp_steps"] == res_off.metrics["dp_steps"] == 10
    # The released weights: a_0 = w_0, a_t = d_t a_(t-1) + (1 - d_t) w_t, d_t = min(.9, t/(t+9)).
    trajectory = [*iterates[1:], last]  # w_1 .. w_T
    expected = iterates[0].clone()
    for t, w in enumerate(trajectory, start=1):
        d = min(0.9, t / (t + 9))
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-6)
    assert float((averaged - last).abs().max()) > 1e-3  # it changed what is sent


def test_weight_average_off_is_the_last_iterate() -> None:
    """ema = 0 leaves training exactly as it was (no copy, no average)."""
    model = _model()
    LocalTrainer(TrainSpec(batch_size=8, lr=0.5), seed=0).fit(model, _data(40))
    again = _model()
    LocalTrainer(TrainSpec(batch_size=8, lr=0.5, ema=0.0), seed=0).fit(again, _data(40))
    torch.testing.assert_close(_flat(model), _flat(again))


def _evaluation_sigma(**dp) -> float:
    return RunPlan.of(ExperimentConfig(dp=dp)).evaluation_noise_multiplier


def test_the_evaluation_noise_follows_the_budget_and_is_planned_for() -> None:
    """σ of the noised counts: composed with training, 24 / ε within [3, 20]; with the test
    data a cell of its own, what 0.9·ε affords the run's evaluations; the plan pays for them."""
    from fedcl.client.privacy_site import _planned_sigma
    from fedcl.continual.plan import resolve_evaluation_noise
    from fedcl.privacy.ledger import compose_epsilon

    sequential = [_evaluation_sigma(epsilon=e, composition="sequential") for e in (8, 4, 1)]
    assert sequential == [3.0, 6.0, 20.0]
    assert _evaluation_sigma(noise_multiplier=1.0) == 20.0
    assert _evaluation_sigma(epsilon=8, evaluation_noise_multiplier=9) == 9
    # Parallel (the default) with naive fine-tuning: the 1 + 5 evaluations alone at <= 0.9·ε.
    exp = ExperimentConfig(dp={"epsilon": 8})
    plan = RunPlan.of(exp)
    parallel = plan.evaluation_noise_multiplier
    assert plan.matrix_evaluations == 6 and 1.0 < parallel < 2.0
    assert 7.1 <= compose_epsilon([(parallel, 1.0, 6)], DELTA, "rdp") <= 7.2
    assert compose_epsilon([(parallel - 0.01, 1.0, 6)], DELTA, "rdp") > 7.2  # the least σ
    # Replay reads earlier tasks' records: no cells, so the evaluations compose with training.
    assert _evaluation_sigma(epsilon=8) == parallel
    replay = ExperimentConfig(dp={"epsilon": 8}, continual={"method": "replay"})
    assert RunPlan.of(replay).evaluation_noise_multiplier == 3.0
    # The coordinator states it in the experiment it sends (and records): one σ at both ends.
    assert exp.dp.evaluation_noise_multiplier is None
    assert resolve_evaluation_noise(exp).dp.evaluation_noise_multiplier == parallel
    # Digits at the recipe (q = 1/2, 12 steps a task, 5 tasks) with 1 + 5 evaluations at σ = 3:
    training = ((0.5, 12, 1),) * 5
    evaluations = ((3.0, 1.0, 1),) * 6
    alone, planned = (
        _planned_sigma(8.0, DELTA, training, ()),
        _planned_sigma(8.0, DELTA, training, evaluations),
    )
    assert alone < planned < 1.2 * alone  # the evaluations cost the training < 20 % more noise
    spent = compose_epsilon(
        [*((planned, q, s, g) for q, s, g in training), *evaluations], DELTA, "rdp"
    )
    assert 7.9 <= spent <= 8.0
