"""Hidden parameters of a synthetic slide: everything its pixels and its labels are made from.

A slide is a pure function of its `SlideParams` (and the generator version): the renderer reads
nothing else, so `truth.json` (these parameters, per slide) is a complete record of the cohort,
and a test can recompute every label from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from nic.synth.stain import Stain

GENERATOR_VERSION = "nic-synth-2"
"""Bumped whenever the same parameters would render different pixels."""

CLASSES = ("background", "stroma", "tumour", "lymphocytes", "necrosis", "fat")
BACKGROUND, STROMA, TUMOUR, LYMPHOCYTES, NECROSIS, FAT = range(len(CLASSES))

GROWTH_PATTERNS = ("replacement", "desmoplastic")
"""Index = the binary label: 1 = desmoplastic (encapsulated nests), 0 = replacement."""


@dataclass(frozen=True)
class Artefacts:
    """Optional slide artefacts; each has its own seed so turning one on does not move the others."""

    pen: bool = False
    pen_colour: str = "blue"  # blue | green | black
    fold: bool = False
    blur: bool = False
    blur_sigma_um: float = 1.5


@dataclass(frozen=True)
class Appearance:
    """Per-slide staining intensity of each tissue compartment (lab and section-thickness variation)."""

    stroma_e: float = 0.4
    tumour_e: float = 0.34
    tumour_h: float = 0.34
    necrosis_e: float = 0.5
    fat_wall_e: float = 0.75
    nuclear_scale: float = 1.0
    glands: float = 0.7  # 0..1: how much of the tumour forms gland lumens (differentiation)


@dataclass(frozen=True)
class SlideParams:
    """One slide. Patient-level biology (shared by a patient's slides) is marked in comments."""

    slide_id: str
    patient_id: str
    seed: int  # layout, nuclei and artefacts of this slide
    width: int
    height: int
    mpp: float
    stain: Stain
    # --- patient-level biology ---
    growth_pattern: str = "replacement"  # see GROWTH_PATTERNS
    mitotic_fraction: float = 0.004  # probability that a tumour nucleus is a mitotic figure
    til_density: float = 0.3  # 0..1, tumour-infiltrating lymphocytes
    necrosis_fraction: float = 0.1  # fraction of the tumour area that is necrotic
    # --- slide-level sampling of the section ---
    tumour_fraction: float = 0.35  # of the tissue area
    fat_fraction: float = 0.4  # of the non-tumour tissue
    tissue_pieces: int = 1
    tissue_fraction: float = 0.45  # of the slide area
    snr: float = 0.7  # 0..1: how visible mitotic figures are (size, darkness)
    # probability that a (non-mitotic) tumour nucleus is an apoptotic body, a dark mitosis
    # look-alike; per slide, independent of the patient's mitotic rate (no target depends on it)
    apoptotic_fraction: float = 0.004
    appearance: Appearance = field(default_factory=Appearance)
    artefacts: Artefacts = field(default_factory=Artefacts)
    texture_offset: tuple[float, float] = (0, 0)  # um; decorrelates slides that share textures
    layout: str = "slide"  # slide | fill (tissue everywhere) | uniform (one class everywhere)
    uniform_class: int = STROMA  # the class of a `uniform` layout

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stain"] = self.stain.to_dict()
        data["texture_offset"] = list(self.texture_offset)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SlideParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown slide parameters: {sorted(unknown)}")
        values = dict(data)
        values["stain"] = Stain.from_dict(values["stain"])
        values["appearance"] = Appearance(**values.get("appearance", {}))
        values["artefacts"] = Artefacts(**values.get("artefacts", {}))
        values["texture_offset"] = tuple(values.get("texture_offset", (0, 0)))
        return cls(**values)

    @property
    def growth_label(self) -> int:
        return GROWTH_PATTERNS.index(self.growth_pattern)
