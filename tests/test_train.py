"""Losses (eqs. 5-9) against torch/numpy references, the augmentation's exact inverse, frozen
backbones, the feature cache, checkpoints (the old index format too), the NaN stop and input errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nexvitad_jax.compilation import fast_compile_options
from nexvitad_jax.configs import tiny
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.build import build_model
from nexvitad_jax.models.nexvitad import FROZEN
from nexvitad_jax.train import TrainingDiverged, augment as aug, train
from nexvitad_jax.train.checkpoints import Checkpoints
from nexvitad_jax.train.loop import check_training_config
from nexvitad_jax.train.losses import IGNORE, consistency_mse, cross_entropy, pseudo_labels, total_loss
from nexvitad_jax.sharding import make_mesh
from nexvitad_jax.train.batches import host_batch, place_batch
from nexvitad_jax.train.step import StepLayout, TrainStep, batch_shardings, make_optimizer


def test_pseudo_labels_threshold_and_ignore():
    logits = np.random.default_rng(0).normal(scale=2, size=(3, 8, 8, 2)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # eq. 5
    expected = np.where(probabilities.max(-1) > 0.7, probabilities.argmax(-1), -1)  # eq. 6
    got = np.asarray(pseudo_labels(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, expected)
    assert IGNORE == -1 and 0 < (got == -1).mean() < 1


def test_cross_entropy_matches_torch_with_ignore():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(4, 6, 6))
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                                                 torch.from_numpy(labels), ignore_index=-1)
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), float(expected),
                               rtol=1e-6)
    full = np.clip(labels, 0, 1)  # eq. 9: every source pixel labelled -> 1/(N H W) sum
    expected_full = torch.nn.functional.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                                                      torch.from_numpy(full))
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(full))), float(expected_full),
                               rtol=1e-6)


def test_consistency_mse_is_eq7_over_labelled_pixels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(2, 5, 5))
    valid = rng.uniform(size=(2, 5, 5)) < 0.8
    anomaly = np.exp(logits[..., 1]) / np.exp(logits).sum(-1)
    in_p = (labels != -1) & valid
    expected = np.mean((anomaly[in_p] - labels[in_p]) ** 2)
    got = consistency_mse(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert float(total_loss(1.0, 2.0, 3.0, 0.5, 2.0)) == 1.0 + 0.5 * 2.0 + 2.0 * 3.0  # eq. 8


# Jitted: one compilation per shape instead of one per operation (op-by-op dispatch).
_augment = jax.jit(aug.augment)
_restore = jax.jit(aug.restore)


def _transforms(batch, flip, rotations, scale, noise=0.0):
    return {"flip": jnp.asarray(flip), "rotations": jnp.asarray(rotations, jnp.int32),
            "scale": jnp.asarray(scale, jnp.float32), "noise_std": jnp.full((batch,), noise, jnp.float32),
            "noise_key": jax.random.split(jax.random.key(0), batch)}


def test_flips_and_rotations_are_exact_and_invert_exactly():
    maps = np.random.default_rng(3).uniform(size=(8, 12, 12, 3)).astype(np.float32)
    flips = [False, True] * 4
    rotations = [0, 0, 1, 1, 2, 2, 3, 3]
    transforms = _transforms(8, flips, rotations, [1.0] * 8)
    augmented = np.asarray(_augment(jnp.asarray(maps), transforms))
    for i in range(8):
        reference = maps[i][:, ::-1] if flips[i] else maps[i]
        candidates = [np.rot90(reference, k) for k in range(4)]
        matches = [k for k, c in enumerate(candidates) if np.array_equal(c, augmented[i])]
        assert matches and (matches == [0]) == (rotations[i] == 0), (i, matches)
    restored, inside = _restore(jnp.asarray(augmented), transforms)
    np.testing.assert_array_equal(np.asarray(restored), maps)
    assert bool(jnp.all(inside))


def test_scaling_inverts_exactly_where_invertible():
    """Bilinear resampling is exact for maps linear in the coordinates, so augment then restore is
    the identity on every pixel the augmented view covers."""
    rows, cols = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
    ramp = np.stack([0.02 * rows + 0.01 * cols + 0.1, 0.5 - 0.01 * rows + 0.02 * cols], -1).astype(np.float32)
    maps = np.repeat(ramp[None], 4, axis=0)
    transforms = _transforms(4, [False, True, False, True], [0, 1, 2, 3], [0.8, 1.25, 1.1, 0.9])
    restored, inside = _restore(_augment(jnp.asarray(maps), transforms), transforms)
    inside = np.asarray(inside)
    assert inside.mean() > 0.5 and not inside.all()  # zoom-in loses the border
    np.testing.assert_allclose(np.asarray(restored)[inside], maps[inside], atol=1e-5)


def test_sampled_transforms_probability_and_noise():
    transforms = jax.jit(aug.sample_transforms, static_argnums=1)(jax.random.key(1), 4000)
    for name, off in (("flip", False), ("rotations", 0), ("scale", 1.0), ("noise_std", 0.0)):
        applied = np.mean(np.asarray(transforms[name]) != off)
        assert 0.45 < applied < 0.55, (name, applied)
    images = jnp.full((2, 8, 8, 3), 0.5)
    noisy = _augment(images, _transforms(2, [False, False], [0, 0], [1.0, 1.0], noise=0.1))
    assert 0.05 < float(jnp.std(noisy - images)) < 0.15


def test_step_layout_spreads_any_batch_over_any_device_count():
    """3 source classes x 2 and 2 target classes x 3 on 4 devices: the flat rows (source, clean
    target, augmented slots) padded to 8 and 20, padding IGNORE; each head gets exactly its class's
    rows, padded to a multiple of 4 and masked."""
    layout = StepLayout(source_classes=3, per_source=2, target_classes=2, per_target=3, devices=4)
    assert (layout.rows(1), layout.rows(2)) == (8, 20)
    assert "backbones 6 -> 8 rows, source heads 2 -> 4 rows per class" in layout.padding(1)
    assert StepLayout(3, 4, 2, 2, devices=2).padding(2) is None
    constant = np.ones((2, 2, 3), np.uint8)  # images of one value: 10 c + i (source), 100 + 3 c + i (target)
    images = (10 * np.arange(3)[:, None] + np.arange(2)).astype(np.uint8)[..., None, None, None] * constant
    target_images = (100 + np.arange(6, dtype=np.uint8).reshape(2, 3))[..., None, None, None] * constant
    batch = host_batch(layout, 2, "images", np.ones((3, 2, 2, 2), bool), images,
                       (np.zeros((2, 3, 2, 2), np.int32), target_images, target_images))
    flat, flat_labels = batch["images"], batch["labels"]
    assert flat.shape == (20, 2, 2, 3) and batch["target_images"].shape == (6, 2, 2, 3)
    np.testing.assert_array_equal(flat_labels[:6], 1)
    np.testing.assert_array_equal(flat_labels[6:12], 0)
    np.testing.assert_array_equal(flat_labels[12:], IGNORE)  # augmented slots and padding
    np.testing.assert_array_equal(flat[12:], 0)
    rows, mask = layout.source_heads()
    assert rows.shape == (3, 4) and mask.sum(1).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(flat[rows[mask].reshape(3, 2)], images)
    rows, mask = layout.target_heads()
    assert rows.shape == (2, 8) and mask.sum(1).tolist() == [6, 6]
    np.testing.assert_array_equal(flat[rows[:, :3]], target_images)
    np.testing.assert_array_equal(rows[:, 3:6], rows[:, :3] + 6)  # each clean image's augmented slot


def _tiny_batch(trainer: TrainStep, rng):
    """A phase-2 batch of random images, masks and pseudo-labels, placed on the trainer's mesh."""
    target_images = rng.integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)
    batch = host_batch(trainer.layout, 2, "images", rng.uniform(size=(2, 2, 64, 64)) < 0.2,
                       rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8),
                       (rng.integers(-1, 2, (1, 2, 64, 64)), target_images, target_images))
    return place_batch(batch, batch_shardings(trainer.mesh, 2, "images"))


def test_backbones_frozen_bitwise_and_outside_the_gradient():
    config = tiny.get_config()
    model = build_model(config, 2, 1)
    before = jax.tree.map(np.array, nnx.state(model, FROZEN))
    mesh = make_mesh(jax.devices()[:1])
    trainer = TrainStep(model, make_optimizer(1e-2, 1, 10), mesh, source_per_class=2, target_per_class=2,
                        compiler_options=fast_compile_options())
    state = trainer.init_state(0)
    initial = jax.tree.map(np.array, state["trainable"])
    # Nothing frozen is in the differentiated/optimized state.
    flat = nnx.to_flat_state(state["trainable"])
    assert not any({"hiera", "dinov2"} & set(map(str, path)) for path, _ in flat)
    batch = _tiny_batch(trainer, np.random.default_rng(0))
    # Phase 2 runs every loss term (phase 1's are a subset), so every head gets a gradient: one compilation.
    for _ in range(2):
        state, metrics = trainer(state, batch, 2)
        assert np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.array, trainer.frozen)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(initial),
                                                         jax.tree.leaves(jax.tree.map(np.array, state["trainable"])))]
    assert all(changed)  # adapters, projections and every head moved
    # The differentiated function of either phase never reads a backbone parameter: after dead-code
    # elimination of the gradient's jaxpr, every frozen input is unused (the backbones run before
    # it). Traced on abstract values: nothing is compiled or run.
    from jax._src.interpreters import partial_eval as pe

    def step_features(trainable, batch_stats, frozen, key, phase):
        model = nnx.merge(trainer.graphdef, trainable, batch_stats, frozen)
        return trainer.step_features(model, batch, key, phase)

    n_trainable, n_frozen = len(jax.tree.leaves(state["trainable"])), len(jax.tree.leaves(trainer.frozen))
    for phase in (1, 2):
        backbone, transforms = jax.eval_shape(lambda t, b, f, k: step_features(t, b, f, k, phase), state["trainable"],
                                              state["batch_stats"], trainer.frozen, jax.random.key(0))
        closed = jax.make_jaxpr(lambda t, f, features, tr: jax.grad(lambda tt: trainer._losses(
            tt, state["batch_stats"], f, features, batch, tr, phase)[0])(t))(
            state["trainable"], trainer.frozen, backbone, transforms)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        assert len(used) == n_trainable + n_frozen + len(jax.tree.leaves((backbone, transforms)))
        assert not any(used[n_trainable:n_trainable + n_frozen]), phase
        assert any(used[:n_trainable]), phase


def test_build_model_puts_a_converted_backbone_in_place(tmp_path):
    """build_model initializes in one compiled program with the loaded backbone as a placeholder."""
    from nexvitad_jax.compilation import initialize
    from nexvitad_jax.models import build_backbone, save_backbone

    config = tiny.get_config()
    hiera = initialize(lambda: build_backbone("hiera", config.model.hiera.to_dict(), rngs=nnx.Rngs(7)))
    saved = nnx.state(hiera, nnx.Param).to_pure_dict()
    save_backbone(tmp_path / "hiera", "hiera", hiera.config, saved, variant="test", source="random")
    config.model.hiera_checkpoint = str(tmp_path / "hiera")
    model = build_model(config, 2, 1)
    got = nnx.state(model.encoder.hiera, nnx.Param).to_pure_dict()
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # No placeholder is left, and the model runs.
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    features = nnx.eval_shape(lambda m, x: m.encode(x), model, jnp.zeros((1, 64, 64, 3)))
    assert [f.shape[-1] for f in features] == [16, 32, 64, 128]


def test_paper_config_describes_the_paper_model():
    """nexvitad_jax/configs/paper.py (random weights, shapes only): Hiera-Huge + DINOv2-S at 224 and
    the pseudo-label head on interleaved F_3, 2 d_3 = 2048 channels (the paper's number)."""
    from nexvitad_jax.configs import paper

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    assert (config.data.image_size, config.train.epochs, config.data.few_shot, config.train.feature_cache) == (
        224, 50, 10, False)
    model = nnx.eval_shape(lambda: build_model(config, 11, 1))
    assert model.encoder.stage_dims == (256, 512, 1024, 2048)
    assert model.pseudo_label_heads.heads.convs[0].kernel.shape == (1, 1, 1, 2048, 64)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    from nexvitad_jax.data import open_dataset

    config = tiny.get_config()
    config.train.learning_rate = 1e38  # Adam steps of ~1e38 overflow the next forward pass
    config.train.warmup_steps = 0
    config.train.epochs, config.train.phase1_epochs, config.train.steps_per_epoch = 1, 1, 3  # phase 1 only: one compile
    config.train.fast_compile = True
    dataset = open_dataset("synthetic", image_size=64)
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf|-inf) at step (\d+).*last good checkpoint is step"):
        train(config, dataset, ["bottle", "cable"], ["hazelnut"], tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["loss"]) for r in records)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and kept[-1] == records[-1]["step"]


def _state_like_a_train_state(scale: float = 1.0):
    """nnx States (attribute keys), a list longer than ten (its path names sort apart from its
    indices), a tuple and scalars of several dtypes, as a train state holds them."""
    rng = np.random.default_rng(0)
    linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    return {"trainable": nnx.state(linear, nnx.Param), "batch_stats": nnx.state(nnx.BatchNorm(3, rngs=nnx.Rngs(0))),
            "heads": [jnp.asarray(scale * rng.normal(size=(i + 1,)), jnp.float32) for i in range(12)],
            "opt_state": (jnp.asarray(scale * rng.normal(size=(3, 2)), jnp.float32), jnp.zeros((), jnp.int32)),
            "step": jnp.asarray(7, jnp.int32), "rng": jnp.asarray([1, 2], jnp.uint32)}


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_keyed_by_tree_path_and_the_old_index_format_loads(tmp_path):
    import orbax.checkpoint as ocp

    state = _state_like_a_train_state()
    labels = jnp.asarray(np.random.default_rng(1).integers(-1, 2, (1, 2, 4, 4)), jnp.int32)
    state_like, labels_like = _state_like_a_train_state(scale=0.0), jnp.zeros_like(labels)
    checkpoints = Checkpoints(tmp_path / "new", every_steps=1)
    checkpoints.save(3, state, labels, {"step": 3})
    checkpoints.wait()
    saved = checkpoints.manager.item_metadata(3)["state"].tree
    assert set(saved) == {"trainable", "batch_stats", "heads", "opt_state", "step", "rng"}
    assert saved["trainable"]["kernel"]["value"].shape == (2, 3) and set(saved["heads"]) == {str(i) for i in range(12)}
    restored, restored_labels, metadata = checkpoints.restore(3, state_like, labels_like)
    _assert_trees_equal(restored, state)
    _assert_trees_equal(restored_labels, labels)
    assert metadata == {"step": 3}
    checkpoints.close()

    # A checkpoint as the earlier version wrote it: the leaves keyed by their index.
    old = ocp.CheckpointManager(tmp_path / "old", options=ocp.CheckpointManagerOptions(create=True))
    old.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({f"{index:05d}": leaf for index, leaf in enumerate(jax.tree.leaves(state))}),
        pseudo_labels=ocp.args.StandardSave({"labels": labels}), metadata=ocp.args.JsonSave({"step": 3})))
    old.wait_until_finished()
    old.close()
    checkpoints = Checkpoints(tmp_path / "old", every_steps=1)
    restored, restored_labels, _ = checkpoints.restore(3, state_like, labels_like)
    _assert_trees_equal(restored, state)
    _assert_trees_equal(restored_labels, labels)
    # One of another train state (here: one leaf fewer) cannot be restored by index: a clear error.
    fewer = {**state_like, "rng": None}
    with pytest.raises(UserInputError, match=r"does not fit this run's train state.*Re-create it by training again"):
        checkpoints.restore(3, fewer, labels_like)
    checkpoints.close()
    checkpoints = Checkpoints(tmp_path / "new", every_steps=1)
    with pytest.raises(UserInputError, match=r"does not fit.*opt_state/0"):
        checkpoints.restore(3, {**state_like, "opt_state": (jnp.zeros((3, 3)), jnp.zeros((), jnp.int32))}, labels_like)
    checkpoints.close()


def test_feature_cache_trains_as_without_it(tmp_path, monkeypatch):
    """Augmentation (p = 0.5 here) only touches the consistency branch's target view, which a cached
    run still passes through the backbones; the rest comes from the cache. Two phase-1 and two
    phase-2 steps (pseudo-labels from cached features) equal an uncached run's, and every cached
    feature fed to a step is the backbones' output for the image the uncached run fed there."""
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.models.nexvitad import TRAINABLE

    config = tiny.get_config()
    config.train.epochs, config.train.phase1_epochs, config.train.steps_per_epoch = 2, 1, 2
    config.train.learning_rate = 0.1  # confident pseudo-label heads after phase 1: phase 2 has labelled pixels
    config.train.fast_compile = True
    assert config.train.augmentation.probability == 0.5
    dataset = open_dataset("synthetic", image_size=64)
    step_calls = []
    original_call = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, state, batch, phase: (
        step_calls.append((self, batch, phase)), original_call(self, state, batch, phase))[1])
    runs = {}
    for cached in (False, True):
        config.train.feature_cache = cached
        step_calls.clear()
        result = train(config, dataset, ["bottle", "cable"], ["hazelnut"], tmp_path / str(cached), progress=False)
        records = [json.loads(line) for line in (tmp_path / str(cached) / "metrics.jsonl").read_text().splitlines()]
        state = nnx.state(result.model, nnx.Any(TRAINABLE, nnx.BatchStat))
        runs[cached] = (jax.tree.map(np.asarray, state), records, list(step_calls), result.state)
    (params, records, calls, _), (cached_params, cached_records, cached_calls, final_state) = runs[False], runs[True]
    assert [r["phase"] for r in records] == [1, 1, 2, 2] and min(r["labelled_fraction"] for r in records[2:]) > 0.5
    for record, cached_record in zip(records, cached_records, strict=True):
        for name in ("loss", "source_ce", "pseudo_label_ce", "target_ce", "target_mse", "labelled_fraction"):
            if name in record:
                np.testing.assert_allclose(cached_record[name], record[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The gradients of a step agree up to float rounding; Adam, which steps +-lr wherever a gradient
    # is tiny, amplifies that at lr 0.1 over 4 steps, hence a bound well above float rounding (the
    # decoder's exact re-formulations, e.g. the transposed conv as a matmul, move it by float rounding:
    # 1.1e-4 measured with the matmul up-conv, under 1e-4 with lax.conv_transpose).
    worst = max(float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12))
                for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(cached_params), strict=True))
    assert worst <= 3e-4, worst
    # The batches: cached features are the backbones' outputs of the images the uncached run used
    # (its source and clean target rows; the augmented slots are filled in the step).
    for (_, batch, phase), (trainer, cached_batch, cached_phase) in zip(calls, cached_calls, strict=True):
        assert phase == cached_phase and "images" not in cached_batch and trainer.feature_cache
        np.testing.assert_array_equal(np.asarray(cached_batch["labels"]), np.asarray(batch["labels"]))
        if phase == 2:
            np.testing.assert_array_equal(np.asarray(cached_batch["target_images"]), np.asarray(batch["target_images"]))
        fed = trainer.layout.n_source + (trainer.layout.n_target if phase == 2 else 0)
        expected = trainer.backbone_features(final_state, batch["images"])
        for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(cached_batch["features"]), strict=True):
            np.testing.assert_allclose(np.asarray(got)[:fed], np.asarray(want)[:fed], rtol=1e-5, atol=1e-5)


def test_training_input_errors(tmp_path):
    from nexvitad_jax.data import open_dataset

    dataset = open_dataset("synthetic", image_size=64)
    with pytest.raises(UserInputError, match="source and target"):
        train(tiny.get_config(), dataset, [], ["hazelnut"], tmp_path)
    config = tiny.get_config()
    config.train.phase1_epochs = 5
    expected = r"config\.train\.phase1_epochs = 5 must be in \[0, config\.train\.epochs = 2\]"
    with pytest.raises(UserInputError, match=expected):
        train(config, dataset, ["bottle"], ["hazelnut"], tmp_path)
    config = tiny.get_config()
    config.train.target_per_class = 0
    with pytest.raises(UserInputError, match=r"config\.train\.target_per_class = 0 must be a positive number"):
        check_training_config(config, ["bottle"], ["hazelnut"])
    config.train.target_per_class = 3  # any batch size trains on any device count
    check_training_config(config, ["bottle"], ["hazelnut"])


def test_training_loop_makes_no_implicit_transfer(tmp_path, monkeypatch):
    """train() steps under jax.transfer_guard("disallow"): batches enter with explicit placements,
    metrics and pseudo-labels leave through jax.device_get, checkpoints in an allowed scope. A stray
    implicit transfer in the loop would fail the run. The CPU backend enforces the guard on
    host-to-device transfers only (its device memory is host memory), so this test enforces
    device-to-host the way an accelerator does: reading an array's value outside jax.device_get
    while the guard disallows it raises. A probe after every step shows the guard is in force."""
    from jax._src import array as array_lib
    from jax._src import config as jax_config
    from jax._src.lib import guard_lib

    from nexvitad_jax.data import open_dataset

    value = array_lib.ArrayImpl._value

    def guarded_value(array):
        if (jax_config.transfer_guard_device_to_host.value == "disallow"
                and not guard_lib.thread_local_state().explicit_device_get):
            raise RuntimeError("Disallowed device-to-host transfer")
        return value.fget(array)

    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded_value))
    probes = []
    original_call = TrainStep.__call__

    def probed_call(self, state, batch, phase):
        state, metrics = original_call(self, state, batch, phase)
        for implicit in (lambda: float(metrics["loss"]), lambda: jnp.asarray(np.ones(2))):
            with pytest.raises(Exception, match="Disallowed (device-to-host|host-to-device) transfer"):
                implicit()
        probes.append(phase)
        return state, metrics

    monkeypatch.setattr(TrainStep, "__call__", probed_call)
    config = tiny.get_config()
    config.train.fast_compile = True
    config.train.checkpoint_every = 2  # steps 1 and 3 are not saved: their metrics are fetched a step late
    result = train(config, open_dataset("synthetic", image_size=64), ["bottle", "cable"], ["hazelnut"], tmp_path,
                   progress=False)
    assert probes == [1, 1, 2, 2] and np.isfinite(result.last_metrics["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["images_per_s"] > 0 for r in records)
