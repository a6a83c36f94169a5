"""Small analytic knee pairs (CT + BFFE-like MR) with a known per-bone transform, for the tests.

This is not the project phantom (``ctsma.phantom``): it is a few-second generator of tiny volumes
whose ground truth is exact, so the registration and synthesis code can be tested without it.

Anatomy lives in the CT frame (LPS mm, z = superior): a femur (shaft + two condyles) above a
tibia (shaft + plateau + a fibula-like bump, so its rotation is observable), inside a soft-tissue
cylinder with a fat layer, with joint fluid between the bones. The MR sees the femur moved by a
global rigid transform ``G`` and the tibia by ``G`` after a flexion ``F`` about the joint centre,
so the true CT→MR map is ``G`` on the femur and ``G∘F`` on the tibia. MR contrast is BFFE-like:
cortex and air dark, marrow, fat and fluid bright, with a smooth bias field and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


def _rot(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _capsule(p, a, b, r):
    """Signed distance to a capsule from ``a`` to ``b`` with radius ``r`` (points ``p``: (..., 3))."""
    ab = np.asarray(b, float) - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1) - r


def _femur_sdf(p):
    shaft = _capsule(p, np.array([0.0, 0, 14]), np.array([0.0, 0, 80]), 9.0)
    med = np.linalg.norm(p - np.array([-6.0, 1.0, 8.0]), axis=-1) - 6.5
    lat = np.linalg.norm(p - np.array([6.0, -1.0, 8.5]), axis=-1) - 6.0
    return np.minimum(shaft, np.minimum(med, lat))


def _tibia_sdf(p):
    shaft = _capsule(p, np.array([0.0, 0, -80]), np.array([0.0, 0, -12]), 8.5)
    plateau = np.maximum(np.linalg.norm(p[..., :2] * [1.0, 1.25], axis=-1) - 13.0,
                         np.maximum(p[..., 2] - (-1.5), -8.0 - p[..., 2]))
    bump = _capsule(p, np.array([11.0, 5.0, -40]), np.array([11.0, 5.0, -9]), 3.5)
    return np.minimum(np.minimum(shaft, plateau), bump)


def _body_sdf(p):
    return np.linalg.norm(p[..., :2] / [25.0, 22.0], axis=-1) * 23.0 - 23.0


@dataclass
class KneePair:
    ct: sitk.Image
    mr: sitk.Image
    ct_bones: sitk.Image
    mr_bones: sitk.Image
    pseudo_ct_ideal: sitk.Image
    """The CT contrast sampled on the MR grid (what a perfect synthesis model would give)."""
    global_matrix: np.ndarray
    flex_matrix: np.ndarray
    landmarks: np.ndarray
    """(n, 7): bone label, CT x y z, MR x y z (LPS mm)."""

    def ct_to_mr(self, pts: np.ndarray, bone: np.ndarray) -> np.ndarray:
        """True CT→MR map of points ``pts`` (n, 3) belonging to ``bone`` labels (1 femur, 2 tibia)."""
        p = np.asarray(pts, float)
        h = np.c_[p, np.ones(len(p))]
        out = (h @ self.global_matrix.T)[:, :3]
        tib = np.asarray(bone) == 2
        out[tib] = (np.c_[p[tib], np.ones(tib.sum())] @ (self.global_matrix @ self.flex_matrix).T)[:, :3]
        return out


def _grid(size, spacing, origin):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]  # z,y,x,(i,j,k)
    return origin + idx * spacing


def _to_image(arr_zyx, spacing, origin, pixel=sitk.sitkFloat32):
    img = sitk.GetImageFromArray(arr_zyx)
    img = sitk.Cast(img, pixel)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    return img


def _tissues(p_femur, p_tibia, p_body, rng_tex):
    """Label + texture fields at points already mapped into the canonical frame of each structure."""
    fs, ts, bs = _femur_sdf(p_femur), _tibia_sdf(p_tibia), _body_sdf(p_body)
    joint = (np.linalg.norm(p_body - [0, 0, 0.5], axis=-1) < 15) & (np.abs(p_body[..., 2] - 0.5) < 5)
    tex_f = np.sin(p_femur @ rng_tex[0]) * np.sin(p_femur @ rng_tex[1])
    tex_t = np.sin(p_tibia @ rng_tex[0]) * np.sin(p_tibia @ rng_tex[1])
    return fs, ts, bs, joint, tex_f, tex_t


def _ct_values(fs, ts, bs, joint, tex_f, tex_t):
    v = np.full(fs.shape, -1000.0)
    v[bs < 0] = -100.0
    v[bs < -2.5] = 45.0
    v[joint & (bs < -2.5)] = 10.0
    for sdf, tex in ((fs, tex_f), (ts, tex_t)):
        v[sdf < 0] = 1300.0
        inner = sdf < -1.4
        v[inner] = 260.0 + 120.0 * tex[inner]
    return v


def _mr_values(fs, ts, bs, joint, tex_f, tex_t):
    v = np.full(fs.shape, 0.01)
    v[bs < 0] = 0.9
    v[bs < -2.5] = 0.33
    v[joint & (bs < -2.5)] = 0.95
    for sdf, tex in ((fs, tex_f), (ts, tex_t)):
        v[sdf < 0] = 0.04
        inner = sdf < -1.4
        v[inner] = 0.72 - 0.12 * tex[inner]
    return v


def make_knee_pair(seed: int = 0, *, ct_spacing=(0.8, 0.8, 1.0), ct_size=(64, 64, 60),
                   mr_spacing=(0.7, 0.7, 0.9), mr_size=(72, 72, 60), flex_deg: float = 7.0,
                   rot_deg: float = 5.0, shift_mm: float = 4.0, noise: float = 0.02) -> KneePair:
    """A CT/MR knee pair with known per-bone motion (sizes are (x, y, z), spacing in mm)."""
    rng = np.random.default_rng(seed)
    ct_spacing, mr_spacing = np.asarray(ct_spacing, float), np.asarray(mr_spacing, float)
    ct_origin = -0.5 * (np.asarray(ct_size) - 1) * ct_spacing
    mr_origin = -0.5 * (np.asarray(mr_size) - 1) * mr_spacing + rng.uniform(-2, 2, 3)
    g = np.eye(4)
    g[:3, :3] = _rot(rng.uniform(-rot_deg, rot_deg, 3))
    g[:3, 3] = rng.uniform(-shift_mm, shift_mm, 3)
    f = np.eye(4)
    centre = np.array([0.0, 0.0, 1.0])
    f[:3, :3] = _rot([rng.choice([-1, 1]) * flex_deg, rng.uniform(-2, 2), rng.uniform(-2, 2)])
    f[:3, 3] = centre - f[:3, :3] @ centre
    tex = rng.normal(0, 1.4, (2, 3))

    # CT: canonical frame.
    p = _grid(ct_size, ct_spacing, ct_origin)
    fields = _tissues(p, p, p, tex)
    ct = _ct_values(*fields) + rng.normal(0, 20.0, p.shape[:3])
    bones = np.zeros(p.shape[:3], np.uint8)
    bones[fields[0] < 0] = 1
    bones[fields[1] < 0] = 2

    # MR: femur/body at G^-1 y, tibia at F^-1 G^-1 y.
    q = _grid(mr_size, mr_spacing, mr_origin)
    gi, fi = np.linalg.inv(g), np.linalg.inv(f)
    qb = q @ gi[:3, :3].T + gi[:3, 3]
    qt = qb @ fi[:3, :3].T + fi[:3, 3]
    mfields = _tissues(qb, qt, qb, tex)
    mr_clean = _mr_values(*mfields)
    pct = _ct_values(*mfields)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in q.shape[:3]], indexing="ij")
    bias = 1.0 + 0.15 * xx - 0.1 * zz + 0.05 * yy * zz
    mr = np.clip(mr_clean * bias + rng.normal(0, noise, q.shape[:3]), 0, None) * 1000.0
    mbones = np.zeros(q.shape[:3], np.uint8)
    mbones[mfields[0] < 0] = 1
    mbones[mfields[1] < 0] = 2

    # Landmarks: subchondral points 1-3 mm inside each bone near the joint.
    lms = []
    for label, sdf, zsel in ((1, fields[0], p[..., 2] < 8), (2, fields[1], p[..., 2] > -6)):
        cand = np.argwhere((sdf < -1.0) & (sdf > -3.0) & zsel)
        pick = cand[rng.choice(len(cand), size=min(12, len(cand)), replace=False)]
        pts = p[tuple(pick.T)]
        lms.append(np.c_[np.full(len(pts), label), pts])
    lms = np.concatenate(lms)
    pair = KneePair(_to_image(ct, ct_spacing, ct_origin), _to_image(mr, mr_spacing, mr_origin),
                    _to_image(bones, ct_spacing, ct_origin, sitk.sitkUInt8),
                    _to_image(mbones, mr_spacing, mr_origin, sitk.sitkUInt8),
                    _to_image(pct, mr_spacing, mr_origin), g, f, np.zeros((0, 7)))
    pair.landmarks = np.c_[lms, pair.ct_to_mr(lms[:, 1:4], lms[:, 0])]
    return pair
