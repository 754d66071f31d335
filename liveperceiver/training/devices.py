"""Where training runs: the device `--device` names, each rank's own device and the process group
under torchrun (NCCL between GPUs, gloo between CPU processes), whether bfloat16 autocast pays
there, and the check that data-parallel ranks hold identical weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from liveperceiver.core.errors import UserError
from liveperceiver.core.model import PerceiverAR
from liveperceiver.runtime import checked_device


def training_device(requested: str | torch.device) -> torch.device:
    """This process's device: `requested` (a torch.device, or a `--device` value checked in one line:
    auto is cuda, then mps, then the CPU), under torchrun `rank_device` of it."""
    device = requested if isinstance(requested, torch.device) else checked_device(requested)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, int(os.environ.get("WORLD_SIZE", "1")), local_rank)
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index >= count:
            raise UserError(f"{device}: torch sees {count} CUDA devices here (LOCAL_RANK {local_rank})")
    return device


def rank_device(device: torch.device, world: int, local_rank: int) -> torch.device:
    """The device this rank trains on: under torchrun (world > 1) a CUDA device is the rank's own GPU,
    cuda:LOCAL_RANK (NCCL wants one GPU per rank); the CPU is shared; nothing else runs data-parallel."""
    if world == 1 or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {device}: torchrun trains on CUDA GPUs (NCCL) or the CPU (gloo), not {device.type}")
    if device.index is not None and device.index != local_rank:
        raise UserError(f"--device {device}: under torchrun each rank trains on cuda:LOCAL_RANK; give --device cuda")
    return torch.device("cuda", local_rank)


def process_group_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes (even where a GPU is present but not used)."""
    return "nccl" if device.type == "cuda" else "gloo"


def join_ranks(device: torch.device) -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun: NCCL between
    GPUs (this rank's own set as the current one), gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(process_group_backend(device))
    return dist.get_rank(), world


def exit_rank() -> None:
    """End a data-parallel rank's process (the train command's last act under torchrun; nothing
    without a process group): meet the other ranks, tear the group down and exit without the
    interpreter's finalisation. Why: gloo's worker thread drops its last reference to a finished
    collective's tensors after the caller has moved on, and that decref takes the GIL; during
    finalisation it cannot, and the rank aborts ("terminate called without an active exception":
    one run in five of the two-rank test on a 2-core EPYC; pytorch/pytorch#190489). Destroying the
    group would join those threads, but a DistributedDataParallel model keeps it alive past
    `destroy_process_group` (torch 2.13), so the rank leaves with os._exit once its output is
    flushed: every file of the run is closed by then."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on `device`: a GPU that computes in bfloat16, or a CPU with
    native bfloat16 (`cpu_has_native_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bfloat16 autocast pays (measured 1.5-2x faster than float32 on an
    AVX512-BF16 EPYC; on an AVX2-only one the emulation made a step about 10x slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def record_rank_checksums(model: PerceiverAR, out: Path, rank: int, world: int) -> None:
    """Per-rank parameter checksums in ranks.json: data-parallel ranks must hold identical weights."""
    import json

    import torch.distributed as dist

    with torch.no_grad():
        mine = [float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (out / "ranks.json").write_text(json.dumps({"world_size": world, "checksums": gathered}) + "\n")
