"""Networks, distillation losses, configs and model files (no training here; see test_train.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctsma import PARAMETERS
from ctsma.errors import ConfigError, ModelFileError, UserError
from ctsma.modelfile import save_model
from ctsma.models import load_student, load_teacher, load_train_config, predict
from ctsma.models.distill import FeatureDistillation, attention_map
from ctsma.models.export import build_meta, export_model
from ctsma.models.networks import PatchRegressor


def test_teacher_and_student_feature_maps_align():
    t, s = PatchRegressor(1, 32, (4, 8, 8, 12)), PatchRegressor(2, 16, (6, 8, 10, 12))
    yt, ft = t(torch.randn(2, 1, 32, 32, 32), return_features=True)
    ys, fs = s(torch.randn(2, 2, 16, 16, 16), return_features=True)
    assert yt.shape == ys.shape == (2, 4)
    for name in ("stem", "stage1", "stage2", "stage3"):
        assert ft[name].shape[2:] == fs[name].shape[2:]  # same spatial size at every stage
        assert (ft[name].shape[1], ft[name].shape[2]) == t.feature_shapes()[name]
        assert (fs[name].shape[1], fs[name].shape[2]) == s.feature_shapes()[name]


def test_conv_stem_keeps_the_feature_maps_and_round_trips_through_a_model_file(tmp_path):
    """``stem="conv"``: two 3³ stride-2 convolutions for the MR 32³ (one for the CT 16³, as ``patchify``), the
    same feature-map sizes as the default stem, recorded in the model file and rebuilt from it."""
    from ctsma.models.networks import build_network

    torch.manual_seed(0)
    t = PatchRegressor(1, 32, (4, 8, 8, 12), stem="conv")
    convs = [m for m in t.stem if isinstance(m, torch.nn.Conv3d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3, 3), (2, 2, 2))] * 2
    _, ft = t(torch.randn(2, 1, 32, 32, 32), return_features=True)
    default = PatchRegressor(1, 32, (4, 8, 8, 12))
    assert [c.kernel_size for c in default.stem if isinstance(c, torch.nn.Conv3d)] == [(4, 4, 4)]
    assert "stem" not in default.arch                        # older model files, without the key, read the same
    for name in ("stem", "stage1", "stage2", "stage3"):
        assert (ft[name].shape[1], ft[name].shape[2]) == t.feature_shapes()[name] == default.feature_shapes()[name]
    s = PatchRegressor(1, 16, (4, 8, 8, 12), stem="conv")    # CT 16³: one stride-2 step either way
    assert str(s.stem) == str(PatchRegressor(1, 16, (4, 8, 8, 12)).stem)
    assert build_network(t.arch).arch == t.arch == {**default.arch, "stem": "conv"}
    meta = build_meta("teacher", t, modality="mr", spacing_mm=0.25, extent_mm=8, masks=False, intensity_offset=0,
                      intensity_scale=1, target="mr", y_mean=(0.3, 0.2, 0.5, 1.5), y_sd=(0.1, 0.05, 0.1, 0.3),
                      training={"n": 1}, metrics={"val_loss": 0.5})
    path = export_model(tmp_path / "t.safetensors", t, meta)
    model, got = load_teacher(path)
    assert got["arch"]["stem"] == "conv"
    x = np.random.default_rng(0).random((3, 32, 32, 32)).astype(np.float32)
    t.eval()
    with torch.no_grad():
        want = t(torch.from_numpy(x[:, None])).numpy() * np.array([0.1, 0.05, 0.1, 0.3]) + [0.3, 0.2, 0.5, 1.5]
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-5, atol=1e-6)
    # a stem this version does not know is a clear model-file error, not a traceback
    from ctsma.modelfile import load_model
    tensors, meta = load_model(path)
    meta.pop("_sha256")
    meta["arch"]["stem"] = "pyramid"
    bad = save_model(tmp_path / "bad.safetensors", tensors, meta, kind="teacher")
    with pytest.raises(ModelFileError, match="cannot build.*pyramid"):
        load_teacher(bad)
    for size in (24, 34, 37):                                 # 34 and 37 would halve to 9 or 10, not 8
        with pytest.raises(ValueError, match="power of two"):
            PatchRegressor(1, size, (4, 8, 8, 12), stem="conv")
    meta["arch"]["widths"] = 16                              # a malformed record: also a model-file error
    bad = save_model(tmp_path / "bad2.safetensors", tensors, meta, kind="teacher")
    with pytest.raises(ModelFileError, match="cannot build"):
        load_teacher(bad)


@pytest.mark.parametrize("size,stem", [(16, "patchify"), (17, "patchify"), (15, "patchify"), (24, "patchify"),
                                       (33, "patchify"), (32, "conv"), (64, "conv"), (17, "conv")])
def test_declared_feature_shapes_are_the_real_ones(size, stem):
    """Distillation sizes its adapters from ``feature_shapes``: it must match the network at any patch size."""
    net = PatchRegressor(1, size, (4, 4, 8, 8), stem=stem)
    _, feats = net(torch.randn(2, 1, size, size, size), return_features=True)
    assert {k: (v.shape[1], v.shape[2]) for k, v in feats.items()} == net.feature_shapes()


def test_input_pool_reads_the_patch_at_a_coarser_voxel_and_round_trips(tmp_path):
    """``input_pool=2``: the MR 32³ is average-pooled to 16³ (the CT's voxel) before the stem; the feature maps keep
    the sizes that distillation needs, and the setting is recorded in the model file."""
    from ctsma.models.networks import build_network

    torch.manual_seed(0)
    t = PatchRegressor(1, 32, (4, 8, 8, 12), input_pool=2)
    s = PatchRegressor(1, 16, (4, 8, 8, 12))
    x = torch.randn(2, 1, 32, 32, 32)
    yt, ft = t(x, return_features=True)
    assert t.feature_shapes() == s.feature_shapes()
    assert {k: (v.shape[1], v.shape[2]) for k, v in ft.items()} == t.feature_shapes()
    # the network sees only the 2³ block means: a patch with the same block means gives the same output
    blocks = torch.nn.functional.avg_pool3d(x, 2)
    same_means = blocks.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    t.eval()
    with torch.no_grad():
        torch.testing.assert_close(t(x), t(same_means), rtol=1e-5, atol=1e-5)
        full = PatchRegressor(1, 32, (4, 8, 8, 12)).eval()  # without the pooling, the fine voxels count
        assert not torch.allclose(full(x), full(same_means), rtol=1e-3, atol=1e-3)
    u = build_network(t.arch)
    u.load_state_dict(t.state_dict())
    assert t.arch["input_pool"] == 2 and "input_pool" not in s.arch
    with pytest.raises(ValueError, match="does not divide"):
        PatchRegressor(1, 30, (4, 8, 8, 12), input_pool=4)
    assert load_train_config(None, {"teacher_net": {"input_pool": 2}}).teacher_net.input_pool == 2


def test_stem_is_a_config_setting():
    cfg = load_train_config(None, {"teacher_net": {"stem": "conv"}})
    assert cfg.teacher_net.stem == "conv" and cfg.student_net.stem == "patchify"
    with pytest.raises(ConfigError):
        load_train_config(None, {"teacher_net": {"stem": "pyramid"}})


@pytest.mark.parametrize("loss", ["l1", "mse", "attention", "similarity"])
def test_distillation_loss_zero_for_matching_features_and_trainable(loss):
    torch.manual_seed(0)
    shapes = {"stage2": (8, 4)}
    d = FeatureDistillation(shapes, shapes, ["stage2"], [2.0], loss)
    if loss in ("l1", "mse"):
        with torch.no_grad():  # identity adapter
            d.adapters["stage2"].proj.weight.copy_(torch.eye(8).reshape(8, 8, 1, 1, 1))
            d.adapters["stage2"].proj.bias.zero_()
    f = torch.randn(3, 8, 4, 4, 4)
    zero, _ = d({"stage2": f}, {"stage2": f * 3.0})  # scale free: a scaled copy costs nothing
    assert float(zero.detach()) == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(3, 8, 4, 4, 4, requires_grad=True)
    loss_val, parts = d({"stage2": g}, {"stage2": f})
    assert float(loss_val.detach()) > 0 and float(loss_val.detach()) == pytest.approx(2.0 * float(parts["stage2"]))
    loss_val.backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()


def test_similarity_distillation_compares_the_batchs_relations_whatever_the_shapes():
    """Similarity preservation (Tung & Mori 2019) needs no adapter: a student map of other channels and size with
    the same patch-to-patch dot products (here the teacher's channels permuted and rotated) costs nothing; the
    value is the mean squared difference of the row-normalised Gram matrices, computed here by hand."""
    torch.manual_seed(1)
    d = FeatureDistillation({"stage3": (4, 2)}, {"stage3": (6, 4)}, ["stage3"], [1.0], "similarity")
    assert len(d.adapters) == 0 and not list(d.parameters())
    t = torch.randn(5, 6, 4, 4, 4)
    q, _ = torch.linalg.qr(torch.randn(6 * 64, 6 * 64))
    same = (t.flatten(1) @ q).reshape(5, 6 * 64 // 8, 2, 2, 2)  # another shape, the same Gram matrix
    assert float(d({"stage3": same}, {"stage3": t})[0]) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 4, 2, 2, 2)
    gs, gt = s.flatten(1) @ s.flatten(1).t(), t.flatten(1) @ t.flatten(1).t()
    gs, gt = gs / gs.norm(dim=1, keepdim=True), gt / gt.norm(dim=1, keepdim=True)
    assert float(d({"stage3": s}, {"stage3": t})[0]) == pytest.approx(float(((gs - gt) ** 2).mean()), rel=1e-5)


def test_distillation_adapter_changes_channels_and_size():
    d = FeatureDistillation({"stem": (4, 8)}, {"stem": (6, 16)}, ["stem"], [1.0], "l1")
    loss, _ = d({"stem": torch.randn(2, 4, 8, 8, 8)}, {"stem": torch.randn(2, 6, 16, 16, 16)})
    assert torch.isfinite(loss)
    a = attention_map(torch.randn(2, 5, 4, 4, 4))
    assert torch.allclose(a.norm(dim=1), torch.ones(2))


def test_config_refuses_unknown_and_out_of_range(tmp_path):
    assert load_train_config(None).distill.stages == ["stage1", "stage2", "stage3"]
    with pytest.raises(ConfigError, match="unknown setting"):
        load_train_config({"optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="out of range"):
        load_train_config({"optim": {"lr": 5.0}})
    with pytest.raises(ConfigError, match="one weight per stage"):
        load_train_config({"distill": {"stages": ["stage1"], "weights": [1, 2]}})
    with pytest.raises(ConfigError, match="unknown stage"):
        load_train_config({"distill": {"stages": ["stage9"], "weights": [1]}})
    with pytest.raises(ConfigError, match="is not one of"):
        load_train_config({"distill": {"loss": "kl"}})
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  store: rel/store\n")
    cfg = load_train_config(p)
    from ctsma.models.config import resolve
    assert resolve(cfg, cfg.data.store) == tmp_path / "rel" / "store"


def test_shipped_configs_load():
    """Each shipped config loads with every setting of its file, none dropped or replaced by a default."""
    import dataclasses

    import yaml

    from ctsma.resources import resource_path
    for name in ("demo.yaml", "gpu.yaml"):
        path = resource_path("Configs", name)
        cfg = dataclasses.asdict(load_train_config(path))
        raw = yaml.safe_load(path.read_text())
        assert {"data", "optim", "trainer"} <= raw.keys()
        for section, values in raw.items():
            for key, value in values.items():
                got = cfg[section][key]
                assert (list(got) if isinstance(value, list) else got) == value, (name, section, key)
        assert cfg["base_dir"] == str(path.resolve().parent)  # relative paths resolve against the file's folder


def _student_file(tmp_path, mean=(0.3, 0.2, 0.5, 1.5), sd=(0.1, 0.05, 0.1, 0.3)):
    torch.manual_seed(0)
    net = PatchRegressor(1, 16, (4, 4, 8, 8))
    meta = build_meta("student_baseline", net, modality="ct", spacing_mm=0.5, extent_mm=8, masks=False,
                      intensity_offset=300, intensity_scale=600, target="mr", y_mean=mean, y_sd=sd,
                      training={"n": 1}, metrics={"val_loss": 0.5})
    return export_model(tmp_path / "student.safetensors", net, meta), net


def test_model_file_round_trip_and_physical_units(tmp_path):
    path, net = _student_file(tmp_path)
    model, meta = load_student(path)
    assert meta["parameters"] == list(PARAMETERS) and meta["units"]["Tb.N"] == "1/mm"
    assert meta["input"]["patch_size"] == 16 and meta["kind"] == "student"
    x = np.random.default_rng(0).normal(300, 200, (5, 16, 16, 16)).astype(np.float32)
    y = predict(model, x)
    net.eval()
    with torch.no_grad():
        z = net(torch.from_numpy((x[:, None] - 300) / 600)).numpy()
    np.testing.assert_allclose(y, z * np.array([0.1, 0.05, 0.1, 0.3]) + np.array([0.3, 0.2, 0.5, 1.5]), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(UserError, match="needs"):
        model.predict(np.zeros((2, 1, 8, 8, 8)))


def test_flip_averaging_is_the_mean_and_sd_over_flipped_copies(tmp_path):
    """``predict_flips``: one copy is ``predict`` with SD 0; four copies are the mean and SD (ddof 1) of the
    predictions of the patch flipped along no axis and each axis, whatever the patch array's layout."""
    from ctsma.models.export import FLIPS_BY_COUNT, FLIPS_DEFAULT

    path, _ = _student_file(tmp_path)
    model, _ = load_student(path)
    x = np.random.default_rng(1).normal(300, 200, (6, 16, 16, 16)).astype(np.float32)
    one, sd1 = model.predict_flips(x, flips=FLIPS_BY_COUNT[1])
    np.testing.assert_array_equal(one, model.predict(x))
    assert not sd1.any()
    copies = np.stack([model.predict(x), model.predict(x[:, ::-1].copy()), model.predict(x[:, :, ::-1].copy()),
                       model.predict(x[:, :, :, ::-1].copy())])
    mean, sd = model.predict_flips(x, flips=FLIPS_DEFAULT)
    np.testing.assert_allclose(mean, copies.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sd, copies.std(0, ddof=1), rtol=1e-9, atol=1e-15)
    assert (sd > 0).all()                                    # an untrained network is not flip-invariant
    mean5, _ = model.predict_flips(x[:, None], flips=FLIPS_DEFAULT)   # (N, 1, D, D, D) flips the same axes
    np.testing.assert_array_equal(mean5, mean)
    assert len(FLIPS_BY_COUNT[8]) == 8 and len(set(FLIPS_BY_COUNT[8])) == 8


def test_flip_averaging_flips_the_mask_with_the_patch(tmp_path):
    """A model with a mask channel: every flipped copy flips patch and mask together, in either array layout."""
    from ctsma.models.export import FLIPS_DEFAULT

    torch.manual_seed(0)
    net = PatchRegressor(2, 16, (4, 4, 8, 8))
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8, masks=True,
                      intensity_offset=300, intensity_scale=600, target="mr", y_mean=(0.3, 0.2, 0.5, 1.5),
                      y_sd=(0.1, 0.05, 0.1, 0.3), training={"n": 1}, metrics={"val_loss": 0.5})
    model, _ = load_student(export_model(tmp_path / "m.safetensors", net, meta))
    rng = np.random.default_rng(2)
    x = rng.normal(300, 200, (5, 16, 16, 16)).astype(np.float32)
    m = np.zeros_like(x)
    m[:, :5, :9, 3:] = 1.0                                   # an asymmetric mask: a wrong flip changes the output
    copies = [model.predict(np.flip(x, ax).copy() if ax else x, np.flip(m, ax).copy() if ax else m)
              for ax in ((), (1,), (2,), (3,))]
    want = np.mean(copies, axis=0)
    for xs, ms in ((x, m), (x[:, None], m), (x, m[:, None]), (x[:, None], m[:, None])):
        np.testing.assert_allclose(model.predict_flips(xs, ms, FLIPS_DEFAULT)[0], want, rtol=1e-12)
    unflipped_mask = np.mean([model.predict(np.flip(x, ax).copy() if ax else x, m) for ax in ((), (1,), (2,), (3,))],
                             axis=0)
    assert not np.allclose(unflipped_mask, want)             # the test can tell a mask left unflipped


def test_wrong_or_altered_model_files_rejected(tmp_path):
    path, net = _student_file(tmp_path)
    with pytest.raises(ModelFileError, match="'student' model"):
        load_teacher(path)
    # a different model kind with the right name
    other = save_model(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"x": 1}, kind="student")
    with pytest.raises(ModelFileError, match="metadata"):
        load_student(other)
    # metadata says a different architecture than the weights
    from ctsma.modelfile import load_model
    tensors, meta = load_model(path)
    meta.pop("_sha256")
    meta["arch"]["widths"] = [4, 4, 8, 16]
    bad = save_model(tmp_path / "bad.safetensors", tensors, meta, kind="student")
    with pytest.raises(ModelFileError, match="architecture|fit"):
        load_student(bad)
    # flipped bytes in the weights
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    tampered = tmp_path / "t.safetensors"
    tampered.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum|damaged"):
        load_student(tampered)
    (tmp_path / "junk.safetensors").write_text(json.dumps({"not": "a model"}))
    with pytest.raises(ModelFileError):
        load_student(tmp_path / "junk.safetensors")


def test_ablation_variant_config():
    from ctsma.models.config import variant
    from ctsma.models.train import run_paths, teacher_path

    cfg = load_train_config({"output": {"dir": "/tmp/run"},
                             "evaluate": {"ablations": [{"name": "s3", "distill": {"stages": ["stage3"],
                                                                                  "weights": [2.0]}}]}})
    v = variant(cfg, cfg.evaluate.ablations[0])
    assert v.distill.stages == ["stage3"] and v.distill.weights == [2.0] and cfg.distill.stages != v.distill.stages
    assert run_paths(v, "student_distilled")[1].name == "student_distilled_s3.safetensors"
    assert teacher_path(v) == teacher_path(cfg)  # variants share the teacher
    with pytest.raises(ConfigError, match="ablations"):
        load_train_config({"evaluate": {"ablations": [{"name": "x", "trainer": {"seed": 1}}]}})
    # two variants of one name wrote one model file and one result: the second replaced the first silently
    with pytest.raises(ConfigError, match=r"ablations\[1\]: the name 's3' is used twice"):
        load_train_config({"evaluate": {"ablations": [{"name": "s3"}, {"name": "s3", "optim": {"lr": 0.01}}]}})


def test_group_norm_variant_rebuilds_from_its_arch():
    from ctsma.models.networks import build_network

    net = PatchRegressor(1, 16, (4, 4, 8, 8), norm="group").eval()
    twin = build_network(net.arch).eval()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.allclose(net(x), twin(x)) and not any(isinstance(m, torch.nn.BatchNorm3d) for m in twin.modules())


def test_models_train_stays_the_function_after_the_submodule_is_imported():
    """``ctsma.models.train`` is the training function, not its submodule of the same name, however the submodule
    is imported (a lazy wrapper was replaced by the submodule after its first call)."""
    import importlib

    import ctsma.models as models

    importlib.import_module("ctsma.models.train")
    from ctsma.models import train

    assert callable(models.train) and train is models.train and train.__module__ == "ctsma.models.train"
