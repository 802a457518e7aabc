"""Tiny NexViTAD: random tiny backbones, 64 px, a few steps (CI and the default demo).

    nexvitad run --config experiments/configs/tiny.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.image_size = 64
    config.dtype = "float32"
    config.hiera = dict(embed_dim=8, num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], image_size=[64, 64])
    config.dinov2 = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=56)
    config.hiera_checkpoint = ""
    config.dinov2_checkpoint = ""
    config.shared_source_head = False
    config.decoder_channels = (16, 8, 8)
    config.pseudo_label_hidden = (8, 4)
    config.few_shot = 4
    config.source_per_class = 2
    config.target_per_class = 2
    config.epochs = 2
    config.phase1_epochs = 1
    config.steps_per_epoch = 2
    config.learning_rate = 1e-4
    config.warmup_steps = 1
    config.lambda1 = 1.0
    config.lambda2 = 1.0
    config.checkpoint_every = 1
    # Compile the train step for compile speed (nexvitad_jax.compilation): ~4x faster compilation,
    # ~1.6x slower steps on CPU; pays for runs of a few hundred steps or fewer (tests set it).
    config.fast_compile = False
    # Compute the frozen backbones' outputs for the source and clean target images once, not at
    # every step (nexvitad_jax/train/loop.py: same training, host memory for the features).
    config.feature_cache = False
    config.augmentation = dict(probability=0.5, scale_range=(0.8, 1.25), noise_std=0.05)
    # Memory-bank inference (section 3.2). At 64 px the last layer has 2 x 2 patches per image, so
    # the M = 4 bank images give 16 points there: K must stay below that.
    config.k = 8
    config.sigma = 2.0
    config.bank_features = "interleaved"  # or "hiera-adapted", "dino-projected"
    config.bank_layers = (0, 1, 2, 3)
    config.kmeans = dict(max_iters=100)
    config.eval_batch_size = 8
    return config
