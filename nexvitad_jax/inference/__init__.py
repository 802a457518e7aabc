"""Inference (the paper's section 3.2): Sinkhorn K-means prototypes per layer (the memory bank),
anomaly maps from the distance to them, the feature extractors, the `AnomalyDetector` API behind
`nexvitad score`, and the "original decoder" baseline."""

from nexvitad_jax.inference.sinkhorn_kmeans import (KMeansResult, SolverOptions, SweepResult, sinkhorn_kmeans,
                                                     sweep_k, transport_assignments)
from nexvitad_jax.inference.decoder_baseline import DecoderBaseline
from nexvitad_jax.inference.detector import AnomalyDetector
from nexvitad_jax.inference.extractors import BackboneFeatureExtractor, EncoderFeatureExtractor, FeatureExtractor
from nexvitad_jax.inference.memory_bank import MemoryBank, build_memory_bank, fit_memory_banks

__all__ = ["AnomalyDetector", "BackboneFeatureExtractor", "DecoderBaseline", "EncoderFeatureExtractor",
           "FeatureExtractor", "KMeansResult", "MemoryBank", "SolverOptions", "SweepResult", "build_memory_bank",
           "fit_memory_banks", "sinkhorn_kmeans", "sweep_k", "transport_assignments"]
