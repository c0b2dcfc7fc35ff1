"""Cohort planning and targets: deterministic, patient-consistent, and exactly recomputable."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from nic.config.base import ConfigError, load_config
from nic.config.synth import SynthConfig
from nic.synth.labels import APOPTOTIC_SPREAD, covariates, mitotic_fraction, plan_cohort, targets
from nic.synth.params import GROWTH_PATTERNS, SlideParams


def test_plan_is_deterministic_and_seed_dependent():
    a, _ = plan_cohort(SynthConfig(slides=12, seed=3))
    b, _ = plan_cohort(SynthConfig(slides=12, seed=3))
    c, _ = plan_cohort(SynthConfig(slides=12, seed=4))
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.seed for s in a] != [s.seed for s in c]
    assert len({s.seed for s in a}) == 12


def test_slide_count_sizes_and_patients_with_two_slides():
    config = SynthConfig(slides=40, size=3000, min_size=2000, seed=1)
    slides, patients = plan_cohort(config)
    assert len(slides) == 40
    assert all(2000 <= s.width <= 3000 and 0.75 * s.width - 1 <= s.height <= s.width for s in slides)
    per_patient = Counter(s.patient_id for s in slides)
    assert set(per_patient.values()) <= {1, 2}
    assert any(v == 2 for v in per_patient.values()), "some patients must have two slides"
    assert set(per_patient) == set(patients)
    # both slides of a patient share the biology, and differ in their section and staining
    for pid, n in per_patient.items():
        if n == 2:
            s1, s2 = [s for s in slides if s.patient_id == pid]
            assert (s1.growth_pattern, s1.mitotic_fraction, s1.til_density) == (
                s2.growth_pattern, s2.mitotic_fraction, s2.til_density)
            assert s1.seed != s2.seed and s1.stain != s2.stain


def test_slide_params_round_trip_through_json():
    slides, _ = plan_cohort(SynthConfig(slides=3, seed=2))
    for s in slides:
        assert SlideParams.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown slide parameters"):
        SlideParams.from_dict({**slides[0].to_dict(), "bogus": 1})


def test_targets_follow_the_documented_formulas():
    config = SynthConfig(slides=60, seed=7)
    slides, patients = plan_cohort(config)
    beta = config.survival
    for patient in patients.values():
        t = targets(patient, config)
        x = covariates(patient)
        lp = (beta.beta_proliferation * x["proliferation"] + beta.beta_desmoplastic * x["desmoplastic"]
              + beta.beta_til * x["til"] + beta.beta_necrosis * x["necrosis"])
        assert t["linear_predictor"] == pytest.approx(lp)
        event_time = beta.weibull_scale_months * (-math.log(patient.event_u) / math.exp(lp)) ** (1 / beta.weibull_shape)
        censor = min(beta.follow_up_months, patient.dropout_months)
        assert t["event"] == int(event_time <= censor)
        assert t["time"] == pytest.approx(min(event_time, censor))
        assert t["time"] <= beta.follow_up_months
        assert t["proliferation"] == pytest.approx(
            patient.log_mitotic_z + config.signal.proliferation_noise * patient.proliferation_noise)
        assert t["growth_pattern"] == GROWTH_PATTERNS.index(patient.growth_pattern)
    events = [targets(p, config)["event"] for p in patients.values()]
    assert 0.2 < np.mean(events) < 0.95, "both events and censoring must occur"


def test_proliferation_is_driven_by_the_mitotic_rate_and_snr():
    config = SynthConfig(slides=80, seed=0)
    slides, patients = plan_cohort(config)
    z = np.array([patients[s.patient_id].log_mitotic_z for s in slides])
    rate = np.array([s.mitotic_fraction for s in slides])
    assert np.corrcoef(z, np.log(rate))[0, 1] > 0.99
    prolif = np.array([targets(patients[s.patient_id], config)["proliferation"] for s in slides])
    assert 0.6 < np.corrcoef(prolif, z)[0, 1] < 0.99  # signal plus noise
    low = SynthConfig(slides=80, seed=0, signal={"snr": 0.0})
    p0 = next(iter(patients.values()))
    assert mitotic_fraction(p0, low) < mitotic_fraction(p0, config)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="signal.snr"):
        load_config(SynthConfig, values={"signal.snr": 2})
    with pytest.raises(ConfigError, match="min_size"):
        load_config(SynthConfig, values={"size": 1000, "min_size": 2000})
    with pytest.raises(ConfigError, match="unknown patch tasks"):
        load_config(SynthConfig, values={"patches.tasks": ["tissue_type", "nope"]})


def test_apoptotic_look_alikes_vary_per_slide_independently_of_proliferation():
    config = SynthConfig(slides=120, seed=0)
    slides, patients = plan_cohort(config)
    rate = np.array([s.apoptotic_fraction for s in slides])
    z = np.array([patients[s.patient_id].log_mitotic_z for s in slides])
    assert (rate > 0).all() and len(set(rate)) == len(slides)  # per slide, even within a patient
    assert np.exp(np.mean(np.log(rate))) == pytest.approx(config.signal.apoptotic_fraction, rel=0.2)
    assert np.std(np.log(rate)) == pytest.approx(APOPTOTIC_SPREAD, rel=0.25)
    assert abs(np.corrcoef(z, np.log(rate))[0, 1]) < 0.25  # no signal of the proliferation target
    # the knob turns them off and changes no other parameter
    off, _ = plan_cohort(config.model_copy(update={"signal": config.signal.model_copy(
        update={"apoptotic_fraction": 0.0})}))
    assert all(s.apoptotic_fraction == 0.0 for s in off)
    assert [{**s.to_dict(), "apoptotic_fraction": 0} for s in slides] == [
        {**s.to_dict(), "apoptotic_fraction": 0} for s in off]


def test_a_slides_spec_ignores_last_bit_float_differences():
    """numpy's SIMD kernels round exp/log/sqrt differently on CPUs with and without AVX-512: a cohort
    rendered on one machine must still be complete on another (the spec hashes floats at 10 digits),
    while any real change of a parameter still changes the spec."""
    import dataclasses

    from nic.synth.stage import _slide_spec, spec_hash

    config = SynthConfig(slides=2, seed=5)
    params = plan_cohort(config)[0][0]
    stain = params.stain
    nudged = dataclasses.replace(params, tumour_fraction=math.nextafter(params.tumour_fraction, 1.0),
                                 stain=dataclasses.replace(stain, h_strength=math.nextafter(stain.h_strength, 0.0)))
    assert nudged.to_dict() != params.to_dict()
    assert spec_hash(_slide_spec(nudged, config)) == spec_hash(_slide_spec(params, config))
    moved = dataclasses.replace(params, tumour_fraction=params.tumour_fraction + 1e-6)
    assert spec_hash(_slide_spec(moved, config)) != spec_hash(_slide_spec(params, config))
