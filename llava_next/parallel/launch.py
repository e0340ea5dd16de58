"""Processes started by torchrun: who this process is, the process group, rank-0 output, one error for all.

    env = dist_env()                          # RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them
    mesh = init_mesh("cpu")                   # gloo on CPU, NCCL on CUDA; a 1-D DeviceMesh named "tp"
    rank0_output(env)                         # ranks > 0 print nothing (stdout and stderr to /dev/null)
    pipe = agree("loading the checkpoint", lambda: load(...))   # an error on any rank -> the same error on all

torchrun (``torch.distributed.run``) starts the processes and sets the environment; nothing here starts
processes or talks over its own sockets. Choices:
- One error for all ranks (``agree``): the steps where a rank can fail on its own (reading its slices
  of the checkpoint, its copy of the media, a memory check) run inside ``agree``, which all-gathers
  every rank's outcome (``dist.all_gather_object``) afterwards. If any rank failed, every rank raises
  ``RankFailedError`` with the first failing rank's message, so all processes end together, with exit
  status 2, and rank 0 prints that one message. No rank is left waiting in a collective for a peer
  that has already gone.
- Anything that fails *inside* a collective (a peer killed, a bug) cannot be agreed on. Then gloo
  raises on the waiting ranks as soon as the peer's connection closes, torchrun stops the remaining
  workers when one exits non-zero, and the process group's timeout (``LLAVA_NEXT_DIST_TIMEOUT``
  seconds, default 300) bounds every collective that waits for a peer that never comes. A failing
  rank > 0 writes its one line to the real stderr, prefixed with its rank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300.0
_SILENCED = False  # rank0_output ran


class RankFailedError(ValueError):
    """A step failed on some rank; raised on every rank with that rank's message."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """This process's place, from the variables torchrun sets (a single process without them)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None

    env = DistEnv(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={env.world_size}); start the "
                         f"processes with torchrun, which sets both")
    return env


def timeout_s() -> float:
    value = os.environ.get("LLAVA_NEXT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"LLAVA_NEXT_DIST_TIMEOUT={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"LLAVA_NEXT_DIST_TIMEOUT must be > 0 seconds, got {value}")
    return seconds


def init_mesh(device_type: str = "cpu"):
    """The default process group (gloo on CPU, NCCL on CUDA) and a 1-D DeviceMesh ``("tp",)`` over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    env = dist_env()
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s()))
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def rank0_output(env: DistEnv) -> None:
    """Ranks > 0 print nothing: their stdout and stderr go to /dev/null (``sys.__stderr__`` stays open
    for ``report_own_failure``). The answer, the plan and the progress lines come from rank 0 alone."""
    global _SILENCED
    if env.rank != 0 and not _SILENCED:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        _SILENCED = True


def report_own_failure(env: DistEnv, message: str) -> None:
    """A rank > 0 that fails outside ``agree`` says so once on the real stderr (rank 0's stderr is the normal one)."""
    if env.rank != 0 and sys.__stderr__ is not None:
        print(f"[llava-next rank {env.rank}/{env.world_size}] {message}", file=sys.__stderr__, flush=True)


def agree(what: str, step: Callable[[], T], *, user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> T:
    """Run ``step`` on every rank, then compare outcomes; if it raised anywhere, raise ``RankFailedError`` on
    every rank naming the first rank that failed and its message. Without a process group: just ``step()``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return step()
    result, outcome = None, None
    try:
        result = step()
    except user_errors as e:
        outcome = f"{_message(e)}"
    except Exception as e:  # a bug: keep the type so the report says what broke
        outcome = f"internal error {type(e).__name__}: {_message(e)} (a bug in llava-next; please report it)"
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {rank} of {len(outcomes)}{others} failed {what}: {message}")
    return result  # type: ignore[return-value]


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e).strip() or type(e).__name__
