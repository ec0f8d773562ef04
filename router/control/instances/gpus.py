"""The GPUs a replica may be given: counted on this machine, checked, and set as
``CUDA_VISIBLE_DEVICES``.

The NVIDIA driver lists one directory per GPU under ``/proc/driver/nvidia/gpus`` (no driver:
no directory, no GPU). ``manager.gpus`` overrides the count where /proc does not show the
driver (some containers). Only instances that ask for a GPU are checked, so a machine
without GPUs runs every other instance.
"""

from __future__ import annotations

from pathlib import Path

from router.core.config import InstanceConfig
from router.core.errors import InvalidGpuId

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def count_gpus(configured: int | None, root: Path = NVIDIA_GPUS) -> int:
    if configured is not None:
        return configured
    try:
        return sum(1 for entry in root.iterdir() if entry.is_dir())
    except OSError:
        return 0


def requested(instance: InstanceConfig) -> tuple[int, ...]:
    gpu = instance.gpu
    if gpu is None:
        return ()
    return (gpu,) if isinstance(gpu, int) else gpu


def check_gpus(instance: InstanceConfig, present: int) -> None:
    """``InvalidGpuId`` if the instance names a GPU this machine does not have."""
    wanted = requested(instance)
    missing = sorted({g for g in wanted if g >= present})
    if not missing:
        return
    have = f"GPUs 0-{present - 1}" if present else "no GPU"
    raise InvalidGpuId(f"gpu {', '.join(map(str, missing))}: this machine has {have} "
                       "(manager.gpus, or /proc/driver/nvidia/gpus)")


def visible_devices(instance: InstanceConfig, replica: int) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for replica ``replica``; None: the instance asks for none."""
    wanted = requested(instance)
    if not wanted:
        return None
    return str(wanted[replica % len(wanted)])
