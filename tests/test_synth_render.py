"""The slide renderer: pixels are a pure function of position, tissue is detectable, colours are H&E."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from nic.synth.layout import build_layout
from nic.synth.params import (
    BACKGROUND,
    CLASSES,
    LYMPHOCYTES,
    STROMA,
    TUMOUR,
    Artefacts,
    SlideParams,
)
from nic.synth.render import KIND_APOPTOTIC, KIND_LYMPHOCYTE, KIND_MITOSIS, KIND_TUMOUR, KINDS, Scene
from nic.synth.stain import E_REF, H_REF, Stain, sample_stain
from nic.synth.textures import period_px


def make_params(**overrides) -> SlideParams:
    values = dict(
        slide_id="T",
        patient_id="P",
        seed=11,
        width=1400,
        height=1200,
        mpp=0.5,
        stain=sample_stain(np.random.default_rng(5)),
        growth_pattern="desmoplastic",
        mitotic_fraction=0.02,
        til_density=0.5,
        texture_offset=(37.0, 101.0),
    )
    values.update(overrides)
    return SlideParams(**values)


@pytest.fixture(scope="module")
def scene_with_artefacts() -> Scene:
    return Scene(make_params(artefacts=Artefacts(pen=True, fold=True, blur=True, blur_sigma_um=1.5)))


def test_region_pixels_do_not_depend_on_how_the_slide_is_cut(scene_with_artefacts):
    scene = scene_with_artefacts
    assert scene.layout.has_pen and scene.layout.has_fold and scene.layout.has_blur
    whole = scene.render(0, 0, scene.height, scene.width)
    # odd cuts that cross cells, texture periods, nucleus blocks and artefact boxes
    ys = [0, 77, 301, 640, 1001, scene.height]
    xs = [0, 130, 555, 999, 1203, scene.width]
    pieces = np.zeros_like(whole)
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            pieces[y0:y1, x0:x1] = scene.render(y0, x0, y1 - y0, x1 - x0)
    assert np.array_equal(whole, pieces)


def test_same_params_same_pixels_and_other_seed_differs():
    a = Scene(make_params()).render(200, 300, 256, 256)
    b = Scene(make_params()).render(200, 300, 256, 256)
    c = Scene(make_params(seed=12)).render(200, 300, 256, 256)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tissue_is_found_by_a_saturation_otsu_mask():
    scene = Scene(make_params())
    image = scene.render(0, 0, scene.height, scene.width)[::4, ::4]
    classes = scene.classes(0, 0, scene.height, scene.width)[::4, ::4]
    saturation = rgb2hsv(image)[..., 1]
    mask = saturation > max(threshold_otsu(saturation), 0.05)
    tissue = classes != BACKGROUND
    assert 0.15 < tissue.mean() < 0.85
    agreement = (mask == tissue).mean()
    assert agreement > 0.9, f"saturation mask agrees with the tissue map on only {agreement:.2%}"
    # background is near-white glass
    assert image[~tissue].mean() > 225
    assert image[tissue].mean() < image[~tissue].mean() - 20


def test_classes_and_nuclei_follow_the_layout():
    scene = Scene(make_params())
    classes = scene.classes(0, 0, scene.height, scene.width)
    fractions = np.bincount(classes.ravel(), minlength=len(CLASSES)) / classes.size
    assert fractions[TUMOUR] > 0.05 and fractions[STROMA] > 0.05
    nuclei = scene.nuclei(0, 0, scene.height, scene.width)
    assert len(nuclei) > 500
    at = classes[nuclei[:, 0], nuclei[:, 1]]
    tumour_nuclei = nuclei[:, 2] == KIND_TUMOUR
    # nuclei are placed by the class painted under their centre
    assert (at[tumour_nuclei] == TUMOUR).mean() > 0.99
    assert (nuclei[:, 2] == KIND_MITOSIS).sum() > 0
    lymph = nuclei[:, 2] == KIND_LYMPHOCYTE
    assert (at[lymph] != BACKGROUND).mean() > 0.99
    counts = scene.count_nuclei()
    assert set(counts) == set(KINDS)
    assert counts["tumour"] + counts["mitosis"] >= tumour_nuclei.sum() + (nuclei[:, 2] == KIND_MITOSIS).sum()


def test_nuclei_are_dark_and_purple_stroma_pink():
    p = make_params(layout="uniform", uniform_class=LYMPHOCYTES, width=512, height=512, stain=sample_stain(
        np.random.default_rng(0), variation=0.0))
    lymph = Scene(p).render(0, 0, 512, 512).astype(float)
    stroma = Scene(make_params(layout="uniform", uniform_class=STROMA, width=512, height=512,
                               stain=p.stain)).render(0, 0, 512, 512).astype(float)
    # stroma: eosin pink (red > blue > green); lymphocyte-rich tissue much darker and bluer
    r, g, b = stroma.reshape(-1, 3).mean(axis=0)
    assert r > b > g
    assert lymph.mean() < stroma.mean() - 30
    assert (lymph[..., 2] - lymph[..., 0]).mean() > (stroma[..., 2] - stroma[..., 0]).mean()


def test_stain_lut_is_beer_lambert():
    stain = Stain(tuple(H_REF / np.linalg.norm(H_REF)), tuple(E_REF / np.linalg.norm(E_REF)), 1.0, 1.0,
                  (250.0, 250.0, 250.0))
    lut = stain.lut().reshape(256, 256, 3).astype(float)
    assert np.allclose(lut[0, 0], 250, atol=0.5)  # no stain: the glass
    # optical density is additive: OD(h + e) = OD(h) + OD(e)
    od = -np.log(np.clip(lut, 1, None) / 250.0)
    assert np.allclose(od[100, 80], od[100, 0] + od[0, 80], atol=0.02)
    assert (np.diff(lut[:, 0].sum(axis=1)) <= 0).all()  # more haematoxylin, darker


def test_layout_growth_patterns_differ_in_the_tumour_rim():
    def rim_stroma(pattern: str) -> float:
        from scipy import ndimage

        layout = build_layout(make_params(growth_pattern=pattern, width=3000, height=3000, til_density=0.6))
        tumour = layout.classes == TUMOUR
        ring = ndimage.binary_dilation(tumour, iterations=8) & ~tumour & (layout.classes != BACKGROUND)
        return float(np.isin(layout.classes[ring], [STROMA, LYMPHOCYTES]).mean())

    # desmoplastic nests sit in a fibrotic, lymphocyte-rich rim; replacement tumour touches fat directly
    assert rim_stroma("desmoplastic") > rim_stroma("replacement") + 0.15


def test_quarter_micron_slides_show_the_same_cells_twice_as_large():
    half = Scene(make_params(layout="uniform", uniform_class=TUMOUR, width=512, height=512))
    quarter = Scene(make_params(layout="uniform", uniform_class=TUMOUR, width=1024, height=1024, mpp=0.25))
    assert period_px(0.25) == 2 * period_px(0.5)
    n_half = len(half.nuclei(0, 0, 512, 512))
    n_quarter = len(quarter.nuclei(0, 0, 1024, 1024))
    # the same tissue area (256 um square) holds about the same number of nuclei
    assert 0.7 < n_quarter / n_half < 1.4
    assert quarter.banks[KIND_TUMOUR].size > 1.8 * half.banks[KIND_TUMOUR].size - 2


def test_apoptotic_bodies_replace_tumour_nuclei_and_move_nothing_else():
    from dataclasses import replace

    assert KINDS[-1] == "apoptotic" and KIND_APOPTOTIC == len(KINDS) - 1 and KIND_MITOSIS == 5
    p = make_params(apoptotic_fraction=0.05)
    with_bodies = Scene(p)
    without = Scene(replace(p, apoptotic_fraction=0.0))
    a = with_bodies.nuclei(0, 0, p.height, p.width)
    b = without.nuclei(0, 0, p.height, p.width)
    # the same nuclei in the same places; only tumour nuclei became apoptotic bodies (figures stay)
    assert np.array_equal(a[:, [0, 1, 3]], b[:, [0, 1, 3]])
    changed = a[:, 2] != b[:, 2]
    assert (a[changed, 2] == KIND_APOPTOTIC).all() and (b[changed, 2] == KIND_TUMOUR).all()
    assert (a[:, 2] == KIND_MITOSIS).sum() == (b[:, 2] == KIND_MITOSIS).sum() > 0
    tumour_cells = np.isin(b[:, 2], [KIND_TUMOUR, KIND_MITOSIS]).sum()
    assert 0.03 < changed.sum() / tumour_cells < 0.07
    classes = with_bodies.classes(0, 0, p.height, p.width)
    assert (classes[a[changed, 0], a[changed, 1]] == TUMOUR).mean() > 0.99


def test_apoptotic_bodies_are_dark_with_a_pale_halo():
    from dataclasses import replace

    p = make_params(layout="uniform", uniform_class=TUMOUR, width=768, height=768, apoptotic_fraction=0.05,
                    mitotic_fraction=0.0, til_density=0.0)
    scene = Scene(p)
    img = scene.render(0, 0, 768, 768).astype(float).sum(axis=-1)
    ref = Scene(replace(p, apoptotic_fraction=0.0)).render(0, 0, 768, 768).astype(float).sum(axis=-1)
    bank = scene.banks[KIND_APOPTOTIC]
    half = bank.half
    core, halo = [], []
    for y, x, kind, variant in scene.nuclei(half, half, 768 - 2 * half, 768 - 2 * half):
        if kind != KIND_APOPTOTIC:
            continue
        win = np.s_[y - half : y + half + 1, x - half : x + half + 1]
        dark = bank.sprites[variant] > 2.0  # the pyknotic nucleus or its fragments
        ring = (bank.clear[variant] > 0.4) & (bank.eosin[variant] < 0.05)  # the halo outside the cell
        core.append(img[win][dark].mean() - ref[win][dark].mean())
        halo.append(img[win][ring].mean() - ref[win][ring].mean())
    assert len(core) > 10
    assert np.mean(core) < -80  # much darker than the tumour nucleus it replaced
    assert np.mean(halo) > 80  # a pale ring around the shrunken cell


def test_mitotic_figures_are_dark_in_a_pale_rounded_cell_with_arms():
    """What a pathologist scans for, and what tells a figure from its look-alikes: near-black
    chromosomes with hair-like arms (not round like a lymphocyte or a pyknotic nucleus), in a
    wide pale zone with only a faint pink (not the dense pink of an apoptotic body)."""
    from dataclasses import replace

    from skimage.measure import regionprops

    p = make_params(layout="uniform", uniform_class=TUMOUR, width=768, height=768, mitotic_fraction=0.05,
                    apoptotic_fraction=0.0, til_density=0.0, snr=1.0)
    scene = Scene(p)
    img = scene.render(0, 0, 768, 768).astype(float).sum(axis=-1)
    ref = Scene(replace(p, mitotic_fraction=0.0)).render(0, 0, 768, 768).astype(float).sum(axis=-1)
    bank = scene.banks[KIND_MITOSIS]
    apoptotic = scene.banks[KIND_APOPTOTIC]
    assert bank.clear is not None and bank.eosin is not None
    assert bank.eosin.max() < 0.5 * apoptotic.eosin.max()  # faint pink, not hypereosinophilic
    half = bank.half
    core, zone = [], []
    for y, x, kind, variant in scene.nuclei(half, half, 768 - 2 * half, 768 - 2 * half):
        if kind != KIND_MITOSIS:
            continue
        win = np.s_[y - half : y + half + 1, x - half : x + half + 1]
        dark = bank.sprites[variant] > 2.0
        pale = (bank.clear[variant] > 0.4) & (bank.sprites[variant] < 0.1)
        core.append(img[win][dark].mean() - ref[win][dark].mean())
        zone.append(img[win][pale & (ref[win] < np.percentile(ref, 60))].mean() - ref[win][pale].mean())
    assert len(core) > 10
    assert np.mean(core) < -80  # much darker than the tumour nucleus it replaced
    assert np.nanmean(zone) > 20  # paler cytoplasm around the chromosomes
    # not round: the chromosome mass is far from a disc (solidity of a disc ~0.95)
    solidity = [regionprops((s > 1.0).astype(int))[0].solidity for s in bank.sprites]
    assert np.median(solidity) < 0.85
