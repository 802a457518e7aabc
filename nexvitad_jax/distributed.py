"""Several hosts: every host starts the same command with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM, which jax detects itself); a single host
needs nothing."""

from __future__ import annotations

import os

import jax

from nexvitad_jax.errors import UserInputError


def initialize_distributed() -> None:
    """`jax.distributed.initialize` when the environment describes a multi-host run."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as error:
            raise UserInputError(f"JAX_COORDINATOR_ADDRESS={address} is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                                 f"must be integers too ({error})") from None
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
