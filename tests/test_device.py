"""Where sites train: the ``device`` setting resolved against the machine, the CPU fallback
and its message, one device for every tensor of a step, and the simulation's GPU settings.

This box has no GPU (torch is the CPU build), so what needs CUDA is checked by
``benchmarks/gpu_check.py`` on a machine that has one; here the resolution logic, the fallback
and the device consistency of the regularisers are.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client import device as device_mod
from fedcl.client.device import autocast_for, cuda_unavailable_reason, place, resolve_device
from fedcl.client.trainer import BaseHook, LocalTrainer, ProximalTerm
from fedcl.config import FedclError
from fedcl.config.experiment import ExperimentConfig, SimulationSpec, TrainSpec
from fedcl.simulations.runner import RayCluster, ray_backend_config, write_site_configs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(device_mod, "_WARNED", set())


def test_device_names_resolve_and_cuda_falls_back_once_with_the_reason(caplog) -> None:
    assert cuda_unavailable_reason() is not None
    assert resolve_device("cpu") == torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="fedcl.client"):
        assert resolve_device("auto", site_id="site-0") == torch.device("cpu")
        assert caplog.records == []  # auto means "a GPU if there is one": nothing to say
        for _ in range(3):
            assert resolve_device("cuda", site_id="site-0") == torch.device("cpu")
        assert resolve_device("cuda:1", site_id="site-0") == torch.device("cpu")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per site and setting, not per round
    assert "site site-0" in messages[0] and "'cuda'" in messages[0]
    assert cuda_unavailable_reason() in messages[0] and "training on the CPU" in messages[0]
    with pytest.raises(
        FedclError, match=r"site site-1: device = 'tpu' .*cpu, cuda, cuda:N or auto"
    ):
        resolve_device("tpu", site_id="site-1")


def test_autocast_is_off_on_the_cpu() -> None:
    ctx = autocast_for(torch.device("cpu"), enabled=True)
    with ctx:
        out = nn.Linear(3, 2)(torch.ones(1, 3))
    assert out.dtype == torch.float32


class _DeviceProbe(BaseHook):
    """After privatisation, before the step: every tensor the step touches, and its device."""

    def __init__(self, prox: ProximalTerm):
        self.prox = prox
        self.devices: set[torch.device] = set()
        self.dtypes: set[torch.dtype] = set()

    def add_gradients(self, model):
        for p in model.parameters():
            self.devices |= {p.device, p.grad.device}
        for g in self.prox.global_params:
            self.devices.add(g.device)
            self.dtypes.add(g.dtype)


def test_fedprox_keeps_its_global_weights_on_the_models_device_and_dtype(caplog) -> None:
    """The global weights come in float64 on purpose: unless ``ProximalTerm.setup`` moves them
    to the parameters' device and dtype, the in-place gradient update fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    anchor = [p.detach().to(torch.float64) + 1.0 for p in model.parameters()]
    prox = ProximalTerm(0.5, anchor)
    probe = _DeviceProbe(prox)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 1, 4, 4, generator=gen), torch.randint(0, 4, (12,)))
    with caplog.at_level(logging.WARNING, logger="fedcl.client"):
        trainer = LocalTrainer(TrainSpec(batch_size=4, lr=0.1), device="cuda", site_id="site-7")
        result = trainer.fit(model, data, hooks=[prox, probe])
    assert trainer.device == torch.device("cpu")
    assert any("site site-7" in r.getMessage() for r in caplog.records)
    assert result.steps == 3
    assert probe.devices == {torch.device("cpu")} and probe.dtypes == {torch.float32}
    # the proximal pull moved the weights towards the anchor (+1 everywhere)
    assert all(
        float((p.detach() - a.float()).abs().mean()) < 1.0
        for p, a in zip(model.parameters(), anchor, strict=True)
    )


def test_simulation_gpu_settings_fall_back_to_the_cpu_and_say_why(tmp_path, caplog) -> None:
    sim = SimulationSpec(num_sites=2, num_gpus=0.25)
    with caplog.at_level(logging.WARNING, logger="fedcl.simulations"):
        local = ray_backend_config(sim)
        no_gpu = ray_backend_config(sim, RayCluster("10.0.0.1:6379", 2, 8.0, 0.0))
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert no_gpu["client_resources"]["num_gpus"] == 0.0
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "simulation.num_gpus = 0.25" in text and cuda_unavailable_reason() in text
    assert "the Ray cluster at 10.0.0.1:6379 has no GPU" in text
    with_gpus = ray_backend_config(sim, RayCluster("10.0.0.1:6379", 2, 8.0, 2.0))
    assert with_gpus["client_resources"]["num_gpus"] == 0.25  # four sites share each GPU
    assert ray_backend_config(SimulationSpec())["client_resources"]["num_gpus"] == 0.0

    from fedcl.config import read_toml

    gpu = ExperimentConfig.model_validate({"simulation": {"num_sites": 2, "num_gpus": 0.5}})
    cpu = ExperimentConfig.model_validate({"simulation": {"num_sites": 2}})
    gpu_sites = write_site_configs(gpu, tmp_path / "gpu")
    cpu_sites = write_site_configs(cpu, tmp_path / "cpu")
    assert {read_toml(p)["device"] for p in gpu_sites} == {"auto"}
    assert {read_toml(p).get("device", "cpu") for p in cpu_sites} == {"cpu"}


def test_gpu_check_says_there_is_no_cuda_here_and_exits_cleanly(capsys, tmp_path) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--output", str(tmp_path / "gpu.json")]) == 0
    said = capsys.readouterr().out
    assert said.startswith("no CUDA here (") and cuda_unavailable_reason() in said
    assert not (tmp_path / "gpu.json").exists()  # nothing measured, nothing written


def test_place_moves_only_what_is_elsewhere() -> None:
    """``place`` is ``Module.to`` without the walk when nothing would move."""
    model = nn.Sequential(nn.Linear(3, 2), nn.GroupNorm(1, 2))
    weight = model[0].weight
    assert place(model, "cpu") is model and model[0].weight is weight
    moved = place(model.double(), torch.device("meta"))  # another device: a real move
    assert moved is model and model[0].weight.device.type == "meta"
