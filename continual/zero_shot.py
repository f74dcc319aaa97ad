"""Zero-shot and retrieval figures of a vision-language run (docs/DESIGN.md §11).

The accuracy matrix of a stream with held-out classes has one more column than tasks: the
zero-shot column (``Stream.zero_shot``), accuracy on classes no site trained on, with every class
prompt competing. From the matrix's last row this module reads *seen* (mean over the trained
tasks' columns), *unseen* (the zero-shot column) and their harmonic mean, the generalised
zero-shot figure of Xian et al. (2017) that FedTPG and CoOp report; ACC, BWT and FWT are over the
trained columns only, so the zero-shot column does not blur the forgetting figures.

:func:`retrieval_r1` is image→text retrieval over a caption gallery (every template of every
class): a hit when an image's nearest caption describes its class. It needs the plaintext model
and the test images together, so it runs where both are (a benchmark, a site's own evaluation),
not on the coordinator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .metrics import Matrix, summarize


def harmonic_mean(seen: float | None, unseen: float | None) -> float | None:
    """``2su / (s + u)``; 0 when both are 0, None when either is unknown."""
    if seen is None or unseen is None:
        return None
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def zero_shot_summary(
    matrix: Matrix, baseline: Sequence[float | None] | None, *, has_zero_shot: bool
) -> dict[str, Any]:
    """ACC/BWT/FWT over the trained columns, and (with a zero-shot column) seen/unseen/H."""
    if not has_zero_shot:
        return summarize(matrix, baseline)
    trained = [list(row[:-1]) for row in matrix]
    out = summarize(trained, None if baseline is None else list(baseline[:-1]))
    last = matrix[-1] if matrix else []
    unseen = last[-1] if last else None
    seen = out["avg_accuracy"]
    per_row = [
        {"seen": summarize([r[:-1]])["avg_accuracy"], "unseen": r[-1]} for r in matrix
    ]  # after each task
    out["zero_shot"] = {
        "seen": seen,
        "unseen": unseen,
        "harmonic": harmonic_mean(seen, unseen),
        "after_each_task": per_row,
    }
    return out


def upload_bytes_per_site(rounds: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Bytes one site uploads per training round (``results.json`` rounds: up / participants)."""
    values = [
        r["bytes_up"] / r["participants"]
        for r in rounds
        if r.get("kind") == "train" and r.get("participants") and r.get("bytes_up")
    ]
    if not values:
        return {"mean": None, "max": None}
    return {"mean": sum(values) / len(values), "max": max(values)}


def retrieval_r1(
    model: Any, images: Any, labels: Any, gallery: Sequence[tuple[str, int]], batch: int = 256
) -> float:
    """Image→text R@1: the share of images whose nearest gallery caption is of their class."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            texts = model.caption_embeddings([c for c, _ in gallery])
            classes = torch.tensor([k for _, k in gallery])
            hits = 0
            for start in range(0, len(labels), batch):
                emb = model.image_embeddings(images[start : start + batch])
                best = (emb @ texts.T).argmax(dim=1)
                hits += int((classes[best] == labels[start : start + batch]).sum())
    finally:
        model.train(was_training)
    return hits / max(len(labels), 1)
