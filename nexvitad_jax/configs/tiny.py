"""Tiny NexViTAD: random tiny backbones, 64 px, a few steps (CI and the base of the demo).

    nexvitad run --config tiny
"""

import ml_collections

from nexvitad_jax.configs import paper


def get_config() -> ml_collections.ConfigDict:
    config = paper.get_config()
    config.data.image_size = 64
    config.data.few_shot = 4
    config.model.hiera = {"embed_dim": 8, "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1], "image_size": [64, 64]}
    config.model.dinov2 = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 56}
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    config.model.decoder_channels = (16, 8, 8)
    config.model.pseudo_label_hidden = (8, 4)
    config.train.source_per_class = config.train.target_per_class = 2
    config.train.epochs, config.train.phase1_epochs, config.train.steps_per_epoch = 2, 1, 2
    config.train.warmup_steps = 1
    config.train.checkpoint_every = 1
    # At 64 px the last layer has 2 x 2 patches per image, so the M = 4 bank images give 16 points
    # there: K must stay below that.
    config.bank.k = 8
    return config
