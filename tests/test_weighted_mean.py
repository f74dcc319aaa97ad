"""The coordinator's average of plaintext updates is Flower's FedAvg arithmetic, byte for byte.

``strategies.sites.weighted_mean`` averages the weights ``check_update`` already read instead of
deserialising every reply again; it must give exactly ``aggregate_arrayrecords``' bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.config import protocol as P
from fedcl.strategies.sites import weighted_mean


def _reply(rng: np.random.Generator, n: int, extra: bool = False) -> RecordDict:
    arrays = {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }
    records = {
        P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 0.5}),
        P.EVALUATION: MetricRecord({P.NUM_EXAMPLES: 999}),  # not the weight: the first one is
    }
    if extra:
        records["other"] = ArrayRecord({"z": Array(np.ones(3, dtype=np.float32))})
    return RecordDict(records)


def _bytes(record: ArrayRecord) -> dict[str, bytes]:
    return {k: v.data for k, v in record.items()}


def test_weighted_mean_is_flowers_average_byte_for_byte() -> None:
    rng = np.random.default_rng(0)
    replies = [_reply(rng, n) for n in (7, 130, 33, 1, 58)]
    decoded = [{k: v.numpy() for k, v in r[P.ARRAYS].items()} for r in replies]
    flower = aggregate_arrayrecords(replies, P.NUM_EXAMPLES)
    ours, state = weighted_mean(replies, decoded)
    assert _bytes(ours) == _bytes(flower)
    assert list(ours) == ["w", "b"]
    # The tensors handed over with it are the record's weights, exactly (GlobalModel.state).
    assert state is not None
    for key, tensor in ours.to_torch_state_dict().items():
        assert torch.equal(state[key], tensor) and state[key].dtype == tensor.dtype
    # Weighting by the evaluation's count instead would differ: the weights matter.
    plain, _ = weighted_mean(replies, [{k: v * 1.0 for k, v in d.items()} for d in decoded])
    assert _bytes(plain) == _bytes(flower)
    unweighted = np.mean([d["w"] for d in decoded], axis=0)
    assert not np.allclose(ours["w"].numpy(), unweighted)


def test_weighted_mean_leaves_other_layouts_to_flower() -> None:
    rng = np.random.default_rng(1)
    replies = [_reply(rng, 5, extra=True), _reply(rng, 9, extra=True)]
    decoded = [{k: v.numpy() for k, v in r[P.ARRAYS].items()} for r in replies]
    ours, state = weighted_mean(replies, decoded)
    assert state is None  # Flower's function computed it: nothing to hand over
    assert _bytes(ours) == _bytes(aggregate_arrayrecords(replies, P.NUM_EXAMPLES))
    assert "z" in ours  # Flower averages every array record of a reply
    assert _bytes(weighted_mean(replies[:1], [None])[0]) == _bytes(
        aggregate_arrayrecords(replies[:1], P.NUM_EXAMPLES)
    )


def test_a_model_built_from_its_average_reads_and_hashes_like_one_read_from_bytes() -> None:
    from fedcl.strategies.contract import GlobalModel

    rng = np.random.default_rng(2)
    replies = [_reply(rng, n) for n in (4, 11)]
    decoded = [{k: v.numpy() for k, v in r[P.ARRAYS].items()} for r in replies]
    arrays, state = weighted_mean(replies, decoded)
    handed = GlobalModel.of_state(arrays, state)
    fresh = GlobalModel(ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()}))
    assert handed.state() is state  # no second deserialisation
    assert fresh.state() is fresh.state()  # read once, then the same tensors
    assert handed.digest() == fresh.digest() is not None
