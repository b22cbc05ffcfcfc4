"""The resolved parallel layout of a job: how many ranks replicate, shard and split each layer.

Torch-free and import-free, so the config layer resolves it, the models' parallelize plan and the
device mesh consume it, and ``savepoint check`` builds it in a second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees; ``pp * dp_replicate * dp_shard * tp == world_size``."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    pp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step consumes."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded (FSDP) or replicated-and-sharded (HSDP) over the data-parallel ranks."""
        return self.dp > 1

    def describe(self) -> str:
        parts = [f"PP {self.pp}"] if self.pp > 1 else []
        if self.dp_replicate > 1:
            parts.append(f"HSDP {self.dp_replicate}x{self.dp_shard}")
        elif self.dp_shard > 1:
            parts.append(f"FSDP {self.dp_shard}")
        if self.tp > 1:
            parts.append(f"TP {self.tp}")
        return " + ".join(parts) or "1 process"

    def as_dict(self) -> dict[str, int]:
        degrees = {"data_parallel_replicate_degree": self.dp_replicate, "data_parallel_shard_degree": self.dp_shard,
                   "tensor_parallel_degree": self.tp}
        if self.pp > 1:
            degrees["pipeline_parallel_degree"] = self.pp
        return {**degrees, "world_size": self.world_size}
