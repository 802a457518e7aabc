"""The peer methods by name, each a scorer built once per run: `scorer(prompts, images, seed,
workdir) -> (maps (B, H, W), image scores (B,), seconds of scoring)`, prompts (N, H, W, 3) in [0, 1] for a few-shot
method and None for a batch zero-shot one; `workdir` (a folder per class, or None) holds what a
trained method resumes from. The seconds count the scoring of the images only (not the
prompts' features, the memory bank nor the training): the throughput the experiments report. `python -m experiments.peers` runs them on the same few-shot
images (`nexvitad_jax.data.few_shot_images`), devices and evaluators.

- patchead, patchead_plus: PatchEAD / PatchEAD+ few-shot (K_P = 1);
- patchead_zero, patchead_plus_zero: batch zero-shot (batches of 64, K_P = max(1, 0.3 N));
- inp_former: INP-Former few-shot, trained per class on the prompts (`inp_steps` steps, resumable
  from the class's workdir), hard INP coherence (eq. 2); inp_former_soft: with INP-Former++'s soft
  coherence (eq. 3); inp_former_plus: INP-Former++ (soft coherence, the residual segmentation head
  trained on pseudo anomalies, eq. 9's map with its L2 term);
- nexvitad_bank: NexViTAD's memory bank (Sinkhorn K-means prototypes of Hiera + DINOv2 features,
  `AnomalyDetector` over a `BackboneFeatureExtractor`) on the same few-shot images.

The DINOv2 of the PatchEAD methods comes from a converted checkpoint directory (`dino`), else it
is randomly initialized from `config.model.dinov2` (then the figures check the pipeline, not the
paper's accuracy). `resolution` is its input size (a multiple of 14; the paper uses 448).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from nexvitad_jax.errors import UserInputError

Scorer = Callable[[Any, np.ndarray, int, Any], tuple[np.ndarray, np.ndarray, float]]


@dataclasses.dataclass(frozen=True)
class PeerMethod:
    name: str
    title: str
    few_shot: bool  # False: batch zero-shot (no prompts; run once per seed, shots = 0)
    build: Callable[..., Scorer]  # build(config, dino=, resolution=, mesh=, inp_steps=) -> scorer


def timed(predict, *args, **kwargs) -> tuple[np.ndarray, np.ndarray, float]:
    """predict(...)'s (maps, scores) (host arrays: the work is done when it returns) and its seconds."""
    began = time.perf_counter()
    maps, scores = predict(*args, **kwargs)
    return maps, scores, time.perf_counter() - began


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
    def build(config, *, dino: str | None = None, resolution: int | None = None, mesh=None, **_) -> Scorer:
        from nexvitad_jax.peers.patchead import PatchEAD, PatchEADOptions

        fields = dict(sigma=float(config.bank.sigma), batch_size=int(config.eval.batch_size))
        options = PatchEADOptions.plus(**fields) if plus else PatchEADOptions(**fields)
        detector = PatchEAD(peer_encoder(config, dino=dino, resolution=resolution, mesh=mesh), options)

        def score(prompts, images, seed, workdir=None):
            if few_shot:
                return timed(detector.fit(prompts).predict, images)
            return timed(detector.predict_batch_zero_shot, images, seed=seed)

        return score

    return build


def _nexvitad_bank(config, *, mesh=None, **_) -> Scorer:
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

    def score(prompts, images, seed, workdir=None):
        kmeans = {**bank.kmeans.to_dict(), "cap_to_bank": True}  # M = 1 shot may hold fewer patches than K
        detector = AnomalyDetector(extractor, k=int(bank.k), sigma=float(bank.sigma), seed=seed,
                                   batch_size=int(config.eval.batch_size), kmeans_options=kmeans, mesh=mesh)
        return timed(detector.fit(prompts).predict, images)

    return score


def _inp_former(coherence: str, plus: bool = False) -> Callable[..., Scorer]:
    def build(config, *, dino: str | None = None, resolution: int | None = None, mesh=None,
              inp_steps: int = 200) -> Scorer:
        from nexvitad_jax.peers.inp_former import INPFormerOptions
        from nexvitad_jax.peers.inp_training import INPFormerDetector

        encoder = peer_encoder(config, dino=dino, resolution=resolution, mesh=mesh)
        options = INPFormerOptions(coherence=coherence, steps=int(inp_steps), sigma=float(config.bank.sigma),
                                   batch_size=int(config.eval.batch_size), residual_head=plus, map_l2=plus)

        def score(prompts, images, seed, workdir=None):
            detector = INPFormerDetector(encoder, options, seed=seed).fit(prompts, workdir)
            return timed(detector.predict, images)

        return score

    return build


METHODS: dict[str, PeerMethod] = {method.name: method for method in (
    PeerMethod("patchead", "PatchEAD", True, _patchead(False, True)),
    PeerMethod("patchead_plus", "PatchEAD+", True, _patchead(True, True)),
    PeerMethod("patchead_zero", "PatchEAD (batch 0-shot)", False, _patchead(False, False)),
    PeerMethod("patchead_plus_zero", "PatchEAD+ (batch 0-shot)", False, _patchead(True, False)),
    PeerMethod("inp_former", "INP-Former", True, _inp_former("hard")),
    PeerMethod("inp_former_soft", "INP-Former (soft coherence)", True, _inp_former("soft")),
    PeerMethod("inp_former_plus", "INP-Former++", True, _inp_former("soft", plus=True)),
    PeerMethod("nexvitad_bank", "NexViTAD memory bank", True, _nexvitad_bank),
)}


def method_named(name: str) -> PeerMethod:
    if name not in METHODS:
        raise UserInputError(f"unknown peer method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]
