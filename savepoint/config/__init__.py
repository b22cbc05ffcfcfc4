"""Job configuration: dataclass sections, TOML + command-line parsing, validation, export."""

from savepoint.config.job_config import (
    Checkpoint,
    Comm,
    Job,
    JobConfig,
    LRScheduler,
    Metrics,
    Model,
    Optimizer,
    Parallelism,
    Training,
)
from savepoint.config.manager import (
    config_to_dict,
    config_to_toml,
    help_text,
    parse_args,
    wants_help,
)
from savepoint.config.validate import validate

__all__ = [
    "Checkpoint",
    "Comm",
    "Job",
    "JobConfig",
    "LRScheduler",
    "Metrics",
    "Model",
    "Optimizer",
    "Parallelism",
    "Training",
    "config_to_dict",
    "config_to_toml",
    "help_text",
    "parse_args",
    "validate",
    "wants_help",
]
