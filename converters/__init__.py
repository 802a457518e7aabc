"""PyTorch -> Flax checkpoint converters (`python -m converters`)."""
