"""The analytic knee: tissues, bones, subchondral ROIs and microstructure design fields.

Everything is a closed-form function of position in the anatomical (= MR) frame, in LPS mm,
so any point of any grid can be evaluated exactly: the MR grid, CT voxel centres mapped
through the ground-truth transform, or a fine truth box. The knee centre (middle of the
joint space) is the origin; +z is superior, +y posterior, and the *canonical* x axis
``xc = m * x`` points medially (``m = +1`` for a right knee, ``-1`` for a left knee).

Why hand-written numba: several million points per image must be classified in about a second
on one core; the shapes are smooth signed-distance primitives (ellipsoids, an elliptic cylinder,
smooth unions), which numpy evaluates an order of magnitude slower because of temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .. import BONES

# Tissue codes (label values). Bones follow ctsma.BONES; cartilage and soft tissues from 10 up.
TISSUES = {
    "air": 0, **BONES,
    "femoral_cartilage": 10, "tibial_cartilage": 11, "patellar_cartilage": 12,
    "fluid": 20, "meniscus": 21, "fat": 22, "muscle": 23, "skin": 24,
}
BONE_NAMES = tuple(BONES)  # bone index 0..3 = label 1..4

# ---- flat parameter vector layout (numba reads these module constants at compile time) -------
_LAYOUT = [
    ("M", 1), ("SEV", 1),
    ("F_MED_C", 3), ("F_MED_A", 3), ("F_LAT_C", 3), ("F_LAT_A", 3), ("F_BLK_C", 3), ("F_BLK_A", 3),
    ("F_ZCUT", 1), ("F_TRO_Y", 1), ("F_TRO_Z", 1), ("F_TRO_X", 1),
    ("T_AX", 1), ("T_AY", 1), ("T_Y0", 1), ("T_ZTM", 1), ("T_ZTL", 1), ("T_EMH", 1), ("T_EMW", 1),
    ("P_C", 3), ("P_A", 3), ("FI_C", 3), ("FI_A", 3),
    ("C_FM", 1), ("C_FL", 1), ("C_TM", 1), ("C_TL", 1), ("C_P", 1),
    ("S_AX", 1), ("S_AY", 1), ("S_YC", 1), ("S_FAT", 1), ("S_SKIN", 1),
    ("S_HOF_C", 3), ("S_HOF_A", 3), ("S_POP_C", 3), ("S_POP_A", 3),
    ("MN_CX", 1), ("MN_RX", 1), ("MN_RY", 1), ("MN_H", 1),
    ("PLATE", 1), ("CORTEX", 4),
    ("R_DMIN", 1), ("R_DMAX", 1), ("R_FZ", 1), ("R_FY", 1), ("R_FX", 1), ("R_TCX", 1), ("R_TRX", 1), ("R_TRY", 1),
    ("OA_TH", 1), ("OA_WIDEN", 1), ("OA_PL", 1), ("OA_LW", 1), ("OA_DEPTH", 1),
    ("TP0", 4), ("TR0", 4), ("LF_SD", 1), ("BOOST", 1), ("BOOST_D", 1), ("BOOST_MEAN", 1),
    ("LF_K", 36), ("LF_PH", 12),
]
_off = 0
for _name, _n in _LAYOUT:
    globals()[f"I_{_name}"] = _off
    _off += _n
N_PARAMS = _off


def pack_params(p: dict) -> np.ndarray:
    """The subject dict (``subject.sample_subject``) as the flat vector the kernels read."""
    a, mi, oa = p["anatomy"], p["micro"], p["oa_effects"]
    f, t, s, c, r, mn = a["femur"], a["tibia"], a["soft"], a["cartilage"], a["roi"], a["meniscus"]
    vals = {
        "M": 1.0 if p["side"] == "R" else -1.0, "SEV": p["severity"],
        "F_MED_C": f["med_c"], "F_MED_A": f["med_a"], "F_LAT_C": f["lat_c"], "F_LAT_A": f["lat_a"],
        "F_BLK_C": f["block_c"], "F_BLK_A": f["block_a"], "F_ZCUT": f["block_zcut"], "F_TRO_Y": f["troch_y"],
        "F_TRO_Z": f["troch_z"], "F_TRO_X": f["troch_x"],
        "T_AX": t["ax"], "T_AY": t["ay"], "T_Y0": t["y0"], "T_ZTM": t["zt_med"], "T_ZTL": t["zt_lat"],
        "T_EMH": t["emin_h"], "T_EMW": t["emin_w"],
        "P_C": a["patella"]["c"], "P_A": a["patella"]["a"], "FI_C": a["fibula"]["c"], "FI_A": a["fibula"]["a"],
        "C_FM": c["fem_med"], "C_FL": c["fem_lat"], "C_TM": c["tib_med"], "C_TL": c["tib_lat"], "C_P": c["pat"],
        "S_AX": s["ax"], "S_AY": s["ay"], "S_YC": s["yc"], "S_FAT": s["fat"], "S_SKIN": s["skin"],
        "S_HOF_C": s["hoffa_c"], "S_HOF_A": s["hoffa_a"], "S_POP_C": s["popl_c"], "S_POP_A": s["popl_a"],
        "MN_CX": mn["cx"], "MN_RX": mn["rx"], "MN_RY": mn["ry"], "MN_H": mn["h"],
        "PLATE": a["plate"], "CORTEX": a["cortex"],
        "R_DMIN": r["depth_min"], "R_DMAX": r["depth_max"], "R_FZ": r["fem_z_frac"], "R_FY": r["fem_y_frac"],
        "R_FX": r["fem_x_frac"], "R_TCX": r["tib_cx"], "R_TRX": r["tib_rx"], "R_TRY": r["tib_ry"],
        "OA_TH": oa["th_gain"], "OA_WIDEN": oa["rod_widen"], "OA_PL": oa["plate_gain"], "OA_LW": oa["lateral_w"],
        "OA_DEPTH": oa["depth_mm"],
        "TP0": [mi["bones"][b]["tp"] for b in BONE_NAMES], "TR0": [mi["bones"][b]["tr"] for b in BONE_NAMES],
        "LF_SD": mi["lf_sd"], "BOOST": mi["plate_boost"], "BOOST_D": mi["boost_depth_mm"],
        "BOOST_MEAN": mi["boost_mean"],
        "LF_K": np.asarray(mi["lowfreq"]["k"]).ravel(), "LF_PH": np.asarray(mi["lowfreq"]["phase"]).ravel(),
    }
    out = np.zeros(N_PARAMS)
    for name, n in _LAYOUT:
        v = np.atleast_1d(np.asarray(vals[name], dtype=np.float64)).ravel()
        if v.size != n:
            raise ValueError(f"parameter {name} has {v.size} values, expected {n}")
        o = globals()[f"I_{name}"]
        out[o:o + n] = v
    return out


# ---- scalar primitives ---------------------------------------------------------------------------
@numba.njit(cache=True, inline="always")
def _ell(px, py, pz, P, ic, ia):  # pragma: no cover - numba
    qx = (px - P[ic]) / P[ia]
    qy = (py - P[ic + 1]) / P[ia + 1]
    qz = (pz - P[ic + 2]) / P[ia + 2]
    k0 = np.sqrt(qx * qx + qy * qy + qz * qz)
    rx = qx / P[ia]
    ry = qy / P[ia + 1]
    rz = qz / P[ia + 2]
    k1 = np.sqrt(rx * rx + ry * ry + rz * rz) + 1e-12
    return k0 * (k0 - 1.0) / k1


@numba.njit(cache=True, inline="always")
def _ell2(x, y, ax, ay):  # pragma: no cover - numba
    k0 = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    k1 = np.sqrt((x / (ax * ax)) ** 2 + (y / (ay * ay)) ** 2) + 1e-12
    return k0 * (k0 - 1.0) / k1


@numba.njit(cache=True, inline="always")
def _smin(a, b, k):  # pragma: no cover - numba
    h = min(max(0.5 + 0.5 * (b - a) / k, 0.0), 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


@numba.njit(cache=True, inline="always")
def _ss(e0, e1, x):  # pragma: no cover - numba
    t = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@numba.njit(cache=True)
def _tibia_top(xc, y, P):  # pragma: no cover - numba
    zt = P[I_T_ZTL] + (P[I_T_ZTM] - P[I_T_ZTL]) * _ss(-6.0, 6.0, xc)
    w = P[I_T_EMW]
    return zt + P[I_T_EMH] * np.exp(-0.5 * (xc / w) ** 2 - 0.5 * ((y - P[I_T_Y0]) / (2.0 * w)) ** 2)


@numba.njit(cache=True)
def _sdfs(xc, y, z, P, out):  # pragma: no cover - numba
    cm = _ell(xc, y, z, P, I_F_MED_C, I_F_MED_A)
    cl = _ell(xc, y, z, P, I_F_LAT_C, I_F_LAT_A)
    blk = -_smin(-_ell(xc, y, z, P, I_F_BLK_C, I_F_BLK_A), -(P[I_F_ZCUT] - z), 3.0)
    out[0] = _smin(_smin(cm, cl, 1.0), blk, 4.0)
    taper = 1.0 - 0.38 * _ss(0.0, 35.0, (P[I_T_ZTL] - 10.0) - z)
    side = _ell2(xc, y - P[I_T_Y0], P[I_T_AX] * taper, P[I_T_AY] * taper)
    dt = -_smin(-side, -(z - _tibia_top(xc, y, P)), 1.5)
    out[1] = dt
    out[2] = _ell(xc, y, z, P, I_P_C, I_P_A)
    out[3] = max(_ell(xc, y, z, P, I_FI_C, I_FI_A), -(dt - 1.0))


@numba.njit(cache=True)
def _femur_art(xc, y, z, P):  # pragma: no cover - numba
    wm = _ss(-6.0, 6.0, xc)
    cx = P[I_F_LAT_C] + (P[I_F_MED_C] - P[I_F_LAT_C]) * wm
    cy = P[I_F_LAT_C + 1] + (P[I_F_MED_C + 1] - P[I_F_LAT_C + 1]) * wm
    zc = P[I_F_LAT_C + 2] + (P[I_F_MED_C + 2] - P[I_F_LAT_C + 2]) * wm
    ax = P[I_F_LAT_A] + (P[I_F_MED_A] - P[I_F_LAT_A]) * wm
    az = P[I_F_LAT_A + 2] + (P[I_F_MED_A + 2] - P[I_F_LAT_A + 2]) * wm
    zlim = zc + 0.45 * az * _ss(-5.0, 15.0, y - cy)
    cond = _ss(0.0, 3.0, zlim - z) * _ss(0.0, 2.0, 0.9 * ax - abs(xc - cx))
    tro = _ss(0.0, 3.0, P[I_F_TRO_Y] - y) * _ss(0.0, 3.0, P[I_F_TRO_Z] - z) * _ss(0.0, 3.0, P[I_F_TRO_X] - abs(xc))
    return max(cond, tro)


@numba.njit(cache=True)
def _tibia_art(xc, y, z, zt, P):  # pragma: no cover - numba
    inner = -_ell2(xc, y - P[I_T_Y0], P[I_T_AX] - 2.0, P[I_T_AY] - 2.0)
    return _ss(0.0, 3.0, inner) * _ss(-6.0, -3.0, z - zt) * _ss(2.0, 5.0, abs(xc))


@numba.njit(cache=True)
def _eval(pts, P, design_margin, tissue, soft, bone, near, dist, shell, roi, tp, tr, tw):  # pragma: no cover
    d = np.zeros(4)
    for i in range(pts.shape[0]):
        xc = P[I_M] * pts[i, 0]
        y = pts[i, 1]
        z = pts[i, 2]
        # outside the skin: air, far from every bone (all bones lie inside the soft-tissue envelope)
        inner = _smin(_ell2(xc, y - P[I_S_YC], P[I_S_AX], P[I_S_AY]), _ell(xc, y, z, P, I_P_C, I_P_A) - 1.5, 4.0)
        if inner >= P[I_S_FAT] + P[I_S_SKIN]:
            tissue[i] = 0
            soft[i] = 0
            bone[i] = -1
            near[i] = 0
            dist[i] = 100.0
            shell[i] = 0.0
            roi[i] = 0
            tp[i] = 0.0
            tr[i] = 0.0
            tw[i] = 0.0
            continue
        _sdfs(xc, y, z, P, d)
        nb = 0
        for b in range(1, 4):
            if d[b] < d[nb]:
                nb = b
        dm = d[nb]
        wm = _ss(-6.0, 6.0, xc)
        ow = P[I_OA_LW] + (1.0 - P[I_OA_LW]) * wm
        zt = _tibia_top(xc, y, P)
        fa = _femur_art(xc, y, z, P)
        ta = _tibia_art(xc, y, z, zt, P)
        pa = _ss(0.0, 3.0, y - P[I_P_C + 1])
        cf = (P[I_C_FL] + (P[I_C_FM] - P[I_C_FL]) * wm) * fa
        ct = (P[I_C_TL] + (P[I_C_TM] - P[I_C_TL]) * wm) * ta
        cp = P[I_C_P] * pa
        # soft tissues (the label a point would have without bone)
        lab = 24
        if inner < P[I_S_FAT]:
            lab = 22
        if inner < 0.0:
            lab = 23
            if _ell(xc, y, z, P, I_S_HOF_C, I_S_HOF_A) < 0.0 or _ell(xc, y, z, P, I_S_POP_C, I_S_POP_A) < 0.0:
                lab = 22
        in_plat = _ell2(xc, y - P[I_T_Y0], P[I_T_AX], P[I_T_AY]) < 0.0
        # joint space: a thin fluid film centrally, menisci in the peripheral wedges (not in the notch)
        sx = 1.0 if xc >= 0.0 else -1.0
        r = np.sqrt(((xc - sx * P[I_MN_CX]) / P[I_MN_RX]) ** 2 + ((y - P[I_T_Y0]) / P[I_MN_RY]) ** 2)
        if in_plat and abs(xc) > 6.0 and d[1] > ct and d[0] > cf:
            if r > 0.45 and z < zt + ct + 1.0 + P[I_MN_H] * _ss(0.45, 1.0, r):
                lab = 21
            elif z < zt + ct + 1.0:
                lab = 20
        if d[0] >= 0.0 and d[0] < cf:
            lab = 10
        if d[1] >= 0.0 and d[1] < ct:
            lab = 11
        if d[2] >= 0.0 and d[2] < cp:
            lab = 12
        soft[i] = lab
        dist[i] = dm
        near[i] = nb
        if dm < 0.0:
            bone[i] = nb
            tissue[i] = nb + 1
        else:
            bone[i] = -1
            tissue[i] = lab
        # shell: subchondral plate under cartilage, cortex elsewhere
        art = 0.0
        if nb == 0:
            art = fa
        elif nb == 1:
            art = ta
        elif nb == 2:
            art = pa
        plate = P[I_PLATE] * (1.0 + P[I_OA_PL] * P[I_SEV] * ow)
        shell[i] = art * plate + (1.0 - art) * P[I_CORTEX + nb]
        depth = max(-dm, 0.0)
        # subchondral ROIs
        rv = 0
        if dm < 0.0 and depth >= P[I_R_DMIN] and depth <= P[I_R_DMAX]:
            if nb == 0:
                for k in range(2):
                    ic = I_F_MED_C if k == 0 else I_F_LAT_C
                    ia = I_F_MED_A if k == 0 else I_F_LAT_A
                    if (z - P[ic + 2] < -P[I_R_FZ] * P[ia + 2] and abs(y - P[ic + 1]) < P[I_R_FY] * P[ia + 1]
                            and abs(xc - P[ic]) < P[I_R_FX] * P[ia]):
                        rv = k + 1
            elif nb == 1 and z > zt - P[I_R_DMAX] - 1.0:
                for k in range(2):
                    s = 1.0 if k == 0 else -1.0
                    e = ((xc - s * P[I_R_TCX]) / P[I_R_TRX]) ** 2 + ((y - P[I_T_Y0]) / P[I_R_TRY]) ** 2
                    if e < 1.0:
                        rv = k + 3
        roi[i] = rv
        # microstructure design (plate and rod thresholds), near and inside bone
        if dm < design_margin:
            lf0 = 0.0
            lf1 = 0.0
            for k in range(6):
                a0 = I_LF_K + 3 * k
                a1 = I_LF_K + 18 + 3 * k
                lf0 += np.cos(P[a0] * pts[i, 0] + P[a0 + 1] * y + P[a0 + 2] * z + P[I_LF_PH + k])
                lf1 += np.cos(P[a1] * pts[i, 0] + P[a1 + 1] * y + P[a1 + 2] * z + P[I_LF_PH + 6 + k])
            lf0 *= np.sqrt(2.0 / 6.0)
            lf1 *= np.sqrt(2.0 / 6.0)
            dw = np.exp(-depth / P[I_OA_DEPTH])
            e = P[I_SEV] * ow * dw  # local OA exposure
            boost = 1.0 + P[I_BOOST] * (np.exp(-depth / P[I_BOOST_D]) - P[I_BOOST_MEAN])
            thick = 1.0 + P[I_OA_TH] * e
            tp[i] = P[I_TP0 + nb] * boost * np.exp(P[I_LF_SD] * lf0) * thick
            tr[i] = P[I_TR0 + nb] * np.exp(P[I_LF_SD] * lf1) * thick
            tw[i] = tr[i] * (1.0 + P[I_OA_WIDEN] * e)
        else:
            tp[i] = 0.0
            tr[i] = 0.0
            tw[i] = 0.0


@numba.njit(cache=True)
def _sdf_many(pts, P, out):  # pragma: no cover - numba
    d = np.zeros(4)
    for i in range(pts.shape[0]):
        _sdfs(P[I_M] * pts[i, 0], pts[i, 1], pts[i, 2], P, d)
        for b in range(4):
            out[b, i] = d[b]


@dataclass
class FieldFrames:
    """Per-bone mapping of MR mm to texture-tile samples: ``u = A @ x + o``; ``gmm`` = RMS |grad f| per mm."""
    A: np.ndarray    # (4, 3, 3)
    o: np.ndarray    # (4, 3)
    gmm: np.ndarray  # (4,)


class KneeModel:
    """Closed-form anatomy of one knee, built from the subject parameters (see ``subject.py``)."""

    def __init__(self, p: dict):
        from .texture import tile
        self.p = p
        self.P = pack_params(p)
        _, g = tile()
        A, o, gmm = [], [], []
        for name in BONE_NAMES:
            b = p["micro"]["bones"][name]
            A.append(np.asarray(b["rotation"], dtype=np.float64) * b["tile_scale"])
            o.append(np.asarray(b["offset"], dtype=np.float64))
            gmm.append(float(np.mean(g)) * b["tile_scale"])
        self.fields = FieldFrames(np.array(A), np.array(o), np.array(gmm))

    def bone_sdfs(self, pts: np.ndarray) -> np.ndarray:
        """Signed distances (4, n) to femur, tibia, patella and fibula (negative inside)."""
        pts = np.ascontiguousarray(pts, dtype=np.float64)
        out = np.empty((4, len(pts)))
        _sdf_many(pts, self.P, out)
        return out

    def evaluate(self, pts: np.ndarray, *, design_margin: float = 1.0) -> dict:
        """Evaluate every quantity at points ``pts`` (n, 3), MR-frame mm.

        ``tissue``: label codes of :data:`TISSUES` (bone as its bone label); ``soft``: the label the
        point would have without bone; ``bone``: bone index 0..3 or -1; ``near``: nearest bone;
        ``dist``: signed distance to the nearest bone (mm); ``shell``: cortex/plate thickness of that
        bone there; ``roi``: 0 or 1..4; ``tp``/``tr``/``tw``: plate, rod and rod-width thresholds
        (field units) where ``dist < design_margin``, else 0.
        """
        pts = np.ascontiguousarray(pts, dtype=np.float64)
        n = len(pts)
        out = {"tissue": np.empty(n, np.uint8), "soft": np.empty(n, np.uint8), "bone": np.empty(n, np.int8),
               "near": np.empty(n, np.int8), "dist": np.empty(n, np.float32), "shell": np.empty(n, np.float32),
               "roi": np.empty(n, np.uint8), "tp": np.empty(n, np.float32), "tr": np.empty(n, np.float32),
               "tw": np.empty(n, np.float32)}
        _eval(pts, self.P, float(design_margin), out["tissue"], out["soft"], out["bone"], out["near"], out["dist"],
              out["shell"], out["roi"], out["tp"], out["tr"], out["tw"])
        return out
