"""Per-knee parameters: grade and severity, anatomy, microstructure design, materials and poses.

Every number a knee is built from is drawn here from ``SeedSequence([seed, index])`` and
rounded to 6 decimals, so ``metadata.json`` holds the complete, exact recipe of the knee.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, erfinv

from ..errors import ConfigError
from .texture import TILE_N, TILE_SAMPLES_PER_WAVELENGTH

G_TILE = 0.6404
"""RMS gradient of the texture tile per sample (checked against the tile by a test)."""
C_TH = 1.28
"""Measured Tb.Th / design plate thickness (local-thickness calibration of the generator)."""
C_SP = 1.18
"""Measured (Tb.Th + Tb.Sp) / predicted sheet spacing (calibration of the generator)."""

# OA effect sizes at severity 1 in the medial compartment (lateral: x LATERAL_W). See docs/phantom.md.
OA_EFFECTS = {"th_gain": 0.40, "rod_widen": 3.0, "plate_gain": 1.00, "cart_loss": 0.65,
              "lateral_w": 0.35, "depth_mm": 20.0}


def _sheet_spacing_per_wavelength() -> float:
    """Mean perpendicular distance between zero sheets of the field, in wavelengths (Rice formula)."""
    return math.pi * math.sqrt(3.0) / (2.0 * G_TILE) / TILE_SAMPLES_PER_WAVELENGTH


def micro_design(bvtv: float, tb_th: float, tb_sp: float) -> dict:
    """Field wavelength (mm) and plate/rod thresholds (field units) that give the target morphometry.

    Plates ``|f1| < tp`` have thickness ``2 tp / |grad f|`` and sheet spacing set by the wavelength;
    rods fill the rest of the BV/TV: ``BV/TV = pp + pr - pp pr`` with ``pp = erf(tp / sqrt 2)``
    and ``pr = erf(tr / sqrt 2)^2`` (f is Gaussian with unit variance).
    Raises :class:`ConfigError` for a BV/TV that plates and rods cannot reach.
    """
    if not (0 < bvtv < 1) or tb_th <= 0 or tb_sp <= 0:
        raise ConfigError(f"bvtv must lie in (0, 1) and tb_th, tb_sp must be positive (got {bvtv}, {tb_th}, {tb_sp})")
    wavelength = (tb_th + tb_sp) / C_SP / _sheet_spacing_per_wavelength()
    gmm = G_TILE * TILE_SAMPLES_PER_WAVELENGTH / wavelength
    tp = (tb_th / C_TH) / 2.0 * gmm
    pp = float(erf(tp / math.sqrt(2.0)))
    if bvtv < pp - 0.02:
        raise ConfigError(f"bvtv {bvtv} is impossible with tb_th {tb_th} mm and tb_sp {tb_sp} mm: plates alone "
                          f"give about {pp:.2f}; raise bvtv or tb_sp, or lower tb_th")
    pr = max(0.0, (bvtv - pp) / (1.0 - pp))
    tr = float(math.sqrt(2.0) * erfinv(math.sqrt(pr))) if pr > 0 else 0.0
    rod_th = 2.0 * tr / gmm
    if rod_th > 1.5 * tb_th / C_TH:
        raise ConfigError(f"bvtv {bvtv} is impossible with tb_th {tb_th} mm and tb_sp {tb_sp} mm: it needs rods "
                          f"thicker than the plates; lower bvtv or tb_sp, or raise tb_th")
    return {"wavelength": wavelength, "tp": tp, "tr": tr, "plate_fraction": pp, "rod_thickness": rod_th}


def _r6(x):
    if isinstance(x, dict):
        return {k: _r6(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_r6(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def sample_subject(settings, seed: int, index: int) -> dict:
    """All parameters of knee ``index`` of the cohort made with ``seed``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))
    N = rng.normal
    U = rng.uniform
    side = "R" if rng.random() < 0.5 else "L"
    severity = float(U(0.0, 1.0))
    grade = int(np.clip(math.floor(5.0 * severity + N(0.0, 0.35)), 0, 4))
    oa = {**OA_EFFECTS}
    resp = float(np.clip(N(1.0, 0.2), 0.5, 1.5))  # individual response of bone and cartilage to OA
    for k in ("th_gain", "rod_widen", "plate_gain", "cart_loss"):
        oa[k] *= resp
    s = float(np.clip(N(1.0, 0.07), 0.85, 1.15))

    def j(n=3, sd=0.03):
        return np.clip(1.0 + N(0.0, sd, n), 0.9, 1.1)

    lw = oa["lateral_w"]
    cl_med = min(0.85, oa["cart_loss"] * severity)
    cl_lat = min(0.85, oa["cart_loss"] * severity * lw)
    cart = {"fem_med": N(2.2, 0.22) * (1 - cl_med), "fem_lat": N(2.1, 0.22) * (1 - cl_lat),
            "tib_med": N(1.9, 0.2) * (1 - cl_med), "tib_lat": N(2.5, 0.22) * (1 - cl_lat), "pat": N(2.8, 0.25)}
    cart = {k: float(np.clip(v, 0.3, 3.5)) for k, v in cart.items()}
    gap = U(0.3, 0.5)
    med_a = np.array([12.5, 28.0, 21.0]) * s * j()
    lat_a = np.array([12.0, 26.5, 20.0]) * s * j()
    cs = 20.0 * s * j(1)[0]
    zc_m = gap / 2 + cart["fem_med"] + med_a[2]
    zc_l = gap / 2 + cart["fem_lat"] + lat_a[2]
    zc = 0.5 * (zc_m + zc_l)
    block_a = np.array([36.0, 25.0, 44.0]) * s * j()
    femur = {"med_c": [cs, 6.0 * s, zc_m], "lat_c": [-cs, 5.0 * s, zc_l], "med_a": med_a, "lat_a": lat_a,
             "block_c": [0.0, 2.0 * s, zc + 6.0 * s], "block_a": block_a, "block_zcut": zc - 7.0 * s,
             "troch_y": -8.0 * s, "troch_z": zc + 24.0 * s, "troch_x": 24.0 * s}
    tib_ax, tib_ay = 37.0 * s * j(1)[0], 25.0 * s * j(1)[0]
    tibia = {"ax": tib_ax, "ay": tib_ay, "y0": 3.0 * s, "zt_med": -(gap / 2 + cart["tib_med"]),
             "zt_lat": -(gap / 2 + cart["tib_lat"]), "emin_h": 3.0 * s, "emin_w": 3.5 * s}
    front = femur["block_c"][1] - block_a[1]
    pat_a = np.array([20.0, 10.0, 21.0]) * s * j()
    pat_back = front - 0.5 * (cart["fem_med"] + cart["fem_lat"]) - cart["pat"] - 0.6
    patella = {"c": [2.0 * s, pat_back - pat_a[1], zc + 12.0 * s], "a": pat_a}
    fibula = {"c": [-34.0 * s, 14.0 * s, tibia["zt_lat"] - 20.0 * s], "a": np.array([10.0, 10.0, 15.0]) * s}
    soft = {"ax": 46.0 * s, "ay": 44.0 * s, "yc": 4.0 * s, "fat": U(3.0, 12.0), "skin": 1.5,
            "hoffa_c": [0.0, -27.0 * s, -3.0 * s], "hoffa_a": np.array([16.0, 7.0, 9.0]) * s,
            "popl_c": [0.0, 33.0 * s, 0.0], "popl_a": [15.0 * s, 10.0 * s, 60.0]}
    roi = {"depth_min": 1.0, "depth_max": 6.0, "fem_z_frac": 0.45, "fem_y_frac": 0.5, "fem_x_frac": 0.7,
           "tib_cx": 19.0 * s, "tib_rx": 10.0 * s, "tib_ry": 15.0 * s}
    anatomy = {"scale": s, "gap": gap, "cartilage": cart, "femur": femur, "tibia": tibia, "patella": patella,
               "fibula": fibula, "soft": soft, "roi": roi,
               "meniscus": {"cx": 19.0 * s, "rx": 15.0 * s, "ry": 21.0 * s, "h": 5.0 * s},
               "plate": float(np.clip(N(0.30, 0.05), 0.18, 0.45)),
               "cortex": (np.array([0.9, 0.9, 0.6, 0.8]) * s * j(4, 0.08))}

    base = micro_design(settings.bvtv, settings.tb_th, settings.tb_sp)
    subj_wl = math.exp(N(0.0, 0.05))
    subj_th = math.exp(N(0.0, 0.06))
    bones = {}
    for name in ("femur", "tibia", "patella", "fibula"):
        wl = base["wavelength"] * subj_wl * math.exp(N(0.0, 0.03))
        th = subj_th * math.exp(N(0.0, 0.04))
        rod = math.exp(N(0.0, 0.12))
        bones[name] = {"wavelength": wl, "tile_scale": TILE_SAMPLES_PER_WAVELENGTH / wl,
                       "tp": base["tp"] * th * base["wavelength"] / wl, "tr": base["tr"] * rod,
                       "rotation": _rotation(rng), "offset": U(0.0, TILE_N, 3)}
    lf_dirs = rng.normal(size=(2, 6, 3))
    lf_dirs /= np.linalg.norm(lf_dirs, axis=-1, keepdims=True)
    lf_k = lf_dirs * (2 * math.pi / U(12.0, 30.0, (2, 6, 1)))
    micro = {"design": base, "bones": bones, "lowfreq": {"k": lf_k, "phase": U(0, 2 * math.pi, (2, 6))},
             "lf_sd": 0.07, "plate_boost": 0.2, "boost_depth_mm": 4.0,
             "boost_mean": 0.8 * (math.exp(-0.25) - math.exp(-1.5))}
    materials = {
        "ct": {"bone": N(1750, 60), "marrow": U(-90, 10), "muscle": N(45, 4), "fat": N(-100, 6), "skin": 30.0,
               "cartilage": N(105, 8), "fluid": N(10, 4), "meniscus": N(90, 8), "air": -1000.0},
        "mr": {"fluid": 1.0, "fat": N(0.93, 0.03), "marrow": N(0.85, 0.04), "cartilage": N(0.42, 0.03),
               "muscle": N(0.25, 0.02), "meniscus": 0.06, "skin": 0.4, "bone": 0.0, "air": 0.0, "scale": 1000.0},
    }

    def clipn(sd, lim, n=3):
        return np.clip(N(0.0, sd, n), -lim, lim)

    pose = {
        "global_deg": clipn(4.0, 10.0), "ct_centre": U(-40.0, 40.0, 3), "fov_offset": clipn(4.0, 8.0),
        "femur_deg": np.array([clipn(1.5, 3.0, 1)[0], clipn(0.8, 1.5, 1)[0], clipn(1.5, 3.0, 1)[0]]),
        "femur_mm": np.array([clipn(1.2, 3.0, 1)[0], clipn(1.2, 3.0, 1)[0], clipn(0.3, 0.6, 1)[0]]),
        "femur_centre": [0.0, 5.5 * s, zc],
        "tibia_deg": np.array([clipn(1.5, 3.0, 1)[0], clipn(0.8, 1.5, 1)[0], clipn(1.5, 3.0, 1)[0]]),
        "tibia_mm": np.array([clipn(1.2, 3.0, 1)[0], clipn(1.2, 3.0, 1)[0], clipn(0.3, 0.6, 1)[0]]),
        "tibia_centre": [0.0, 3.0 * s, 0.5 * (tibia["zt_med"] + tibia["zt_lat"])],
        "soft_mm": 1.2, "soft_k": rng.normal(size=(3, 3, 3)), "soft_wl": U(40.0, 90.0, (3, 3)),
        "soft_phase": U(0, 2 * math.pi, (3, 3)),
    }
    noise_seed = int(rng.integers(0, 2 ** 31 - 1))
    return _r6({"index": int(index), "seed": int(seed), "side": side, "severity": severity, "kl_grade": grade,
                "oa": int(grade >= 2), "anatomy": anatomy, "micro": micro, "oa_effects": oa, "materials": materials,
                "pose": pose, "noise_seed": noise_seed})
