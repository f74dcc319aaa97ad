"""The canary rule, evaluated by the coordinator when a round's metrics arrive."""

from __future__ import annotations

import torch
from federation_helpers import run_inprocess, small_experiment
from flwr.app import ArrayRecord

from fedcl.client.app import app as client_app
from fedcl.config import protocol as P
from fedcl.server.observers import RunObserver
from fedcl.server.registry import Registry


def test_a_bad_candidate_is_rolled_back_against_production(tmp_path) -> None:
    exp = small_experiment("digits-domain-il", "canary_max_drop=0.1")
    url = f"sqlite:///{tmp_path / 'registry.db'}"

    def broken_round_4(node_id, msg, context):
        if msg.metadata.message_type != "train" or msg.content[P.CONFIG][P.SERVER_ROUND] != 4:
            return None
        reply = client_app(msg, context)  # a real update, then corrupted: all weights zero
        state = reply.content[P.ARRAYS].to_torch_state_dict()
        reply.content[P.ARRAYS] = ArrayRecord({k: torch.zeros_like(v) for k, v in state.items()})
        return reply

    class PromoteRound2(RunObserver):
        def round_finished(self, summary) -> None:
            if summary.server_round == 2:
                with Registry.open(url) as reg:
                    v = reg.latest_model_version("test-run")
                    reg.set_version_status(v.id, "production", actor="alice")

    run_inprocess(
        exp, tmp_path, registry_url=url, intercept=broken_round_4, observers=[PromoteRound2()]
    )
    with Registry.open(url) as reg:
        versions = {v.server_round: v.status for v in reg.list_model_versions("test-run")}
        audit = [a for a in reg.list_audit(run_id="test-run") if "canary" in a.actor]
    assert versions[2] == "production"
    assert versions[4] == "rolled_back"  # zeros: accuracy fell to chance
    assert versions[3] == "candidate"  # a healthy round stays a candidate
    assert audit and any("rolled" in a.message for a in audit)
    with Registry.open(url) as reg:
        rows = [m for m in reg.list_metrics("test-run", name="accuracy") if m.site_id is None]
    mean = {r: sum(m.value for m in rows if m.server_round == r) / 5 for r in range(1, 6)}
    assert mean[4] < 0.55  # the zeroed model is at chance on every task
    assert mean[5] > 0.7, mean  # round 5 started again from production, not from the zeros


def test_a_restart_after_a_rollback_resumes_from_production(tmp_path) -> None:
    """The round after a rollback starts from production, also when the coordinator restarted."""
    import pytest

    from fedcl.models import state_sha256
    from fedcl.server.versions import decode_model

    exp = small_experiment("digits-domain-il", "canary_max_drop=0.1")
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    sent_round_5: set[str] = set()

    def broken_round_4(node_id, msg, context):
        if msg.metadata.message_type != "train":
            return None
        server_round = msg.content[P.CONFIG][P.SERVER_ROUND]
        if server_round == 5:
            sent_round_5.add(state_sha256(msg.content[P.ARRAYS].to_torch_state_dict()))
        if server_round != 4:
            return None
        reply = client_app(msg, context)
        state = reply.content[P.ARRAYS].to_torch_state_dict()
        reply.content[P.ARRAYS] = ArrayRecord({k: torch.zeros_like(v) for k, v in state.items()})
        return reply

    class Crash(Exception):
        pass

    class PromoteRound2ThenCrashAfter4(RunObserver):
        def round_finished(self, summary) -> None:
            if summary.server_round == 2:
                with Registry.open(url) as reg:
                    v = reg.latest_model_version("test-run")
                    reg.set_version_status(v.id, "production", actor="alice")
            if summary.server_round == 4:
                raise Crash("coordinator killed after round 4")

    with pytest.raises(Crash):
        run_inprocess(
            exp,
            tmp_path,
            registry_url=url,
            intercept=broken_round_4,
            observers=[PromoteRound2ThenCrashAfter4()],
        )
    with Registry.open(url) as reg:
        assert reg.last_completed_round("test-run").server_round == 4
        versions = {v.server_round: v for v in reg.list_model_versions("test-run")}
        assert versions[4].status == "rolled_back"
        production = decode_model(reg.load_artifact(versions[2])).arrays
        rolled_back = decode_model(reg.load_artifact(versions[4])).arrays
    status, _, _ = run_inprocess(exp, tmp_path, registry_url=url, intercept=broken_round_4)
    assert status == "completed"
    assert sent_round_5 == {state_sha256(production.to_torch_state_dict())}
    assert state_sha256(rolled_back.to_torch_state_dict()) not in sent_round_5
