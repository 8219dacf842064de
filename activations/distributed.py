"""torch.distributed for vsae's commands: the process group torchrun starts, each rank's device and share of the
work, and the checks that keep ranks in step (same settings, one outcome).

Under `torchrun` every process reads RANK, WORLD_SIZE and LOCAL_RANK from its environment; without them a command
runs as one process and every function here is a no-op. The backend is NCCL on CUDA and gloo on the CPU (the same
engine on one machine or several: `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

# A harvest's ranks wait for the slowest one at the end (a rank further into the corpus also tokenizes the text
# before its range): far longer than torch's default collective timeout of 10-30 minutes.
HARVEST_TIMEOUT = datetime.timedelta(days=7)


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks of one job disagree; the message names the rank and the fix."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, number of processes, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK); one process when they are unset."""
    env = os.environ if env is None else env
    try:
        ranks = Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the command with torchrun, "
                         "or unset them") from None
    if not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world_size}; start the command with "
                         f"torchrun, or unset them")
    return ranks


def rank_device(name: str, world_size: int = 1, local_rank: int = 0) -> torch.device:
    """The device this rank computes on: under torchrun a bare "cuda" means this rank's GPU, cuda:LOCAL_RANK (an
    explicit index is kept)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def process_group(device: str, timeout: datetime.timedelta | None = None,
                  env: Mapping[str, str] | None = None) -> Iterator[Ranks]:
    """Join the job torchrun started (NCCL for a CUDA `device`, else gloo) for the duration of the block; yields
    this process's `Ranks`. Outside torchrun it yields one rank and starts nothing."""
    ranks = env_ranks(env)
    if not ranks.distributed:
        yield ranks
        return
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank_device(device, ranks.world_size, ranks.local_rank))  # else all on GPU 0
    dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def block_range(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of n items: sizes differ by at most one, and the shares of ranks 0, 1, ...
    follow each other in order (so rank 0 holds the first items)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def all_gather(obj: object, ranks: Ranks) -> list:
    """Every rank's `obj` (JSON-able), in rank order; [obj] for one process."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def settings_digest(settings: Mapping[str, object]) -> dict[str, str]:
    """A short hash of each setting's JSON form: what ranks exchange to compare their settings."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in settings.items()}


def disagreement(digests: list[dict[str, str]]) -> dict[str, list[int]]:
    """{setting: the ranks whose value differs from rank 0's} over every rank's `settings_digest`."""
    keys = sorted(set().union(*digests))
    differ = {k: [r for r, d in enumerate(digests) if d.get(k) != digests[0].get(k)] for k in keys}
    return {k: rs for k, rs in differ.items() if rs}


def check_agreement(settings: Mapping[str, object], ranks: Ranks, command: str) -> None:
    """Refuse, on every rank at once, a job whose ranks were started with different settings (a collective: all
    ranks call it at the same point)."""
    differ = disagreement(all_gather(settings_digest(settings), ranks))
    if differ:
        named = "; ".join(f"{k} (rank {rs[0]} differs from rank 0)" if len(rs) == 1 else
                          f"{k} (ranks {', '.join(map(str, rs))} differ from rank 0)" for k, rs in differ.items())
        raise DistributedError(f"the {ranks.world_size} ranks of this `vsae {command}` disagree on {named}; start "
                               f"every rank with the same flags and inputs")


def settle(step: str, ranks: Ranks, work: Callable[[], T]) -> T:
    """Run `work` on this rank and return its result, once every rank has learnt whether any rank failed (a
    collective: all ranks call it at the same point). A failed rank re-raises its own error, the others raise
    DistributedError naming it, so no rank is left waiting at the next collective for a peer that gave up."""
    try:
        result, error = work(), None
    except Exception as e:
        result, error = None, e
    failures = all_gather(None if error is None else f"{type(error).__name__}: {error}", ranks)
    if error is not None:
        raise error
    for r, failure in enumerate(failures):
        if failure is not None:
            raise DistributedError(f"rank {r} failed while {step}: {failure}")
    return result
