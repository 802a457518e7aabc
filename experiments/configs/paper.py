"""NexViTAD as in the paper: Hiera-Huge + DINOv2-S (converted checkpoints), 224 px, 50 epochs,
Adam 1e-4 with warmup + cosine decay, l1 = l2 = 1, M = 10 few-shot target images.

    python -m converters hiera --source facebook/hiera-huge-224-hf --out checkpoints/hiera-huge
    python -m converters dinov2 --source facebook/dinov2-small --out checkpoints/dinov2-small
    nexvitad run --config experiments/configs/paper.py --data PATH/TO/mvtec --split 11/1
"""

import ml_collections

from experiments.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.image_size = 224
    # Variant names replace tiny's config dicts (a ConfigDict field keeps its type: drop it first).
    del config["hiera"], config["dinov2"]
    config.hiera = "huge"
    config.dinov2 = "small"
    config.hiera_checkpoint = "checkpoints/hiera-huge"
    config.dinov2_checkpoint = "checkpoints/dinov2-small"
    config.decoder_channels = (256, 128, 64)
    config.pseudo_label_hidden = (64, 32)
    config.few_shot = 10
    config.source_per_class = 4
    config.target_per_class = 4
    config.epochs = 50
    config.phase1_epochs = 25
    config.steps_per_epoch = 0  # 0: one pass over the largest source class
    config.warmup_steps = 500
    config.checkpoint_every = 500
    # Opt-in: saves most of the backbone compute per step, needs ~6.4 MB of host memory per source
    # image (Hiera-Huge + DINOv2-S outputs at 224, float32); see benchmarks/results/train_step.json.
    config.feature_cache = False
    config.k = 30
    return config
