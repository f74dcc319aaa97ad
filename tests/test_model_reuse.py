"""A site reuses a model an earlier message gave back only when it is still a clean copy.

``SiteJob.global_model`` loads the coordinator's weights into a model a previous message
returned with ``SiteJob.reuse`` instead of copying the template every message; these tests
check that the weights are exactly the message's, and that a model something changed (a hook
as DP-SGD adds, gradients left behind) is never handed out again.
"""

from __future__ import annotations

import pytest
import torch
from federation_helpers import small_experiment
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcl.client.job import SiteJob
from fedcl.config import protocol as P
from fedcl.config import to_json
from fedcl.continual.plan import RunPlan
from fedcl.simulations.runner import write_site_configs

pytestmark = pytest.mark.usefixtures("task_identity")


def _job(exp, sites_dir, state: dict[str, torch.Tensor], server_round: int) -> SiteJob:
    config = ConfigRecord(
        {
            P.EXPERIMENT: to_json(exp),
            P.SITES_DIR: str(sites_dir),
            P.RUN_ID: "reuse-test",
            P.TASK_INDEX: 0,
            P.SERVER_ROUND: server_round,
            P.ROUND_IN_TASK: server_round - 1,
        }
    )
    content = RecordDict({P.CONFIG: config, P.ARRAYS: ArrayRecord(state)})
    msg = Message(content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    return SiteJob(msg, context)


def _weights(seed: int, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in like.state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_clean_model_is_reused_with_the_next_message_weights(tmp_path) -> None:
    exp = small_experiment()
    write_site_configs(exp, tmp_path / "sites")
    like = RunPlan.of(exp).build_model()
    w1, w2, w3, w4 = (_weights(s, like) for s in (1, 2, 3, 4))

    job = _job(exp, tmp_path / "sites", w1, 1)
    first = job.global_model()
    assert _same(first, w1)
    with torch.no_grad():  # what training does to it
        for p in first.parameters():
            p.add_(1.0)
    first.eval()
    job.reuse(first)

    job = _job(exp, tmp_path / "sites", w2, 2)
    second = job.global_model()
    assert second is first  # reused ...
    assert _same(second, w2) and second.training  # ... with this message's weights, as a copy

    # DP-SGD (Opacus) registers hooks on the modules: such a model is not handed out again.
    handle = next(m for m in second.modules() if isinstance(m, torch.nn.Linear))
    handle.register_forward_hook(lambda *args: None)
    job.reuse(second)
    job = _job(exp, tmp_path / "sites", w3, 3)
    third = job.global_model()
    assert third is not second and _same(third, w3)
    assert all(not m._forward_hooks for m in third.modules())

    # Gradients left on it: not reused either.
    third(torch.zeros(2, *next(iter(job.data.test_set(0)))[0].shape)).sum().backward()
    job.reuse(third)
    job = _job(exp, tmp_path / "sites", w4, 4)
    fourth = job.global_model()
    assert fourth is not third and _same(fourth, w4)
    assert all(p.grad is None for p in fourth.parameters())
