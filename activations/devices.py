"""The torch device a command runs on: `auto` (the default everywhere) is CUDA when this machine has it, else CPU."""

from __future__ import annotations

AUTO = "auto"


def resolve_device(name: str) -> str:
    """`name` with `auto` resolved; a device torch does not know, or CUDA on a machine without it, is a ValueError
    naming the flag's value and the fix."""
    import torch

    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: vsae runs on cpu or cuda")
    return name
