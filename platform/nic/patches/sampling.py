"""Mixed-task sampling: every batch mixes every task, and every task is seen as often as the others.

Tasks differ in size by orders of magnitude (a few hundred mitosis patches, tens of thousands of
tissue-type patches). Each epoch draws the same number of samples from every task, resampling
the smaller ones by whole permutations (so each of their samples is seen an even number of times),
then shuffles the union so batches mix tasks. Sharding is by stride over one shared, seeded
permutation: the workers of a DDP run see disjoint samples without exchanging anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from nic.patches.readers import PatchSet


@dataclass
class MixedPatches:
    """All tasks' patches in one set of arrays: tiles, labels and the task index of each sample.

    Per-pixel targets of dense tasks are kept for their samples only (`dense_index` maps a
    sample to its row of `masks`/`types`, -1 for patch samples), so patch tasks cost no mask
    memory; all three are None when no task is dense.
    """

    images: np.ndarray  # (N, P, P, 3) uint8
    labels: np.ndarray  # (N,) float32
    task_ids: np.ndarray  # (N,) int64
    task_names: list[str]
    dense_index: np.ndarray | None = None  # (N,) int64
    masks: np.ndarray | None = None  # (M, P, P) int16
    types: np.ndarray | None = None  # (M, P, P) int16 (zeros for untyped tasks)

    @classmethod
    def concat(cls, sets: Sequence[PatchSet]) -> MixedPatches:
        if not sets:
            raise ValueError("no patch sets to mix")
        mixed = cls(
            images=np.concatenate([s.images for s in sets]),
            labels=np.concatenate([s.labels for s in sets]).astype(np.float32),
            task_ids=np.concatenate([np.full(len(s), k, dtype=np.int64) for k, s in enumerate(sets)]),
            task_names=[s.task for s in sets],
        )
        dense = [s for s in sets if s.masks is not None]
        if dense:
            rows, start = [], 0
            for s in sets:
                if s.masks is None:
                    rows.append(np.full(len(s), -1, np.int64))
                else:
                    rows.append(np.arange(start, start + len(s), dtype=np.int64))
                    start += len(s)
            mixed.dense_index = np.concatenate(rows)
            mixed.masks = np.concatenate([s.masks for s in dense]).astype(np.int16)
            mixed.types = np.concatenate([s.types if s.types is not None else np.zeros_like(s.masks)
                                          for s in dense]).astype(np.int16)
        return mixed

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays the training loop reads, keys prefixed with the split (`train_`, `val_`);
        dense keys only when a task is dense."""
        out = {f"{prefix}images": self.images, f"{prefix}labels": self.labels, f"{prefix}tasks": self.task_ids}
        if self.dense_index is not None:
            assert self.masks is not None and self.types is not None  # set with dense_index (mix)
            out.update({f"{prefix}dense_index": self.dense_index, f"{prefix}masks": self.masks,
                        f"{prefix}types": self.types})
        return out

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def task_sizes(self) -> list[int]:
        return np.bincount(self.task_ids, minlength=len(self.task_names)).tolist()


def _even_draw(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` items from `indices` by concatenated permutations: each item appears floor or ceil times."""
    reps = -(-count // len(indices))
    return np.concatenate([rng.permutation(indices) for _ in range(reps)])[:count]


class MixedTaskSampler:
    """Per-epoch sample order for one worker of a (possibly distributed) run."""

    def __init__(
        self,
        task_ids: np.ndarray,
        samples_per_task: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.groups = [np.flatnonzero(task_ids == k) for k in range(int(task_ids.max()) + 1)]
        if any(len(g) == 0 for g in self.groups):
            raise ValueError("a task has no samples")
        self.samples_per_task = samples_per_task or max(len(g) for g in self.groups)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def epoch_length(self) -> int:
        """Samples per worker per epoch (equal on every worker, so DDP steps stay in lock-step)."""
        return (self.samples_per_task * len(self.groups)) // self.world_size

    def indices(self, epoch: int) -> np.ndarray:
        """This worker's sample indices for `epoch`; the same (seed, epoch) gives the same order."""
        rng = np.random.default_rng([self.seed, epoch])
        drawn = np.concatenate([_even_draw(g, self.samples_per_task, rng) for g in self.groups])
        order = rng.permutation(drawn)
        order = order[: self.epoch_length() * self.world_size]
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int, batch_size: int) -> Iterator[np.ndarray]:
        """Index batches; a last batch smaller than half `batch_size` is dropped (BatchNorm needs samples)."""
        idx = self.indices(epoch)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            if len(chunk) < max(2, batch_size // 2) and start > 0:
                return
            yield chunk

    def num_batches(self, batch_size: int) -> int:
        n = self.epoch_length()
        full, rest = divmod(n, batch_size)
        return full + (1 if rest and (rest >= max(2, batch_size // 2) or full == 0) else 0)


def eval_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """This worker's contiguous share of `n` evaluation samples, in batches (no sample twice)."""
    share = np.array_split(np.arange(n), world_size)[rank]
    for start in range(0, len(share), batch_size):
        yield share[start : start + batch_size]
