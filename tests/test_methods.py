"""The continual-method table, the trainer's pre-backward hook and the model objective seam."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.config import ConfigError, ExperimentConfig
from fedcl.continual.methods import METHODS, available_methods, get_method
from fedcl.simulations.catalog import load_scenario

# ---------------------------------------------------------------------------- the method table


def test_unknown_method_names_the_field_and_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="continual.method") as err:
        get_method("ewc-plus")
    for name in ("naive", "ewc", "replay", "ewc+replay", "joint", "lwf", "si"):
        assert name in str(err.value)
    # config itself takes any name: the table is where a method is checked
    assert ExperimentConfig.model_validate({"continual": {"method": "nope"}}).continual


# What milestone 1 hard-coded (ContinualSpec.uses_ewc / uses_replay) before the method table.
USES_EWC = {"ewc", "ewc+replay"}
USES_REPLAY = {"replay", "ewc+replay"}


@pytest.mark.parametrize("name", ["naive", "ewc", "replay", "ewc+replay", "joint", "lwf", "si"])
def test_declarations_match_todays_methods(name: str) -> None:
    method = get_method(name)
    assert method.consolidates == (name in USES_EWC)  # the coordinator's schedule is unchanged
    assert method.replays == (name in USES_REPLAY)
    assert (method.consolidation_release(ExperimentConfig(), 10) is not None) == (name in USES_EWC)


def test_available_methods_is_the_table() -> None:
    assert available_methods() == sorted(METHODS)
    assert {"lwf", "si"} <= set(available_methods())


def test_importing_the_table_loads_no_torch() -> None:
    code = (
        "import sys; from fedcl.continual.methods import get_method; "
        "m = get_method('lwf'); assert not m.consolidates; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_options_are_validated_by_the_method() -> None:
    def exp(method: str, **options) -> ExperimentConfig:
        return ExperimentConfig.model_validate(
            {"continual": {"method": method, "options": options}}
        )

    assert get_method("lwf").parse_options({}).temperature == 2.0
    assert get_method("lwf").parse_options({"alpha": 0.5}).alpha == 0.5
    assert get_method("si").parse_options({"c": 1, "xi": 0.01}).xi == 0.01
    with pytest.raises(ConfigError, match=r"continual\.options\.temperature"):
        get_method("lwf").check(exp("lwf", temperature=-1))
    with pytest.raises(ConfigError, match=r"continual\.options\.xi"):
        get_method("si").check(exp("si", xi=0))
    with pytest.raises(ConfigError, match=r"continual\.options\.tau.*alpha, temperature"):
        get_method("lwf").check(exp("lwf", tau=2))
    with pytest.raises(ConfigError, match=r"continual\.options\.alpha.*'naive'"):
        get_method("naive").check(exp("naive", alpha=1))  # a method without options takes none


def test_options_travel_through_set() -> None:
    _, exp = load_scenario(
        "digits-domain-il", ['continual.method="lwf"', "continual.options.temperature=3"]
    )
    assert get_method(exp.continual.method).parse_options(exp.continual.options).temperature == 3


# -------------------------------------------------------------------- the method's DP release


def test_ewc_release_is_what_the_dp_fisher_reports() -> None:
    from fedcl.continual.fisher import dp_fisher_diagonal
    from fedcl.privacy.ledger import DPRelease

    exp = ExperimentConfig.model_validate(
        {"continual": {"method": "ewc", "fisher_noise_multiplier": 2.5, "fisher_clip_norm": 0.7}}
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(11, 4), torch.randint(0, 3, (11,)))
    stated = get_method("ewc").consolidation_release(exp, len(data))
    spec = exp.continual
    _, reported = dp_fisher_diagonal(
        model,
        data,
        clip_norm=spec.fisher_clip_norm,
        noise_multiplier=spec.fisher_noise_multiplier,
        generator=torch.Generator().manual_seed(1),
    )
    assert stated == reported
    # ... and what the ledger composes is that release (today's hand-written charge, too)
    delta = 1e-5
    charged = DPRelease.of(stated, delta)
    assert charged == DPRelease.of(reported, delta)
    assert charged == DPRelease("fisher", 1.0, spec.fisher_noise_multiplier, 1, delta)
    assert get_method("ewc+replay").consolidation_release(exp, len(data)) == stated


def test_dp_ewc_sites_charge_the_stated_fisher_release(tmp_path) -> None:
    """Through the real apps: every Fisher entry in a site's ledger is the method's release."""
    from federation_helpers import run_inprocess, small_experiment

    from fedcl.client.site import load_site_data
    from fedcl.config import SiteConfig, load_toml
    from fedcl.privacy.ledger import DPRelease, PrivacyLedger

    exp = small_experiment(
        "digits-domain-il", 'continual.method="ewc"', "dp.epsilon=8", "data.num_tasks=2"
    )
    status, _, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    method = get_method("ewc")
    for i in range(3):
        site = load_toml(SiteConfig, tmp_path / "sites" / f"site-{i}.toml")
        data = load_site_data(exp, site)
        entries = [e for e in PrivacyLedger(site.state_dir).entries() if e.mechanism == "fisher"]
        assert [e.task_index for e in entries] == [0]  # one per consolidated task
        stated = method.consolidation_release(exp, len(data.train_set(0)))
        # ... charged to the cell of the task whose data it reads (parallel composition)
        assert entries[0].release == DPRelease.of(stated, site.privacy.delta, ("train:task-0",))


# ------------------------------------------------------------------ fedcl simulate pre-flight


def test_simulate_refuses_an_unknown_method_before_running(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedcl.cli.main", "simulate", "digits-domain-il",
         "--engine", "inprocess", "--set", 'continual.method="lwf2"', "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "continual.method" in proc.stderr and "lwf" in proc.stderr and "si" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "registry.db").exists() and not (out / "sites").exists()


def test_preflight_checks_the_method_options() -> None:
    from fedcl.simulations.runner import preflight

    _, exp = load_scenario("digits-domain-il", ['continual.method="si"', "continual.options.c=-1"])
    with pytest.raises(ConfigError, match=r"continual\.options\.c"):
        preflight(exp)


# ------------------------------------------------------------- the trainer's pre-backward hook


class _PerExample:
    """A hook whose extra term is ``w·Σ outputs²`` per example."""

    def __init__(self, weight: float, shape: str = "per-example") -> None:
        self.weight, self.shape = weight, shape

    def setup(self, model, optimizer, loader):
        return model, optimizer, loader

    def extra_loss(self, inputs, outputs, targets):
        term = self.weight * outputs.pow(2).sum(1)
        return term.mean() if self.shape == "scalar" else term

    def add_gradients(self, model):
        return None

    def finish(self, model, result):
        return None


def test_extra_loss_is_added_as_a_batch_mean() -> None:
    from fedcl.client.trainer import batch_loss
    from fedcl.models.registry import CLASSIFIER

    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    plain = batch_loss(model, x, y, objective=CLASSIFIER)
    assert torch.equal(plain, nn.CrossEntropyLoss()(model(x), y))
    with_term = batch_loss(model, x, y, objective=CLASSIFIER, hooks=[_PerExample(0.3)])
    expected = nn.CrossEntropyLoss()(model(x), y) + (0.3 * model(x).pow(2).sum(1)).mean()
    assert torch.allclose(with_term, expected)
    with pytest.raises(Exception, match="one value per example"):
        batch_loss(model, x, y, objective=CLASSIFIER, hooks=[_PerExample(0.3, "scalar")])


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_extra_loss_is_inside_the_per_sample_gradients(mode: str) -> None:
    """Opacus' per-sample gradients of the trainer's loss include the hook's per-example term."""
    from opacus import GradSampleModule

    from fedcl.client.trainer import batch_loss
    from fedcl.models.registry import CLASSIFIER

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    hook = _PerExample(0.7)
    gsm = GradSampleModule(model, loss_reduction="mean", force_functorch=mode == "functorch")
    batch_loss(gsm, x, y, objective=CLASSIFIER, hooks=[hook]).backward()
    per_sample = [p.grad_sample.clone() for p in model.parameters()]
    gsm._close()  # the one-at-a-time reference runs on the plain module
    for i in range(len(x)):
        out = model(x[i : i + 1])
        single = nn.functional.cross_entropy(out, y[i : i + 1]) + hook.extra_loss(None, out, None)
        grads = torch.autograd.grad(single.sum(), list(model.parameters()))
        for ps, g in zip(per_sample, grads, strict=True):
            assert torch.allclose(ps[i], g, atol=1e-6), (i, g.shape)


# -------------------------------------------------------------------- the objective registry


def test_every_registered_model_trains_the_classifier_objective() -> None:
    from fedcl.models import available_models, build_model
    from fedcl.models.registry import CLASSIFIER, model_objective, objective_of

    for name in available_models():  # the dual encoder's is PROMPT_CONTRASTIVE (test_vl.py)
        assert model_objective(name) is CLASSIFIER or name == "dual-encoder"
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=3)
    assert objective_of(model) is CLASSIFIER
    assert "fedcl_objective" not in str(list(model.state_dict()))  # not part of any update
    assert objective_of(nn.Linear(2, 2)) is CLASSIFIER  # unregistered modules: the classifier
    assert CLASSIFIER.metric_name == "accuracy"


def test_objective_is_found_through_the_opacus_wrapper() -> None:
    from opacus import GradSampleModule

    from fedcl.models.registry import CLASSIFIER, Objective, objective_of

    custom = Objective("regression", CLASSIFIER.loss, CLASSIFIER.metric, "accuracy")
    model = nn.Linear(2, 2)
    model.fedcl_objective = custom
    gsm = GradSampleModule(model)
    assert objective_of(gsm) is custom
    gsm._close()


def test_trainer_and_evaluate_use_the_models_objective() -> None:
    """A regression objective (MSE) registered on the model replaces cross-entropy."""
    from fedcl.client.trainer import LocalTrainer, evaluate
    from fedcl.config.experiment import TrainSpec
    from fedcl.models.registry import Objective

    def mse(outputs, targets, reduction="mean"):
        per = (outputs.squeeze(1) - targets).pow(2)
        return {"mean": per.mean, "sum": per.sum}.get(reduction, lambda: per)()

    def close(outputs, targets):
        return ((outputs.squeeze(1) - targets).abs() < 0.1).sum()

    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = x @ torch.tensor([1.5, -2.0]) + 0.5
    model = nn.Linear(2, 1)
    model.fedcl_objective = Objective("regression", mse, close, "within-0.1")
    trainer = LocalTrainer(TrainSpec(local_epochs=60, batch_size=16, lr=0.1), seed=0)
    result = trainer.fit(model, TensorDataset(x, y))
    assert result.steps == 240 and result.loss < 0.2  # the mean over all 60 epochs
    hits, count, loss = evaluate(model, TensorDataset(x, y))
    assert count == 64 and hits >= 60 and loss / count < 1e-3
