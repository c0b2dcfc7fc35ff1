"""H&E colour by Beer-Lambert optical-density mixing, with per-slide stain variation.

The renderer works in stain concentrations (haematoxylin H for nuclei, eosin E for cytoplasm and
stroma), never in RGB, because that is how a stained section absorbs light: every stain adds
optical density OD = c * v (v its absorbance in R, G, B), and the transmitted light is
I = I0 * exp(-OD_total). Mixing in OD space is what makes purple nuclei over pink stroma look
right, and varying v and the stain strength per slide gives the lab-to-lab colour variation that
a patch encoder must be robust to.

Turning two concentrations into RGB per pixel with `exp` is slow, so a slide's colours are a
256 x 256 lookup table indexed by the quantised (H, E) pair.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Absorbance (OD per unit concentration) of haematoxylin and eosin in R, G, B: Macenko et al.'s
# reference vectors for standard H&E, normalised to unit length.
H_REF = np.array([0.5626, 0.7201, 0.4062])
E_REF = np.array([0.2159, 0.8012, 0.5581])

H_MAX = 3.6
"""Largest H concentration the lookup table resolves (mitoses reach ~3.2)."""
E_MAX = 2.4
"""Largest E concentration the lookup table resolves (folds double ~1.1)."""


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Stain:
    """One slide's staining: absorbance vectors, stain strengths and the glass (background) colour."""

    h_vector: tuple[float, float, float]
    e_vector: tuple[float, float, float]
    h_strength: float
    e_strength: float
    glass_rgb: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Stain:
        return cls(
            h_vector=tuple(data["h_vector"]),
            e_vector=tuple(data["e_vector"]),
            h_strength=float(data["h_strength"]),
            e_strength=float(data["e_strength"]),
            glass_rgb=tuple(data["glass_rgb"]),
        )

    def od(self, c_h: np.ndarray, c_e: np.ndarray) -> np.ndarray:
        """Optical density (..., 3) of the given concentrations, glass excluded."""
        h = np.asarray(self.h_vector) * self.h_strength
        e = np.asarray(self.e_vector) * self.e_strength
        return np.asarray(c_h)[..., None] * h + np.asarray(c_e)[..., None] * e

    def lut(self) -> np.ndarray:
        """(256 * 256, 3) uint8 RGB of every quantised (H, E) pair, flattened as H * 256 + E."""
        c_h = np.linspace(0.0, H_MAX, 256)
        c_e = np.linspace(0.0, E_MAX, 256)
        od = self.od(c_h[:, None], c_e[None, :])
        rgb = np.asarray(self.glass_rgb) * np.exp(-od)
        # floor of 8: the renderer subtracts up to 4 of glass noise in uint8
        return np.clip(np.round(rgb), 8, 255).astype(np.uint8).reshape(256 * 256, 3)


def sample_stain(rng: np.random.Generator, variation: float = 1.0) -> Stain:
    """A plausible slide stain: reference vectors tilted a little, strengths and glass varied.

    `variation` scales every perturbation (0 = the reference stain on pure white glass).
    """
    h = _unit(H_REF + rng.normal(0.0, 0.06 * variation, 3))
    e = _unit(E_REF + rng.normal(0.0, 0.05 * variation, 3))
    h = np.clip(h, 0.05, None)
    e = np.clip(e, 0.05, None)
    h_strength = float(np.exp(rng.normal(0.0, 0.12 * variation)))
    e_strength = float(np.exp(rng.normal(0.0, 0.15 * variation)))
    glass_level = 246.0 - abs(rng.normal(0.0, 3.0 * variation))
    tint = rng.normal(0.0, 1.5 * variation, 3)
    glass = np.clip(glass_level + tint, 225.0, 252.0)
    return Stain(
        h_vector=_triple(_unit(h)),
        e_vector=_triple(_unit(e)),
        h_strength=h_strength,
        e_strength=e_strength,
        glass_rgb=_triple(glass),
    )


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    """A 3-vector as the plain float triple `Stain` holds (JSON-able, hashable)."""
    a, b, c = (float(x) for x in values)
    return a, b, c
