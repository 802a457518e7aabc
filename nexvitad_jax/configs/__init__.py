"""The configs the library ships: `paper` (the base, the paper's values), `tiny` and `demo` (derived).

Each module's `get_config()` returns an ml_collections ConfigDict nested by concern: `data`,
`model`, `train`, `bank` (memory-bank inference) and `eval`, plus the run's `seed`. Every default
is defined once, in paper.py; a derived config overrides a few fields. `nexvitad_jax.config`
loads them by name or by file and applies `--set section.field=value` overrides.
"""

NAMES = ("paper", "tiny", "demo")
DEFAULT = "demo"
