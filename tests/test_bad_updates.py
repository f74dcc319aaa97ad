"""A bad update never breaks a round: each fault, injected on demand, costs only its own site.

Faults come from ``[[simulation.faults]]`` (``fedcl.simulations.faults``), through the real
ServerApp and ClientApp on the in-process grid; ``test_simulate_ray.py`` runs them on Ray. Each
test checks that the round completes with the other sites, that the culprit is named in the
registry and the audit log, and that the new global model is finite and equal (within float
error) to the example-weighted average of the honest sites' replies.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import small_experiment
from flwr.app import Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.config import ExperimentConfig
from fedcl.config import protocol as P
from fedcl.server.coordinator import Coordinator, CoordinatorOptions
from fedcl.server.registry import Registry
from fedcl.server.versions import decode_model
from fedcl.simulations.faults import FaultyGrid, faulty_client_app
from fedcl.simulations.local_grid import LocalGrid
from fedcl.simulations.runner import write_site_configs


class RecordingGrid:
    """Keeps every train round's replies as the coordinator received them."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.replies: dict[int, list[Message]] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        out = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            self.replies[int(messages[0].content[P.CONFIG][P.SERVER_ROUND])] = out
        return out


def with_faults(exp: ExperimentConfig, faults: list[dict], **sections) -> ExperimentConfig:
    data = exp.model_dump(mode="json")
    data["simulation"]["faults"] = faults
    for section, values in sections.items():
        data[section].update(values)
    return ExperimentConfig.model_validate(data)


def run(exp: ExperimentConfig, tmp_path: Path) -> tuple[str, CoordinatorOptions, RecordingGrid]:
    sites_dir = tmp_path / "sites"
    write_site_configs(exp, sites_dir)
    options = CoordinatorOptions(
        experiment=exp,
        registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
        run_id="faults",
        scenario="test",
        sites_dir=str(sites_dir),
        artifacts_dir=str(tmp_path / "artifacts"),
    )
    faults = exp.simulation.faults
    local = LocalGrid(faulty_client_app(faults), exp.simulation.num_sites)
    grid = RecordingGrid(FaultyGrid(local, faults))
    return Coordinator(grid, options).run(), options, grid


def site_of(msg: Message) -> str:
    return str(msg.content[P.SITE][P.SITE_ID])


def honest_average(replies: list[Message], culprit: str):
    """Example-weighted FedAvg of the first reply of every site but ``culprit``."""
    seen, contents = set(), []
    for msg in replies:
        if msg.has_error() or site_of(msg) == culprit or site_of(msg) in seen:
            continue
        seen.add(site_of(msg))
        contents.append(msg.content)
    return aggregate_arrayrecords(contents, P.NUM_EXAMPLES).to_torch_state_dict()


def model_of_round(url: str, server_round: int) -> dict[str, torch.Tensor]:
    with Registry.open(url) as reg:
        versions = reg.list_model_versions("faults")
        version = next(v for v in versions if v.server_round == server_round)
        return decode_model(reg.load_artifact(version)).arrays.to_torch_state_dict()


def participation(url: str, server_round: int, site: str, phase: str = "train"):
    with Registry.open(url) as reg:
        parts = reg.list_participations("faults", site_id=site)
    return [p for p in parts if p.server_round == server_round and p.phase == phase]


def audit(url: str, kind: str) -> list:
    with Registry.open(url) as reg:
        return [a for a in reg.list_audit(run_id="faults") if a.kind == kind]


def assert_is_honest_average(url: str, grid: RecordingGrid, server_round: int, culprit: str):
    model = model_of_round(url, server_round)
    expected = honest_average(grid.replies[server_round], culprit)
    assert all(torch.isfinite(t).all() for t in model.values())
    for name, t in expected.items():
        torch.testing.assert_close(model[name], t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kind", "extra", "reason"),
    [
        ("nan", {}, "non-finite"),
        ("bitflip", {"max_update_norm": 50.0}, "update norm"),
        ("stale", {}, "stale"),
    ],
)
def test_a_bad_plaintext_reply_is_rejected_named_and_the_round_goes_on(
    tmp_path, kind, extra, reason
) -> None:
    exp = with_faults(small_experiment(), [{"site": 1, "round": 2, "kind": kind}], strategy=extra)
    status, opts, grid = run(exp, tmp_path)
    assert status == "completed"
    url = opts.registry_url
    (part,) = participation(url, 2, "site-1")
    assert part.status == "rejected" and reason in part.detail
    rejected = audit(url, "update.rejected")
    assert [a.site_id for a in rejected] == ["site-1"] and reason in rejected[0].message
    with Registry.open(url) as reg:
        rounds = reg.list_rounds("faults")
    assert all(r.status == "completed" for r in rounds)
    assert rounds[1].num_participants == 2
    assert_is_honest_average(url, grid, 2, culprit="site-1")


def test_a_duplicate_reply_counts_once_and_the_site_keeps_its_status(tmp_path) -> None:
    exp = with_faults(small_experiment(), [{"site": 0, "round": 2, "kind": "duplicate"}])
    status, opts, grid = run(exp, tmp_path)
    assert status == "completed"
    assert sum(site_of(m) == "site-0" for m in grid.replies[2]) == 2  # it did arrive twice
    (part,) = participation(opts.registry_url, 2, "site-0")
    assert part.status == "ok"
    (dup,) = audit(opts.registry_url, "update.duplicate")
    assert dup.site_id == "site-0"
    assert_is_honest_average(opts.registry_url, grid, 2, culprit="nobody")


def test_a_site_that_crashes_fails_alone(tmp_path) -> None:
    exp = with_faults(small_experiment(), [{"site": 2, "round": 3, "kind": "crash"}])
    status, opts, grid = run(exp, tmp_path)
    assert status == "completed"
    (part,) = participation(opts.registry_url, 3, "site-2")
    assert part.status == "failed" and "injected crash" in part.detail
    assert_is_honest_average(opts.registry_url, grid, 3, culprit="site-2")


def test_a_disconnected_site_costs_at_most_the_deadline_and_catches_up(tmp_path) -> None:
    exp = with_faults(
        small_experiment(),
        [{"site": 1, "round": 2, "kind": "disconnect", "rounds": 2}],
        train={"site_wait_s": 1.0, "quorum": 2},
    )
    start = time.monotonic()
    status, opts, grid = run(exp, tmp_path)
    assert status == "completed"
    assert time.monotonic() - start < 60  # two rounds waited 1 s each, not forever
    for server_round in (2, 3):
        (part,) = participation(opts.registry_url, server_round, "site-1")
        assert part.status == "failed" and "not connected" in part.detail
        assert_is_honest_average(opts.registry_url, grid, server_round, culprit="site-1")
    (back,) = participation(opts.registry_url, 4, "site-1")
    assert back.status == "ok"  # it came back and trained from the current global model
    with Registry.open(opts.registry_url) as reg:
        assert [r.num_participants for r in reg.list_rounds("faults")] == [3, 2, 2, 3, 3]


def test_too_few_sites_after_the_deadline_stops_the_run_with_the_reason(tmp_path) -> None:
    exp = with_faults(
        small_experiment(),
        [{"site": 1, "round": 2, "kind": "disconnect"}],
        train={"site_wait_s": 0.5},  # quorum: every expected site
    )
    status, opts, _ = run(exp, tmp_path)
    assert status == "failed"
    with Registry.open(opts.registry_url) as reg:
        run_info = reg.get_run("faults")
        rounds = reg.list_rounds("faults")
    assert "2 of 3 sites connected" in run_info.reason
    assert "train.quorum = 3" in run_info.reason
    assert rounds[-1].status == "failed"


def test_a_reply_is_the_site_of_its_node_not_what_it_claims(tmp_path) -> None:
    """Node of site-2 claims to be site-0 in round 2: rejected, and site-0's record is intact."""
    from federation_helpers import run_inprocess

    from fedcl.client.app import app as client_app

    def impersonate(node_id, msg, context):
        if node_id != 1002 or msg.content[P.CONFIG][P.SERVER_ROUND] != 2:
            return None
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train":
            reply.content[P.SITE][P.SITE_ID] = "site-0"
        return reply

    exp = small_experiment()
    status, opts, _ = run_inprocess(exp, tmp_path, intercept=impersonate, run_id="faults")
    assert status == "completed"
    (mine,) = participation(opts.registry_url, 2, "site-0")
    assert mine.status == "ok"
    (theirs,) = participation(opts.registry_url, 2, "site-2")
    assert theirs.status == "rejected" and "claims to be site site-0" in theirs.detail


def test_an_error_the_superlink_makes_up_for_a_lost_node_names_that_site(tmp_path) -> None:
    """Flower's "Node Unavailable" reply comes from node 1 (the SuperLink): it is site-2's."""
    from federation_helpers import run_inprocess
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message as superlink_error,
    )

    def lose(node_id, msg, context):
        if node_id != 1002 or msg.content[P.CONFIG][P.SERVER_ROUND] != 2:
            return None
        return superlink_error(msg.metadata, "node_unavail")  # what the SuperLink sends

    status, opts, _ = run_inprocess(small_experiment(), tmp_path, intercept=lose, run_id="faults")
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        parts = reg.list_participations("faults")
    assert {p.site_id for p in parts} == {"site-0", "site-1", "site-2"}  # no "node-1"
    # Round 2's train message was lost, and with it the evaluation of round 1's model it
    # carried (evaluation.mode = "with_train"): both failed, both named as site-2's.
    lost = [
        p
        for p in parts
        if p.site_id == "site-2" and (p.server_round, p.phase) in ((2, "train"), (1, "evaluate"))
    ]
    assert sorted(p.status for p in lost) == ["failed", "failed"]
    assert all("Node Unavailable" in p.detail for p in lost), [p.detail for p in lost]


def test_a_site_that_disagrees_on_the_model_is_flagged_and_not_averaged(tmp_path) -> None:
    """Hash consensus through the coordinator: site-1 trains from another model in round 3."""
    from federation_helpers import run_inprocess

    from fedcl.client.app import app as client_app

    def other_model(node_id, msg, context):
        if node_id != 1001 or msg.metadata.message_type != "train":
            return None
        if msg.content[P.CONFIG][P.SERVER_ROUND] != 3:
            return None
        state = msg.content[P.ARRAYS].to_torch_state_dict()
        from flwr.app import ArrayRecord, RecordDict

        # A copy: the grid sends every site the same RecordDict, the others must not see this.
        content = RecordDict(dict(msg.content.items()))
        content[P.ARRAYS] = ArrayRecord({k: v + 0.01 for k, v in state.items()})
        msg.content = content
        return client_app(msg, context)

    status, opts, _ = run_inprocess(
        small_experiment(), tmp_path, intercept=other_model, run_id="faults"
    )
    assert status == "completed"
    (part,) = participation(opts.registry_url, 3, "site-1")
    assert part.status == "rejected" and "trained from model" in part.detail
    mismatch = audit(opts.registry_url, "model_hash.mismatch")
    assert [a.site_id for a in mismatch] == ["site-1"]
    with Registry.open(opts.registry_url) as reg:
        agreement = [
            m.value
            for m in reg.list_metrics("faults", name=f"{P.MODEL_SHA256}-agreement")
            if m.server_round == 3
        ]
    assert agreement == [0.0]


# --- encrypted aggregation ---------------------------------------------------------------------
def decrypted_round(url: str, server_round: int, keys: Path, exp: ExperimentConfig):
    """The round's encrypted model as the sites see it: (mean weights, contributors)."""
    from fedcl.continual.plan import RunPlan
    from fedcl.privacy.ckks import packing_for
    from fedcl.privacy.ckks.keys import load_secret_context
    from fedcl.privacy.ckks.layout import Layout
    from fedcl.privacy.ckks.wire import decode_aggregate_full

    with Registry.open(url) as reg:
        versions = reg.list_model_versions("faults")
        version = next(v for v in versions if v.server_round == server_round)
        model = decode_model(reg.load_artifact(version))
    like = RunPlan.of(exp).build_model().state_dict()
    decoded = decode_aggregate_full(
        model.arrays,
        model.meta,
        load_secret_context(keys / "secret.ctx"),
        layout=Layout.from_state_dict(like),
        packing=packing_for(exp.he),
    )
    return decoded.mean, decoded.contributors


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("nan", "rejected", "not raw CKKS data"),
        ("stale", "rejected", "stale"),
        ("duplicate", "ok", None),
        ("bitflip", "rejected", "corrupts the encrypted aggregate"),
    ],
)
def test_encrypted_faults_cost_only_their_site(tmp_path, kind, status, reason) -> None:
    from fedcl.simulations.runner import prepare_keys

    exp = with_faults(
        small_experiment("digits-domain-il", "he.enabled=true"),
        [{"site": 1, "round": 2, "kind": kind}],
    )
    exp = prepare_keys(exp, tmp_path)
    result, opts, grid = run(exp, tmp_path)
    assert result == "completed"
    url = opts.registry_url
    (part,) = participation(url, 2, "site-1")
    assert part.status == status
    if reason is not None:
        assert reason in part.detail
        assert [a.site_id for a in audit(url, "update.rejected")] == ["site-1"]
    else:
        assert [a.site_id for a in audit(url, "update.duplicate")] == ["site-1"]
    mean, contributors = decrypted_round(url, 2, tmp_path / "keys", exp)
    assert contributors == (3 if kind == "duplicate" else 2)  # a duplicate is summed once
    assert all(np.isfinite(np.asarray(v)).all() for v in mean.values())
    with Registry.open(url) as reg:
        rounds = reg.list_rounds("faults")
    assert all(r.status == "completed" for r in rounds)
    # The round after the fault starts from a model every site can decrypt: all three train.
    assert [p.status for p in participation(url, 3, "site-1")] == ["ok"]


def test_an_enrolled_node_is_its_registered_site_from_the_first_round(tmp_path) -> None:
    """With SuperNode auth the coordinator knows which node each enrolled key is (site-nodes)."""
    import json

    from fedcl.server.app import options_from_run_config

    exp = small_experiment()
    opts = options_from_run_config(
        {
            "experiment": json.dumps(exp.model_dump(mode="json")),
            "run-id": "faults",
            "site-nodes": json.dumps({"site-0": 1000, "site-1": 1001, "hospital-x": 1002}),
        }
    )
    assert opts.site_nodes == {"site-0": 1000, "site-1": 1001, "hospital-x": 1002}
    sites_dir = tmp_path / "sites"
    write_site_configs(exp, sites_dir)
    opts.registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    opts.sites_dir = str(sites_dir)
    from fedcl.client.app import app as client_app

    status = Coordinator(LocalGrid(client_app, 3), opts).run()
    assert status == "completed"
    # Node 1002 was enrolled as hospital-x; its site.toml says site-2: every reply is refused.
    parts = participation(opts.registry_url, 1, "hospital-x")
    assert parts and parts[0].status == "rejected" and "claims to be site site-2" in parts[0].detail
    assert participation(opts.registry_url, 1, "site-2") == []
