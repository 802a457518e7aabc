"""The default of `nexvitad run`: the tiny random-initialized backbones of tiny.py at 128 px on the
synthetic set, with the memory bank on the two finest layers (with random backbones the coarse
layers add mostly noise).

    nexvitad run                     # the same as: nexvitad run --config demo
"""

import ml_collections

from nexvitad_jax.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.data.image_size = 128
    config.model.hiera.image_size = [128, 128]
    config.bank.k = 16
    config.bank.layers = (0, 1)
    return config
