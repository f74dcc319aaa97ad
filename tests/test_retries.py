"""Idempotent retries: a round asked again is answered again, identically, and paid for once."""

from __future__ import annotations

import pytest
from federation_helpers import run_inprocess, small_experiment
from flwr.app import Message

from fedcl.client.app import app as client_app
from fedcl.config import protocol as P
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.server.registry import Registry

DP = ("dp.epsilon=8", "data.num_tasks=2", "train.rounds_per_task=2")


class CoordinatorDied(BaseException):
    """Not an Exception: the in-process grid must not turn it into an error reply."""


def ledgers(tmp_path) -> dict[str, list]:
    return {
        f"site-{i}": PrivacyLedger(tmp_path / "sites" / f"site-{i}").entries() for i in range(3)
    }


def test_a_repeated_question_gets_the_same_answer_and_costs_nothing(tmp_path) -> None:
    seen: dict[int, list[Message]] = {}

    def ask_twice(node_id, msg, context):
        if node_id != 1000 or msg.metadata.message_type != "train":
            return None
        first = client_app(msg, context)
        again = client_app(msg, context)  # the network (or a restarted coordinator) retries
        seen.setdefault(int(msg.content[P.CONFIG][P.SERVER_ROUND]), []).extend([first, again])
        return again

    status, _, _ = run_inprocess(
        small_experiment("digits-domain-il", *DP), tmp_path, intercept=ask_twice
    )
    assert status == "completed"
    for first, again in seen.values():
        a = first.content[P.ARRAYS].to_torch_state_dict()
        b = again.content[P.ARRAYS].to_torch_state_dict()
        assert all(bool((a[k] == b[k]).all()) for k in a)  # no new noise
        assert dict(first.content[P.METRICS]) == dict(again.content[P.METRICS])
    entries = ledgers(tmp_path)["site-0"]
    training = [e.server_round for e in entries if e.mechanism == "dp-sgd"]
    assert training == [1, 2, 3, 4]  # one charge per round, not two
    # A noised evaluation asked again re-sends its counts (same noise) and is paid once too.
    # (They travel in train messages: the untrained model's in round 1's, task 0's last model's
    # in round 3's, the last model's in the final evaluate message, round 4.)
    evaluations = [e.server_round for e in entries if e.mechanism == "dp-evaluation"]
    assert evaluations == [1, 3, 4]


@pytest.mark.parametrize("where", ["after-reply", "before-reply"])
def test_a_resumed_round_is_charged_once(tmp_path, where, monkeypatch) -> None:
    """The coordinator dies in round 3; resumed, every site's ε equals an uninterrupted run's."""
    exp = small_experiment("digits-domain-il", *DP)
    status, _, _ = run_inprocess(exp, tmp_path / "whole")
    assert status == "completed"
    reference = {site: [e.release for e in es] for site, es in ledgers(tmp_path / "whole").items()}

    from fedcl.client import codec

    real_encode = codec.PlainCodec.encode_update
    state = {"died": False}

    def die_before_reply(self, state_dict, num_examples, base, server_round):
        if server_round == 3 and not state["died"]:
            state["died"] = True  # paid for round 3, then the site process dies
            raise CoordinatorDied("site died between paying and replying")
        return real_encode(self, state_dict, num_examples, base, server_round)

    def die_after_reply(node_id, msg, context):
        if msg.metadata.message_type != "train" or state["died"]:
            return None
        if msg.content[P.CONFIG][P.SERVER_ROUND] == 3 and node_id == 1002:
            client_app(msg, context)  # the reply was produced (and kept) ...
            state["died"] = True
            raise CoordinatorDied("... but the coordinator died before it arrived")
        return None

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    if where == "before-reply":
        monkeypatch.setattr(codec.PlainCodec, "encode_update", die_before_reply)
        intercept = None
    else:
        intercept = die_after_reply
    with pytest.raises(CoordinatorDied):
        run_inprocess(exp, tmp_path, registry_url=url, intercept=intercept)
    status, _, _ = run_inprocess(exp, tmp_path, registry_url=url)  # resumes after round 2
    assert status == "completed"
    with Registry.open(url) as reg:
        rounds = [r.server_round for r in reg.list_rounds("test-run")]
    assert rounds == [1, 2, 3, 4]
    resumed = {site: [e.release for e in es] for site, es in ledgers(tmp_path).items()}
    assert resumed == reference  # the same releases, each once
    for site, es in ledgers(tmp_path).items():
        whole = PrivacyLedger(tmp_path / "whole" / "sites" / site)
        assert PrivacyLedger(tmp_path / "sites" / site).epsilon(1e-5) == pytest.approx(
            whole.epsilon(1e-5), rel=1e-12
        ), (site, es)
