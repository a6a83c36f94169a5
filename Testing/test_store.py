"""Patch store: round trips, atomic finalize, patient-level splits, the batched loader."""

from __future__ import annotations

import numpy as np
import pytest

from ctsma import PARAMETERS
from ctsma.dataset import PatchStore, PatchStoreError
from ctsma.dataset.loader import CT_OFFSET_HU, CT_SCALE_HU, EpochBatchSampler, PatchDataset, _draw_flips, make_loader
from ctsma.dataset.synthetic import make_patch, plate_model


def _rows(n, subjects, start=0, split=""):
    return [{"subject": subjects[(start + i) % len(subjects)], "roi": "MTP", "centre_x": float(i), "centre_y": 0.0,
             "centre_z": 0.0, "split": split, **{f"mr_{p}": float(start + i + j) for j, p in enumerate(PARAMETERS)}}
            for i in range(n)]


def _write(tmp_path, n_batches=3, n=5, subjects=("a", "b", "c", "d", "e", "f")):
    rng = np.random.default_rng(0)
    w = PatchStore.create(tmp_path / "store", 4, 8, {"mr_normalisation": "test"}, chunk=4)
    cts, mrs = [], []
    for b in range(n_batches):
        ct = rng.normal(size=(n, 1, 4, 4, 4)).astype(np.float32)
        mr = rng.normal(size=(n, 8, 8, 8)).astype(np.float32)
        w.append(ct, mr, np.ones((n, 4, 4, 4), np.uint8), np.ones((n, 1, 8, 8, 8), np.uint8),
                 _rows(n, list(subjects), start=b * n))
        cts.append(ct)
        mrs.append(mr[:, None])
    return w, np.concatenate(cts), np.concatenate(mrs)


def test_round_trip_and_atomic_finalize(tmp_path):
    w, ct, mr = _write(tmp_path)
    d = tmp_path / "store"
    assert not (d / "patches.h5").exists() and not (d / "patches.csv").exists()  # nothing visible before finalize
    with pytest.raises(PatchStoreError):
        PatchStore(d)
    s = w.finalize()
    assert len(s) == 15 and s.ct_shape == (4, 4, 4) and s.mr_shape == (8, 8, 8)
    np.testing.assert_array_equal(s.read("ct", np.arange(15)), ct)
    np.testing.assert_array_equal(s.read("mr", [7, 2, 2, 11]), mr[[7, 2, 2, 11]])  # unsorted + repeated indices
    assert s.table["index"].tolist() == list(range(15))
    np.testing.assert_allclose(s.targets("mr")[3], [3, 4, 5, 6])
    assert np.isnan(s.targets("true")).all()
    assert s.attrs["mr_normalisation"] == "test" and s.attrs["extent_mm"] == 8.0
    assert s.summary()["n_subjects"] == 6
    reopened = PatchStore(d)  # reopens from disk, lazily
    np.testing.assert_array_equal(reopened.arrays(["mr"])["mr"], mr)
    assert [p.name for p in d.iterdir() if "partial" in p.name] == []


def test_bad_input_refused(tmp_path):
    w = PatchStore.create(tmp_path / "s", 4, 8)
    ok = dict(ct=np.zeros((2, 4, 4, 4)), mr=np.zeros((2, 8, 8, 8)), ct_mask=np.ones((2, 4, 4, 4)),
              mr_mask=np.ones((2, 8, 8, 8)))
    with pytest.raises(PatchStoreError, match="expected"):
        w.append(**{**ok, "mr": np.zeros((2, 4, 4, 4))}, rows=_rows(2, ["a"]))
    with pytest.raises(PatchStoreError, match="NaN"):
        w.append(**{**ok, "ct": np.full((2, 4, 4, 4), np.nan)}, rows=_rows(2, ["a"]))
    with pytest.raises(PatchStoreError, match="lacks"):
        w.append(**ok, rows=[{"subject": "a"}] * 2)
    with pytest.raises(PatchStoreError, match="unknown column"):
        w.append(**ok, rows=[dict(r, colour="red") for r in _rows(2, ["a"])])
    w.abort()
    assert list((tmp_path / "s").iterdir()) == []
    with pytest.raises(PatchStoreError, match="no patches"):
        PatchStore.create(tmp_path / "t", 4, 8).finalize()



def test_a_table_value_that_is_not_a_number_is_named(tmp_path):
    """A value of patches.csv edited by hand (text in a number's column) was pandas' 'could not convert string to
    float' traceback, raised by `ctsma train` and `evaluate` when they read the targets."""
    w, _, _ = _write(tmp_path)
    d = w.finalize().dir
    csv = d / "patches.csv"
    lines = csv.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[4].split(",")  # line 5 of the file, as an editor numbers it
    row[head.index("mr_Tb.Th")] = "n/a"
    csv.write_text("\n".join(lines[:4] + [",".join(row)] + lines[5:]) + "\n")
    with pytest.raises(PatchStoreError, match=r"column mr_Tb.Th holds 'n/a' on line 5 \(the header is line 1\), not"):
        PatchStore(d)

def test_patient_split_never_splits_a_patient(tmp_path):
    w, _, _ = _write(tmp_path, n_batches=4, subjects=tuple("abcdefghij"))
    s = w.finalize()
    subj = s.table["subject"].to_numpy()
    sp = s.patient_split(0.3, 0.25, seed=1)
    parts = [set(subj[sp.train]), set(subj[sp.val]), set(subj[sp.test])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(sp.train) + len(sp.val) + len(sp.test) == len(s)
    assert len(parts[2]) == 3 and len(parts[1]) >= 1
    # k-fold: every patient is in exactly one test fold
    tests = [set(subj[s.patient_split(k=5, fold=f, seed=2).test]) for f in range(5)]
    assert sorted(x for t in tests for x in t) == sorted(set(subj))
    assert s.patient_split(seed=3).subjects == s.patient_split(seed=3).subjects  # reproducible
    with pytest.raises(PatchStoreError, match="k-fold"):
        s.patient_split(k=20, fold=0)


def test_stored_split_used_and_checked(tmp_path):
    w = PatchStore.create(tmp_path / "s", 4, 8)
    z4, z8 = np.zeros((3, 4, 4, 4)), np.zeros((3, 8, 8, 8))
    for subj, part in (("a", "train"), ("b", "val"), ("c", "test")):
        w.append(z4, z8, z4, z8, _rows(3, [subj], split=part))
    s = w.finalize()
    sp = s.patient_split()
    assert sp.subjects == {"train": ["a"], "val": ["b"], "test": ["c"]}
    # patient folds asked for explicitly win over the stored split: each patient is tested once in 3 folds
    tests = [s.patient_split(k=3, fold=f, val_fraction=0.0).subjects["test"] for f in range(3)]
    assert sorted(x for t in tests for x in t) == ["a", "b", "c"]
    w = PatchStore.create(tmp_path / "m", 4, 8)
    w.append(z4, z8, z4, z8, _rows(3, ["a"], split="train"))
    w.append(z4, z8, z4, z8, _rows(3, ["a"], split="test"))
    with pytest.raises(PatchStoreError, match="mixes patients"):
        w.finalize().patient_split()


def test_loader_batches_are_paired_deterministic_and_augmented_together(tmp_path):
    # CT = 2x2x2 block mean of MR, so any flip/permutation applied to both keeps ct == blockmean(mr)
    rng = np.random.default_rng(1)
    n = 24
    mr = rng.normal(size=(n, 1, 8, 8, 8)).astype(np.float32)
    ct = mr.reshape(n, 1, 4, 2, 4, 2, 4, 2).mean(axis=(3, 5, 7)) * CT_SCALE_HU + CT_OFFSET_HU
    w = PatchStore.create(tmp_path / "s", 4, 8)
    w.append(ct, mr, np.ones_like(ct, np.uint8), np.ones_like(mr, np.uint8), _rows(n, list("abcdef")))
    s = w.finalize()
    ds = PatchDataset(s, np.arange(n), augment=True)
    loader = make_loader(ds, 5, shuffle=True, seed=3)
    seen, flipped = [], 0
    for b in loader:
        blk = b["mr"].numpy().reshape(-1, 1, 4, 2, 4, 2, 4, 2).mean(axis=(3, 5, 7))
        np.testing.assert_allclose(b["ct"].numpy(), blk, atol=1e-5)
        flipped += int(not np.allclose(b["mr"].numpy(), mr[b["index"].numpy()]))
        np.testing.assert_allclose(b["y"].numpy()[:, 0], s.targets()[b["index"].numpy(), 0])
        seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(n)) and flipped > 0
    order1 = [b["index"].tolist() for b in make_loader(ds, 5, shuffle=True, seed=3)]
    assert order1 == [b["index"].tolist() for b in make_loader(ds, 5, shuffle=True, seed=3)]
    sampler = EpochBatchSampler(n, 5, shuffle=True, seed=3)
    sampler.set_epoch(1)
    assert [list(b) for b, _ in sampler] != [list(b) for b, _ in EpochBatchSampler(n, 5, shuffle=True, seed=3)]
    # DDP sharding: the ranks see disjoint batches
    r0 = {i for b, _ in EpochBatchSampler(n, 4, shuffle=True, rank=0, world_size=2) for i in b}
    r1 = {i for b, _ in EpochBatchSampler(n, 4, shuffle=True, rank=1, world_size=2) for i in b}
    assert not r0 & r1 and len(r0 | r1) == n
    # without drop_last (validation) every index once over the ranks, even when the batches do not divide evenly
    # (1000 in batches of 128 made 8 for 3 ranks: the last two, 232 indices, were cut to give each rank 2)
    shards = [[i for b, _ in EpochBatchSampler(1000, 128, shuffle=False, rank=r, world_size=3) for i in b]
              for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(1000)) and [len(s) for s in shards] == [384, 360, 256]


def test_loader_mask_channel_follows_its_image_through_every_flip_and_permutation(tmp_path):
    # a reference written sample by sample: normalise, stack image and mask, flip the drawn axes, permute
    rng = np.random.default_rng(4)
    n = 40
    mr = rng.normal(size=(n, 1, 8, 8, 8)).astype(np.float32)
    ct = (rng.normal(size=(n, 1, 4, 4, 4)) * 300 + 100).astype(np.float32)
    mr_mask = (rng.random(mr.shape) < 0.5).astype(np.uint8)
    ct_mask = (rng.random(ct.shape) < 0.5).astype(np.uint8)
    w = PatchStore.create(tmp_path / "s", 4, 8)
    w.append(ct, mr, ct_mask, mr_mask, _rows(n, list("abcd")))
    s = w.finalize()
    ds = PatchDataset(s, np.arange(n), masks=True, augment=True)
    idx = np.array([5, 3, 17, 0, 39, 22, 8, 11, 30, 2, 14, 27])
    for b in range(12):
        seed = (7, 1, b, 0)
        batch = ds[(idx, seed)]
        flips, perm = _draw_flips(len(idx), np.random.default_rng(seed))
        for name, img, mask, (off, scale) in (("ct", ct, ct_mask, (CT_OFFSET_HU, CT_SCALE_HU)),
                                              ("mr", mr, mr_mask, (0.0, 1.0))):
            for k, i in enumerate(idx):
                x = np.concatenate([(img[i] - np.float32(off)) / np.float32(scale), mask[i].astype(np.float32)])
                for ax in range(3):
                    if flips[k, ax]:
                        x = np.flip(x, axis=1 + ax)
                np.testing.assert_array_equal(batch[name][k].numpy(), x.transpose(0, *(1 + perm)))
    plain = ds[(idx, None)]  # no seed: no augmentation, image then mask
    np.testing.assert_array_equal(plain["mr"].numpy()[:, 1], mr_mask[idx, 0])
    np.testing.assert_allclose(plain["ct"].numpy()[:, 0], (ct[idx, 0] - CT_OFFSET_HU) / CT_SCALE_HU, rtol=1e-6)


def test_plate_model_on_parallel_plates():
    b = np.zeros((32, 32, 32), bool)
    for z in range(0, 32, 8):
        b[z + 3:z + 5] = True  # plates 2 voxels thick, period 8, spacing 0.1 mm, none touching the border
    bvtv, th, sp, tbn = plate_model(b, 0.1)
    assert bvtv == pytest.approx(0.25)
    assert th == pytest.approx(0.2) and sp == pytest.approx(0.6) and tbn == pytest.approx(1.25)


def test_synthetic_patch_is_a_paired_toy_problem():
    ct, mr, truth, mref = make_patch(np.random.default_rng(0), 2.0, 0.3)
    assert ct.shape == (16, 16, 16) and mr.shape == (32, 32, 32)
    assert truth[0] == pytest.approx(0.3, abs=0.01)
    # bone is dark in MR and bright in CT: the two are anti-correlated at the CT grid
    mr_ct = mr.reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    assert np.corrcoef(mr_ct.ravel(), ct.ravel())[0, 1] < -0.3


def test_direct_ct_morphometry_measures_resolved_plates_in_mm(tmp_path):
    """The study table's "morphometry directly on CT" comparator: on CT patches that do resolve their structure
    (bone plates 4 voxels of 0.5 mm thick every 12 voxels, 1000 HU in 0 HU marrow, a little noise) its Otsu
    threshold and the morphometry give BV/TV 1/3, Tb.Th 2 mm, Tb.Sp 4 mm and Tb.N 1/6 per mm, in the store's
    spacing; a given threshold replaces Otsu's."""
    from ctsma.evaluation.regression import ct_direct

    rng = np.random.default_rng(0)
    z = np.arange(24)[:, None, None]
    offsets = (1, 3, 1, 3)  # where the patch's faces cut the plates so that the cut parts read as whole ones (the
    n = len(offsets)        # morphometry takes a patch face as a cut, not as a surface)
    ct = np.stack([np.broadcast_to(np.where((z + k) % 12 < 4, 1000.0, 0.0), (24, 24, 24)) for k in offsets])
    ct = (ct + rng.normal(0, 20, ct.shape)).astype(np.float32)
    w = PatchStore.create(tmp_path / "s", 24, 8, {"ct_spacing_mm": 0.5})
    w.append(ct, np.zeros((n, 8, 8, 8)), np.ones((n, 24, 24, 24)), np.ones((n, 8, 8, 8)), _rows(n, ["a", "b"]))
    store = w.finalize()
    values, info = ct_direct(store, np.arange(n))
    assert info["method"] == "otsu" and 80 < info["threshold_hu"] < 920 and info["spacing_mm"] == 0.5  # in the gap
    np.testing.assert_allclose(values, np.tile([1 / 3, 2.0, 4.0, 1 / 6], (n, 1)), rtol=0.02)
    values, info = ct_direct(store, np.arange(n), threshold_hu=500.0)
    assert info["method"] == "given" and info["threshold_hu"] == 500.0
    np.testing.assert_allclose(values[:, 0], 1 / 3, rtol=0.02)
