"""One Flower round trip per round (evaluation.mode), and sampling that every round honours.

In-process federations (LocalGrid) through the real apps: the messages each site receives are
counted, and the accuracy matrix of one round trip per round is compared with the one of a
separate evaluate message after every round.
"""

from __future__ import annotations

from collections import Counter

from federation_helpers import run_inprocess, small_experiment

from fedcl.config import protocol as P
from fedcl.server.registry import Registry
from fedcl.server.results import build_results

TINY = ("data.num_tasks=2", "train.rounds_per_task=2", "simulation.num_sites=2")


def _run(tmp_path, *overrides: str) -> tuple[dict, Counter, list]:
    sent: Counter = Counter()
    asked: list[int] = []

    def count(node_id, msg, context):
        sent[msg.metadata.message_type] += 1
        cfg = msg.content[P.CONFIG]
        if msg.metadata.message_type == "train" and P.EVALUATE_ROUND in cfg:
            asked.append(int(cfg[P.EVALUATE_ROUND]))
        return None

    exp = small_experiment("digits-domain-il", *TINY, *overrides)
    status, opts, _ = run_inprocess(exp, tmp_path, intercept=count)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        return build_results(reg, opts.run_id), sent, asked


def test_one_round_trip_per_round_keeps_the_accuracy_matrix(tmp_path) -> None:
    one, sent_one, asked = _run(tmp_path / "with-train")
    two, sent_two, _ = _run(tmp_path / "separate", 'evaluation.mode="separate"')
    # 4 rounds x 2 sites: with_train sends the train messages and one evaluate at the end;
    # separate adds an evaluate after every round and one for the untrained baseline.
    assert sent_one == {"train": 8, "evaluate": 2}
    assert sent_two == {"train": 8, "evaluate": 10}
    # Each train message evaluates the model it carries: the previous round's (0: untrained).
    assert sorted(asked) == [0, 0, 1, 1, 2, 2, 3, 3]
    # The same models scored on the same sites' test sets: the same matrix, to the bit.
    assert one["accuracy_matrix"] == two["accuracy_matrix"]
    assert one["fwt"] == two["fwt"] and one["bwt"] == two["bwt"]
    assert all(v is not None for row in one["accuracy_matrix"] for v in row)


def test_sampling_holds_in_consolidation_rounds(tmp_path) -> None:
    exp = small_experiment(
        "digits-domain-il",
        "data.num_tasks=2",
        "simulation.num_sites=4",
        "strategy.fraction_train=0.5",
        'continual.method="ewc"',
    )
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        rounds = reg.list_rounds(opts.run_id)
        parts = reg.list_participations(opts.run_id)
    assert [r.kind for r in rounds] == ["train", "consolidate", "train"]
    for r in rounds:
        phase = "consolidate" if r.kind == "consolidate" else "train"
        sites = {p.site_id for p in parts if p.server_round == r.server_round and p.phase == phase}
        assert len(sites) == 2 and r.num_participants == 2, (r.kind, sites)
