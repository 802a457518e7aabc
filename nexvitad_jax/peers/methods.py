"""The peer methods by name, each a scorer built once per run: `scorer(prompts, images, seed) ->
(maps (B, H, W), image scores (B,))`, prompts (N, H, W, 3) in [0, 1] for a few-shot method and
None for a batch zero-shot one. `python -m experiments.peers` runs them on the same few-shot
images (`nexvitad_jax.data.few_shot_images`), devices and evaluators.

- patchead, patchead_plus: PatchEAD / PatchEAD+ few-shot (K_P = 1);
- patchead_zero, patchead_plus_zero: batch zero-shot (batches of 64, K_P = max(1, 0.3 N));
- nexvitad_bank: NexViTAD's memory bank (Sinkhorn K-means prototypes of Hiera + DINOv2 features,
  `AnomalyDetector` over a `BackboneFeatureExtractor`) on the same few-shot images.

The DINOv2 of the PatchEAD methods comes from a converted checkpoint directory (`dino`), else it
is randomly initialized from `config.model.dinov2` (then the figures check the pipeline, not the
paper's accuracy). `resolution` is its input size (a multiple of 14; the paper uses 448).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from nexvitad_jax.errors import UserInputError

Scorer = Callable[[Any, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PeerMethod:
    name: str
    title: str
    few_shot: bool  # False: batch zero-shot (no prompts; run once per seed, shots = 0)
    build: Callable[..., Scorer]  # build(config, dino=, resolution=, mesh=) -> scorer


def default_resolution(config) -> int:
    """The largest multiple of the DINOv2 patch (14) not above the data's image size."""
    return max(14, int(config.data.image_size) // 14 * 14)


def peer_encoder(config, *, dino: str | None, resolution: int | None, mesh=None):
    """The PatchEAD methods' DINOv2: converted from `dino`, else random from `config.model.dinov2`."""
    from nexvitad_jax.peers.encoder import DinoPatchEncoder

    resolution = default_resolution(config) if resolution is None else int(resolution)
    if dino:
        return DinoPatchEncoder.from_dir(dino, resolution=resolution, mesh=mesh)
    return DinoPatchEncoder.random(config.model.dinov2.to_dict(), seed=int(config.seed), resolution=resolution,
                                   mesh=mesh)


def _patchead(plus: bool, few_shot: bool) -> Callable[..., Scorer]:
    def build(config, *, dino: str | None = None, resolution: int | None = None, mesh=None) -> Scorer:
        from nexvitad_jax.peers.patchead import PatchEAD, PatchEADOptions

        fields = dict(sigma=float(config.bank.sigma), batch_size=int(config.eval.batch_size))
        options = PatchEADOptions.plus(**fields) if plus else PatchEADOptions(**fields)
        detector = PatchEAD(peer_encoder(config, dino=dino, resolution=resolution, mesh=mesh), options)

        def score(prompts, images, seed):
            if few_shot:
                return detector.fit(prompts).predict(images)
            return detector.predict_batch_zero_shot(images, seed=seed)

        return score

    return build


def _nexvitad_bank(config, *, dino: str | None = None, resolution: int | None = None, mesh=None) -> Scorer:
    """NexViTAD's memory bank on backbone features: the config's converted checkpoints
    (`model.hiera_checkpoint`, `model.dinov2_checkpoint`), else its random backbones."""
    from nexvitad_jax.inference import AnomalyDetector, BackboneFeatureExtractor

    model, bank = config.model, config.bank
    options = dict(layers=tuple(bank.layers), image_size=int(config.data.image_size), mesh=mesh)
    if model.hiera_checkpoint:
        extractor = BackboneFeatureExtractor.from_dirs(model.hiera_checkpoint, model.dinov2_checkpoint or None,
                                                       **options)
    else:
        hiera = model.hiera.to_dict()
        if "variant" in hiera:
            raise UserInputError("nexvitad_bank with random backbones needs config.model.hiera as config fields "
                                 "(the tiny/demo configs), or set model.hiera_checkpoint to a converted Hiera")
        extractor = BackboneFeatureExtractor.random(seed=int(config.seed), hiera_config=hiera,
                                                    dino_config=model.dinov2.to_dict(), **options)

    def score(prompts, images, seed):
        kmeans = {**bank.kmeans.to_dict(), "cap_to_bank": True}  # M = 1 shot may hold fewer patches than K
        detector = AnomalyDetector(extractor, k=int(bank.k), sigma=float(bank.sigma), seed=seed,
                                   batch_size=int(config.eval.batch_size), kmeans_options=kmeans, mesh=mesh)
        return detector.fit(prompts).predict(images)

    return score


METHODS: dict[str, PeerMethod] = {method.name: method for method in (
    PeerMethod("patchead", "PatchEAD", True, _patchead(False, True)),
    PeerMethod("patchead_plus", "PatchEAD+", True, _patchead(True, True)),
    PeerMethod("patchead_zero", "PatchEAD (batch 0-shot)", False, _patchead(False, False)),
    PeerMethod("patchead_plus_zero", "PatchEAD+ (batch 0-shot)", False, _patchead(True, False)),
    PeerMethod("nexvitad_bank", "NexViTAD memory bank", True, _nexvitad_bank),
)}


def method_named(name: str) -> PeerMethod:
    if name not in METHODS:
        raise UserInputError(f"unknown peer method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]
