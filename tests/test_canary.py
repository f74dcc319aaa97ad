"""The canary rule, evaluated by the coordinator when a round's metrics arrive."""

from __future__ import annotations

import torch
from federation_helpers import run_inprocess, small_experiment
from flwr.app import ArrayRecord

from fedcl.client.app import app as client_app
from fedcl.config import protocol as P
from fedcl.server.observers import RunObserver
from fedcl.server.registry import Registry


def test_the_unattended_canary_promotes_and_rolls_back_by_itself(tmp_path) -> None:
    """No person acts: round 1 becomes production (the first evaluated version), each candidate
    that holds on the canary sites is promoted, the zeroed round 4 is rolled back."""
    exp = small_experiment(
        "digits-domain-il", "canary_max_drop=0.1", 'canary_sites=["site-0", "site-1"]'
    )
    url = f"sqlite:///{tmp_path / 'registry.db'}"

    def broken_round_4(node_id, msg, context):
        if msg.metadata.message_type != "train" or msg.content[P.CONFIG][P.SERVER_ROUND] != 4:
            return None
        reply = client_app(msg, context)  # a real update, then corrupted: all weights zero
        state = reply.content[P.ARRAYS].to_torch_state_dict()
        reply.content[P.ARRAYS] = ArrayRecord({k: torch.zeros_like(v) for k, v in state.items()})
        return reply

    run_inprocess(exp, tmp_path, registry_url=url, intercept=broken_round_4)
    with Registry.open(url) as reg:
        versions = {
            v.server_round: v.status
            for v in reg.list_model_versions("test-run")
            if v.kind == "model"
        }
        audit = [a for a in reg.list_audit(run_id="test-run", limit=500) if a.actor == "canary"]
        rows = [m for m in reg.list_metrics("test-run", name="accuracy") if m.site_id is None]
        evaluated = {
            (m.site_id, m.server_round) for m in reg.list_metrics("test-run", name="accuracy")
        }
    # The rolled-back candidate never reached the site outside the canary; the others did.
    assert ("site-2", 4) not in evaluated and ("site-0", 4) in evaluated
    assert {("site-2", r) for r in (1, 2, 3, 5)} <= evaluated
    kinds = [a.kind for a in reversed(audit) if not a.kind.startswith("model_version")]
    assert kinds[0] == "production.first"  # round 1: the first evaluated version
    assert kinds.count("canary.promoted") == 3  # rounds 2, 3 and 5
    assert kinds.count("canary.rolled_back") == 1  # round 4
    assert kinds.count("canary.withheld") == 1  # ... judged at the canary sites alone
    assert all("at canary sites site-0, site-1" in a.message for a in audit if "canary." in a.kind)
    assert versions == {
        1: "archived",
        2: "archived",
        3: "archived",
        4: "rolled_back",
        5: "production",
    }
    mean = {r: sum(m.value for m in rows if m.server_round == r) / 5 for r in range(1, 6)}
    assert mean[4] < 0.55  # the zeroed model is at chance on every task
    assert mean[5] > 0.7, mean  # round 5 started again from production, not from the zeros


def test_a_run_without_canary_has_production_from_its_first_evaluated_round(tmp_path) -> None:
    """The production rule holds without a canary too; a Fisher is never production."""
    exp = small_experiment("digits-domain-il", "continual.method=ewc")
    run_inprocess(exp, tmp_path)
    with Registry.open(f"sqlite:///{tmp_path / 'registry.db'}") as reg:
        versions = reg.list_model_versions("test-run")
    production = [v for v in versions if v.status == "production"]
    assert [(v.kind, v.server_round) for v in production] == [("model", 1)]
    fishers = [v for v in versions if v.kind == "fisher"]
    assert fishers and all(v.format.startswith("fisher-") for v in fishers)
    assert all(v.status == "candidate" for v in fishers)


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

    class CrashAfter4(RunObserver):
        def round_finished(self, summary) -> None:
            if summary.server_round == 4:
                raise Crash("coordinator killed after round 4")

    with pytest.raises(Crash):
        run_inprocess(
            exp,
            tmp_path,
            registry_url=url,
            intercept=broken_round_4,
            observers=[CrashAfter4()],
        )
    with Registry.open(url) as reg:
        assert reg.last_completed_round("test-run").server_round == 4
        versions = {v.server_round: v for v in reg.list_model_versions("test-run")}
        assert versions[4].status == "rolled_back"
        assert versions[3].status == "production"  # promoted by the canary, unattended
        production = decode_model(reg.load_artifact(versions[3])).arrays
        rolled_back = decode_model(reg.load_artifact(versions[4])).arrays
    status, _, _ = run_inprocess(exp, tmp_path, registry_url=url, intercept=broken_round_4)
    assert status == "completed"
    assert sent_round_5 == {state_sha256(production.to_torch_state_dict())}
    assert state_sha256(rolled_back.to_torch_state_dict()) not in sent_round_5
