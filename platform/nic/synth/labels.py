"""From a master seed to a cohort: patients, hidden parameters per slide, and slide-level targets.

Targets are functions of the hidden parameters only, so they can be checked exactly:

- proliferation (regression, like TUPAC16): the patient's standardised log mitotic rate plus
  Gaussian label noise (`proliferation = signal + noise`);
- growth pattern (binary): 1 = desmoplastic, 0 = replacement (it shapes the slide's layout);
- survival: a Weibull proportional-hazards model on (proliferation signal, desmoplastic,
  standardised TIL density, standardised necrosis), event time by inversion of a stored uniform
  draw, censored by the end of follow-up or an exponential loss-to-follow-up time.

A patient's slides share the patient-level biology and therefore all targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nic.config.synth import SynthConfig
from nic.synth.params import GROWTH_PATTERNS, Appearance, Artefacts, SlideParams
from nic.synth.stain import Stain, sample_stain

# Population moments used to standardise covariates (known by construction).
TIL_MEAN, TIL_SD = 0.4, 0.2
NECROSIS_LOW, NECROSIS_HIGH = 0.02, 0.3
NECROSIS_MEAN = (NECROSIS_LOW + NECROSIS_HIGH) / 2
NECROSIS_SD = (NECROSIS_HIGH - NECROSIS_LOW) / math.sqrt(12)
APOPTOTIC_SPREAD = 0.5
"""SD of log(apoptotic fraction) between slides."""


@dataclass(frozen=True)
class Patient:
    """Patient-level hidden variables and the random draws that turn them into targets."""

    patient_id: str
    growth_pattern: str
    log_mitotic_z: float  # standard normal: the patient's mitotic rate in SD units
    til_density: float
    necrosis_fraction: float
    proliferation_noise: float  # standard normal draw, scaled by the config's noise SD
    event_u: float  # uniform draw for the event time
    dropout_months: float  # random censoring time

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def mitotic_fraction(patient: Patient, config: SynthConfig) -> float:
    """Fraction of tumour nuclei in mitosis: log-normal around the median, thinned at low snr."""
    sig = config.signal
    rate = sig.mitotic_fraction * math.exp(sig.mitotic_spread * patient.log_mitotic_z)
    return float(min(0.15, rate * (0.3 + 0.7 * sig.snr)))


def apoptotic_fraction(rng: np.random.Generator, config: SynthConfig) -> float:
    """Fraction of tumour nuclei drawn as apoptotic bodies (mitosis look-alikes) on one slide.

    Log-normal around `signal.apoptotic_fraction`, drawn per slide and independent of the patient,
    so the look-alikes add realistic noise to a mitosis counter but carry no target signal.
    """
    return float(min(0.15, config.signal.apoptotic_fraction * math.exp(APOPTOTIC_SPREAD * rng.standard_normal())))


def covariates(patient: Patient) -> dict[str, float]:
    """The survival model's covariates (standardised where continuous)."""
    return {
        "proliferation": patient.log_mitotic_z,
        "desmoplastic": float(GROWTH_PATTERNS.index(patient.growth_pattern)),
        "til": (patient.til_density - TIL_MEAN) / TIL_SD,
        "necrosis": (patient.necrosis_fraction - NECROSIS_MEAN) / NECROSIS_SD,
    }


def hazard_coefficients(config: SynthConfig) -> dict[str, float]:
    s = config.survival
    return {
        "proliferation": s.beta_proliferation,
        "desmoplastic": s.beta_desmoplastic,
        "til": s.beta_til,
        "necrosis": s.beta_necrosis,
    }


def targets(patient: Patient, config: SynthConfig) -> dict:
    """All slide-level targets of a patient, recomputable from the patient and the config."""
    s = config.survival
    beta = hazard_coefficients(config)
    x = covariates(patient)
    linear_predictor = sum(beta[k] * x[k] for k in beta)
    # Weibull PH: S(t) = exp(-(t / scale)^shape * exp(lp)), so T = scale * (-log U / exp(lp))^(1/shape)
    event_time = s.weibull_scale_months * (-math.log(patient.event_u) / math.exp(linear_predictor)) ** (
        1.0 / s.weibull_shape
    )
    censor_time = min(s.follow_up_months, patient.dropout_months)
    event = event_time <= censor_time
    return {
        "proliferation": patient.log_mitotic_z + config.signal.proliferation_noise * patient.proliferation_noise,
        "growth_pattern": GROWTH_PATTERNS.index(patient.growth_pattern),
        "growth_pattern_name": patient.growth_pattern,
        "time": float(event_time if event else censor_time),
        "event": int(event),
        "linear_predictor": float(linear_predictor),
        "event_time": float(event_time),
        "censor_time": float(censor_time),
    }


def _patients(rng: np.random.Generator, n_slides: int, config: SynthConfig) -> list[tuple[Patient, int]]:
    """Patients with their slide counts (1 or 2) adding up to exactly n_slides."""
    out: list[tuple[Patient, int]] = []
    total = 0
    while total < n_slides:
        two = rng.random() < config.cohort.two_slide_fraction and n_slides - total >= 2
        desmo = rng.random() < config.cohort.desmoplastic_fraction
        # desmoplastic tumours carry more lymphocytes (as in colorectal liver metastases)
        til = float(np.clip(rng.normal(TIL_MEAN + (0.08 if desmo else -0.08), TIL_SD), 0.0, 1.0))
        patient = Patient(
            patient_id=f"P{len(out):04d}",
            growth_pattern=GROWTH_PATTERNS[int(desmo)],
            log_mitotic_z=float(rng.standard_normal()),
            til_density=til,
            necrosis_fraction=float(rng.uniform(NECROSIS_LOW, NECROSIS_HIGH)),
            proliferation_noise=float(rng.standard_normal()),
            event_u=float(rng.uniform(1e-9, 1.0)),
            dropout_months=float(rng.exponential(config.survival.dropout_months)),
        )
        count = 2 if two else 1
        out.append((patient, count))
        total += count
    return out


def _slide_size(rng: np.random.Generator, config: SynthConfig) -> tuple[int, int]:
    lo = config.min_size if config.min_size is not None else config.size
    width = int(rng.integers(lo, config.size + 1))
    aspect = float(rng.uniform(config.render.min_aspect, 1.0))
    height = max(256, int(round(width * aspect)))
    return width, height


def sample_look(rng: np.random.Generator, stain_variation: float) -> tuple[Stain, Appearance]:
    """A slide's stain and per-compartment staining intensities (lab and section variation)."""
    stain = sample_stain(rng, stain_variation)
    v = stain_variation
    appearance = Appearance(
        stroma_e=float(0.4 * np.exp(rng.normal(0, 0.12 * v))),
        tumour_e=float(0.34 * np.exp(rng.normal(0, 0.12 * v))),
        tumour_h=float(0.34 * np.exp(rng.normal(0, 0.15 * v))),
        necrosis_e=float(0.5 * np.exp(rng.normal(0, 0.12 * v))),
        fat_wall_e=float(0.75 * np.exp(rng.normal(0, 0.1 * v))),
        nuclear_scale=float(np.exp(rng.normal(0, 0.06 * v))),
        glands=float(rng.uniform(0.2, 1.0)),
    )
    return stain, appearance


def plan_cohort(config: SynthConfig) -> tuple[list[SlideParams], dict[str, Patient]]:
    """Every slide's hidden parameters and every patient, deterministic in config.seed.

    Each slide gets its own seed spawned from the master seed (numpy SeedSequence), so a slide's
    pixels depend on nothing but its own parameters, whatever order the workers render them in.
    """
    root = np.random.SeedSequence(config.seed)
    cohort_seq, slide_root = root.spawn(2)
    rng = np.random.default_rng(cohort_seq)
    patients = _patients(rng, config.slides, config)
    slide_seqs = slide_root.spawn(config.slides)
    slides: list[SlideParams] = []
    by_id: dict[str, Patient] = {}
    art = config.artefacts
    for patient, count in patients:
        by_id[patient.patient_id] = patient
        for k in range(count):
            i = len(slides)
            seq = slide_seqs[i]
            srng = np.random.default_rng(seq)
            width, height = _slide_size(srng, config)
            stain, appearance = sample_look(srng, config.render.stain_variation)
            artefacts = Artefacts(
                pen=bool(srng.random() < art.pen),
                pen_colour=str(srng.choice(["blue", "green", "black"])),
                fold=bool(srng.random() < art.fold),
                blur=bool(srng.random() < art.blur),
                blur_sigma_um=float(srng.uniform(1.0, 2.5)),
            )
            slides.append(
                SlideParams(
                    slide_id=f"S{i:04d}",
                    patient_id=patient.patient_id,
                    seed=int(seq.generate_state(1, np.uint64)[0] & np.uint64(2**62 - 1)),
                    width=width,
                    height=height,
                    mpp=config.mpp,
                    stain=stain,
                    growth_pattern=patient.growth_pattern,
                    mitotic_fraction=mitotic_fraction(patient, config),
                    til_density=patient.til_density,
                    necrosis_fraction=patient.necrosis_fraction,
                    tumour_fraction=float(srng.uniform(0.25, 0.45)),
                    fat_fraction=float(srng.uniform(0.2, 0.6)),
                    tissue_pieces=int(srng.integers(1, config.render.max_tissue_pieces + 1)),
                    tissue_fraction=float(srng.uniform(0.35, 0.55)),
                    snr=config.signal.snr,
                    appearance=appearance,
                    artefacts=artefacts,
                    texture_offset=(float(srng.uniform(0, 512)), float(srng.uniform(0, 512))),
                    # the last draw (keyword arguments are evaluated in order): the draws above,
                    # hence every other parameter of existing slides, are unchanged by it
                    apoptotic_fraction=apoptotic_fraction(srng, config),
                )
            )
            del k
    return slides, by_id
