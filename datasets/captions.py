"""Captioned built-in datasets for the vision-language models (docs/DESIGN.md §11).

A captioned dataset's classes are *compositions* of attributes (defect × material × lighting,
digit × rendering), and a class's name is its canonical caption ("a jagged crack on brushed
steel under dim light"), the prompt a dual encoder reads. Further caption templates phrase the
same composition differently; they are what image→text retrieval ranks.

Some compositions are **held out**: no site trains on them, so accuracy on them is zero-shot.
The held-out set rotates through the attributes so that every attribute value is seen in some
other composition (otherwise a word the text tower never trained on would carry no meaning): in
the defects, domain ``d`` (material × lighting) holds out defect class ``d mod 4``; in the
digits, rendering ``r`` holds out the digits ``d`` with ``d mod R = r``.

Everything is generated offline from the existing generators (``builtin.make_defects``,
``builtin.digits_domains``); only the labels, names and held-out set are new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .builtin import DEFECT_CLASSES, digits_domains, make_defects
from .dataset import DataError, LabeledImages

CAPTIONED_DATASETS: tuple[str, ...] = ("captioned-defects", "captioned-digits")

DEFECT_PHRASES: dict[str, str] = {
    "none": "no defect",
    "scratch": "a fine scratch",
    "spot": "a round spot",
    "crack": "a jagged crack",
}
MATERIAL_PHRASES: dict[str, str] = {
    "steel": "brushed steel",
    "wood": "grained wood",
    "concrete": "rough concrete",
    "fabric": "woven fabric",
}
LIGHTING_PHRASES: dict[str, str] = {"bright": "bright light", "dim": "dim light"}
DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
RENDERING_PHRASES: dict[str, str] = {
    "original": "clear ink",
    "dim": "dim light",
    "low-contrast": "low contrast",
}

#: Template 0 is the canonical caption (the class name, the prompt the model trains on).
DEFECT_TEMPLATES: tuple[str, ...] = (
    "{defect} on {material} under {light}",
    "a photo of {material} with {defect} under {light}",
    "{material} in {light} showing {defect}",
    "close up of {defect} on {material} , {light}",
)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "the digit {digit} in {style}",
    "a handwritten {digit} , {style}",
    "a scan of the number {digit} in {style}",
)


@dataclass(frozen=True)
class CaptionSet:
    """The compositions of a captioned dataset and every way its templates phrase them."""

    parts: tuple[dict[str, str], ...]  # one dict of template fields per class
    templates: tuple[str, ...]

    def caption(self, class_index: int, template: int = 0) -> str:
        """Class ``class_index`` phrased by template ``template`` (0: its name)."""
        return self.templates[template].format(**self.parts[class_index])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.caption(c) for c in range(len(self.parts)))

    def all_captions(self) -> list[tuple[str, int]]:
        """(caption, class) for every template and class: the retrieval gallery."""
        return [
            (self.caption(c, t), c)
            for t in range(len(self.templates))
            for c in range(len(self.parts))
        ]

    def example_captions(self, y: np.ndarray) -> list[str]:
        """One caption per example, the template chosen by its position (deterministic)."""
        return [self.caption(int(c), i % len(self.templates)) for i, c in enumerate(y)]


def defect_captions(materials: Sequence[str], lightings: Sequence[str]) -> CaptionSet:
    """Compositions in ``make_defects``' order: domain (material, lighting) major, class minor."""
    parts = tuple(
        {
            "defect": DEFECT_PHRASES[c],
            "material": MATERIAL_PHRASES[m],
            "light": LIGHTING_PHRASES[light],
        }
        for m in materials
        for light in lightings
        for c in DEFECT_CLASSES
    )
    return CaptionSet(parts, DEFECT_TEMPLATES)


def digit_captions(renderings: Sequence[str]) -> CaptionSet:
    """Compositions rendering-major, digit minor (``digits_domains``' order)."""
    parts = tuple(
        {"digit": DIGIT_WORDS[d], "style": RENDERING_PHRASES[r]}
        for r in renderings
        for d in range(10)
    )
    return CaptionSet(parts, DIGIT_TEMPLATES)


def _zero_shot_flag(options: dict[str, Any], name: str) -> bool:
    value = options.pop("zero_shot", True)
    if not isinstance(value, bool):
        raise DataError(f"{name} option zero_shot must be true or false; got {value!r}")
    return value


def load_captioned(name: str, *, seed: int = 0, **options: Any) -> LabeledImages:
    """``captioned-defects`` or ``captioned-digits``: labels are compositions, some held out.

    Options are those of the underlying generator (``defects``: n_per_class_per_domain,
    image_size, channels, materials, lightings; ``digits``: domains, default original + dim)
    plus ``zero_shot`` (default true: hold compositions out of training).
    """
    options = dict(options)
    zero_shot = _zero_shot_flag(options, name)
    if name == "captioned-defects":
        base = make_defects(seed=seed, **_defects_options(options))
        materials = sorted({d.split("/")[0] for d in base.domain_names}, key=_material_order)
        lightings = sorted({d.split("/")[1] for d in base.domain_names}, key=_lighting_order)
        captions = defect_captions(materials, lightings)
        per_domain = len(DEFECT_CLASSES)
        y = base.domain * per_domain + base.y
        held = [d * per_domain + d % per_domain for d in range(len(base.domain_names))]
    elif name == "captioned-digits":
        unknown = sorted(set(options) - {"domains"})
        if unknown:
            raise DataError(
                f"{name} takes only the options domains and zero_shot; got {unknown}. "
                "Remove them from data.options."
            )
        renderings = options.get("domains", ["original", "dim"])
        base = digits_domains(renderings)
        captions = digit_captions(base.domain_names)
        y = base.domain * 10 + base.y
        count = len(base.domain_names)
        held = [r * 10 + d for r in range(count) for d in range(10) if d % count == r]
    else:
        raise DataError(f"unknown captioned dataset {name!r}; valid: {CAPTIONED_DATASETS}")
    return LabeledImages(
        x=base.x,
        y=y,
        domain=base.domain,
        class_names=captions.class_names,
        domain_names=base.domain_names,
        held_out=tuple(held) if zero_shot else (),
    )


def caption_set(name: str, domain_names: Sequence[str]) -> CaptionSet:
    """The caption set of a captioned dataset from its domain names (what DatasetInfo holds)."""
    if name == "captioned-defects":
        materials = sorted({d.split("/")[0] for d in domain_names}, key=_material_order)
        lightings = sorted({d.split("/")[1] for d in domain_names}, key=_lighting_order)
        return defect_captions(materials, lightings)
    if name == "captioned-digits":
        return digit_captions(domain_names)
    raise DataError(f"{name!r} is not a captioned dataset; valid: {CAPTIONED_DATASETS}")


def _defects_options(options: dict[str, Any]) -> dict[str, Any]:
    valid = ("n_per_class_per_domain", "image_size", "channels", "materials", "lightings")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"unknown option(s) {unknown} for built-in dataset 'captioned-defects'; valid "
            f"options: {', '.join(valid)}, zero_shot"
        )
    return options


def _material_order(m: str) -> int:
    return list(MATERIAL_PHRASES).index(m)


def _lighting_order(light: str) -> int:
    return list(LIGHTING_PHRASES).index(light)
