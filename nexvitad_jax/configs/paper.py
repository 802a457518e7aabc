"""NexViTAD as in the paper: Hiera-Huge + DINOv2-S (converted checkpoints), 224 px, 50 epochs, Adam
1e-4 with warmup + cosine decay, lambda1 = lambda2 = 1, M = 10 few-shot target images, K = 30.
Every config default is defined here; tiny.py and demo.py override a few fields.

    python -m converters hiera --source facebook/hiera-huge-224-hf --out checkpoints/hiera-huge
    python -m converters dinov2 --source facebook/dinov2-small --out checkpoints/dinov2-small
    nexvitad run --config paper --data PATH/TO/mvtec --split 11/1
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # the split draw, the few-shot images, the initialization, K-means

    config.data = ml_collections.ConfigDict()
    config.data.image_size = 224
    config.data.few_shot = 10  # M: normal images per target class (adaptation and memory bank)

    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype of the backbones and heads: float32 or bfloat16
    # A backbone: a named variant plus any config fields to change (no variant: the family's defaults).
    config.model.hiera = ml_collections.ConfigDict({"variant": "huge"})
    config.model.dinov2 = ml_collections.ConfigDict({"variant": "small"})
    # Converted checkpoints (python -m converters); "" draws random weights.
    config.model.hiera_checkpoint = "checkpoints/hiera-huge"
    config.model.dinov2_checkpoint = "checkpoints/dinov2-small"
    config.model.shared_source_head = False  # True: one head for all source classes (the MTL ablation)
    config.model.decoder_channels = (256, 128, 64)
    # The segmentation head's 2x2 stride-2 transposed convolution (the paper's Up(.), widths unstated):
    # "width" maps the coarse map to the block's width, as a standard U-Net; "keep" keeps its channels
    # (a 4096 -> 4096 one first at Hiera-Huge: 7x the head's weights, 2x its FLOPs; benchmarks/upconv.py).
    config.model.upconv = "width"
    config.model.pseudo_label_hidden = (64, 32)
    # How the stacked heads run (same function either way): "unrolled", each head its own convolutions,
    # or "vmapped", one computation whose convolutions are grouped (slow on XLA:CPU; decoder.HEAD_BATCHING).
    config.model.head_batching = "unrolled"

    config.train = ml_collections.ConfigDict()
    config.train.source_per_class = 4  # images of each source class per step
    config.train.target_per_class = 4  # images of each target class per step (phase 2)
    config.train.epochs = 50
    config.train.phase1_epochs = 25  # source-only epochs before the joint phase
    config.train.steps_per_epoch = 0  # 0: one pass over the largest source class
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 500
    config.train.lambda1 = 1.0  # eq. 8: target cross-entropy against the pseudo-labels
    config.train.lambda2 = 1.0  # eq. 8: augmentation-consistency MSE
    config.train.checkpoint_every = 500
    # Compile the train step for compile speed (nexvitad_jax.compilation): faster compilation, slower
    # steps; pays for short runs (the tests set it).
    config.train.fast_compile = False
    # Opt-in: the frozen backbones' outputs for the never-augmented images computed once and held
    # in host memory (~6.4 MB per source image for Hiera-Huge + DINOv2-S at 224, float32); the same
    # training, see nexvitad_jax/train/batches.py and benchmarks/results/train_step.json.
    config.train.feature_cache = False
    config.train.augmentation = ml_collections.ConfigDict(
        {"probability": 0.5, "scale_range": (0.8, 1.25), "noise_std": 0.05})

    config.bank = ml_collections.ConfigDict()  # memory-bank inference (section 3.2)
    config.bank.k = 30  # Sinkhorn K-means prototypes per layer
    config.bank.sigma = 2.0  # Gaussian smoothing of the anomaly maps
    config.bank.features = "interleaved"  # or "hiera-adapted", "dino-projected"
    config.bank.layers = (0, 1, 2, 3)
    # Sinkhorn K-means: entropic epsilon relative to the bank's variance, outer iterations, and the
    # largest relative prototype move that counts as converged.
    config.bank.kmeans = ml_collections.ConfigDict({"epsilon": 0.05, "max_iters": 100, "tol": 1e-4})

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 8  # images per inference call (memory bank and decoder)
    return config
