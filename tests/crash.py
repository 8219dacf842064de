"""A simulated kill inside training: the trainer's step raises at a chosen step (for resume-equals-straight tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def crash_at(monkeypatch: pytest.MonkeyPatch, at: int) -> Callable:
    """Make `vsae.trainer.update_step` raise RuntimeError("simulated kill") when it reaches step `at`; returns the
    real step, to put back with `restore`."""
    import vsae.trainer as tr

    real = tr.update_step

    def crashing(s, x, step, *a):
        if step == at:
            raise RuntimeError("simulated kill")
        real(s, x, step, *a)

    monkeypatch.setattr(tr, "update_step", crashing)
    return real


def restore(monkeypatch: pytest.MonkeyPatch, real: Callable) -> None:
    import vsae.trainer as tr

    monkeypatch.setattr(tr, "update_step", real)
