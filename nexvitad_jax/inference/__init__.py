"""Memory-bank inference (the paper's section 3.2): Sinkhorn K-means prototypes per layer, anomaly
maps from the distance to them, and the `AnomalyDetector` API behind `nexvitad score`."""

from nexvitad_jax.inference.sinkhorn_kmeans import (KMeansResult, SweepResult, sinkhorn_kmeans, sweep_k,
                                                     transport_assignments)
from nexvitad_jax.inference.detector import AnomalyDetector, BackboneFeatureExtractor, FeatureExtractor

__all__ = ["AnomalyDetector", "BackboneFeatureExtractor", "FeatureExtractor", "KMeansResult", "SweepResult", "sinkhorn_kmeans", "sweep_k", "transport_assignments"]
