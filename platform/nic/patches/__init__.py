"""Patch task datasets: task specs (tasks.yaml), readers, mixed-task sampling, batch augmentation."""

from nic.patches.readers import PatchDataError, PatchSet, load_task, read_patches
from nic.patches.sampling import MixedPatches, MixedTaskSampler
from nic.patches.tasks import TaskSpec, load_tasks, select_tasks

__all__ = [
    "MixedPatches",
    "MixedTaskSampler",
    "PatchDataError",
    "PatchSet",
    "TaskSpec",
    "load_task",
    "load_tasks",
    "read_patches",
    "select_tasks",
]
