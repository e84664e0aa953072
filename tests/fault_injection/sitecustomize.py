"""Fault injection for the interruption tests: with this folder on PYTHONPATH, Python imports this module at
start-up in every process (DVC's too), and `LDM_FAULT` makes the training process hurt itself at a given step.

    LDM_FAULT=kill:N                SIGKILL at the end of step N, before that step's checkpoint could be written
    LDM_FAULT=kill-in-checkpoint:N  SIGKILL while step N's checkpoint is being written (tensors on disk, no state)
    LDM_FAULT=term:N                SIGTERM at the end of step N, as `kill` or a scheduler would send it
    LDM_FAULT_RANK=R                only in rank R of a torchrun world (default: every process)

The faults go into `ldm.training.checkpoint` as it is imported, so the stage runs its real code up to the fault.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

FAULT = os.environ.get("LDM_FAULT")


def _inject(checkpoint, action: str, step: int) -> None:
    end_step, save_file = checkpoint.ResumableRun.end_step, checkpoint.save_file

    def faulty_end_step(self, at: int, *args, **kwargs) -> None:
        if at == step and action in ("kill", "term"):
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
        end_step(self, at, *args, **kwargs)

    def faulty_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        if action == "kill-in-checkpoint" and f".step-{step:06d}." in str(filename):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.ResumableRun.end_step = faulty_end_step
    checkpoint.save_file = faulty_save_file


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `_inject` on `ldm.training.checkpoint` right after the module's own code, once."""

    def __init__(self, action: str, step: int):
        self.action, self.step = action, step

    def find_spec(self, name, path, target=None):
        if name != "ldm.training.checkpoint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_inject(module):
            exec_module(module)
            _inject(module, self.action, self.step)

        spec.loader.exec_module = exec_and_inject
        return spec


if FAULT and os.environ.get("LDM_FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
    _action, _, _step = FAULT.partition(":")
    sys.meta_path.insert(0, _AfterImport(_action, int(_step)))
