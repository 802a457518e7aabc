"""NexViTAD in JAX/Flax: few-shot unsupervised cross-domain defect detection."""

from nexvitad_jax.errors import UserInputError

__version__ = "0.1.0"
__all__ = ["UserInputError", "__version__"]
