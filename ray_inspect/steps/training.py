"""The training loop: shuffled chunk-streaming batches from Zarr, one epoch at a time.

``train_epoch`` is the unit every Ray Train worker runs (it takes any model, DDP-wrapped or not,
and any iterable of batches); ``distributed.train.fit`` drives it, on a local Ray or a cluster.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ray_inspect.config import ModelConfig, TrainConfig
from ray_inspect.core.defects import paste_defects
from ray_inspect.core.inference import precision_context, resolve_precision
from ray_inspect.core.losses import LossFn, make_loss
from ray_inspect.core.model import build_model
from ray_inspect.io.artifact import ModelCard, load_alexnet, score_range
from ray_inspect.io.patches import read_rows


def check_layout(n: int, world: int, batch_size: int) -> None:
    """Whether ``n`` patches can feed ``world`` data-parallel ranks in equal steps (ValueError if not)."""
    if n < world:
        raise ValueError(f"{n} patches cannot feed {world} workers (each needs at least one); "
                         "prepare more patches or train with fewer workers")
    if batch_size == 1 and world > 1 and n % world:
        raise ValueError(f"batch size 1 with {world} workers needs a patch count divisible by {world}, "
                         f"not {n}: use a larger batch size")


class PatchBatches:
    """Batches of one rank's shard of a patch array, reshuffled every epoch, read a few chunks at a time.

    Each epoch permutes the chunks (seeded by seed and epoch) into one sequence of patches and gives
    rank r its contiguous slice [r*N/world, (r+1)*N/world): shards are disjoint, cover every patch
    once and differ by at most one patch, whatever the chunk sizes and however few the chunks.
    Patches are shuffled inside a window of ``window`` chunks, so memory stays at a few chunks.
    Every rank yields the same number of batches (``steps``), as DDP's collectives require: full
    batches and a smaller last one; a shard one patch short of the others splits its last full
    batch in two. ``augment`` ("flips", "dihedral") transforms each patch at random. Each batch is
    a pair (network input, target): the same tensor, or with ``defects`` > 0 an input in which that
    share of the patches carries a synthetic defect (core.defects) and the clean patches as target.
    """

    def __init__(self, array, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,  # noqa: PLR0913 - the array, its shard and how it is read
                 window: int = 4, augment: str = "none", defects: float = 0.0):
        check_layout(array.shape[0], world, batch_size)
        self.array, self.batch_size, self.seed = array, batch_size, seed
        self.rank, self.world, self.window, self.augment = rank, world, window, augment
        self.defects = defects
        self.n = array.shape[0]
        self.chunk = array.chunks[0]
        self.n_chunks = -(-self.n // self.chunk)

    def __len__(self) -> int:
        return self.n

    def bounds(self, rank: int) -> tuple[int, int]:
        """Positions [lo, hi) of ``rank``'s shard in the epoch's patch sequence."""
        return rank * self.n // self.world, (rank + 1) * self.n // self.world

    @property
    def steps(self) -> int:
        """Batches every rank runs per epoch: those of the largest shard."""
        largest = -(-self.n // self.world)
        return -(-largest // self.batch_size)

    def batch_sizes(self) -> list[int]:
        lo, hi = self.bounds(self.rank)
        m, b = hi - lo, self.batch_size
        sizes = [b] * (m // b) + ([m % b] if m % b else [])
        if len(sizes) < self.steps:            # one patch short of the largest shard: one more step
            i = max(range(len(sizes)), key=sizes.__getitem__)
            sizes[i : i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
        return sizes

    def pieces(self, epoch: int) -> list[tuple[int, int]]:
        """Array rows [start, stop) of this rank's shard in this epoch's order, at most one per chunk."""
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n_chunks)
        lo, hi = self.bounds(self.rank)
        out, pos = [], 0
        for c in order:
            c0 = int(c) * self.chunk
            size = min(self.chunk, self.n - c0)
            a, b = max(lo, pos), min(hi, pos + size)
            if a < b:
                out.append((c0 + a - pos, c0 + b - pos))
            pos += size
        return out

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng((self.seed, epoch, self.rank))
        defect_rng = np.random.default_rng((self.seed, epoch, self.rank, 1))   # order stays as without
        pieces = self.pieces(epoch)
        sizes = iter(self.batch_sizes())
        want = next(sizes, None)
        carry = np.empty((0,) + self.array.shape[1:], np.uint8)
        for w in range(0, len(pieces), self.window):
            rows = [read_rows(self.array, a, b) for a, b in pieces[w : w + self.window]]
            pool = np.concatenate([carry, *rows])
            pool = pool[rng.permutation(len(pool))]
            s = 0
            while want is not None and len(pool) - s >= want:
                batch = augment(pool[s : s + want], self.augment, rng)
                target = _tensor(batch)
                marked = _tensor(paste_defects(batch, self.defects, defect_rng)) if self.defects else target
                yield marked, target
                s, want = s + want, next(sizes, None)
            carry = pool[s:]


def _tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch.astype(np.float32) / 255.0)


def augment(batch: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """Each (C, H, W) patch of ``batch`` flipped (and for "dihedral" turned by 90-degree steps) at
    random: the 4 or 8 symmetries a texture's statistics do not change under."""
    if how == "none":
        return batch
    n = len(batch)
    out = np.where(rng.random(n)[:, None, None, None] < 0.5, batch[..., ::-1], batch)      # horizontal
    out = np.where(rng.random(n)[:, None, None, None] < 0.5, out[..., ::-1, :], out)         # vertical
    if how == "dihedral":
        out = np.where(rng.random(n)[:, None, None, None] < 0.5, out.swapaxes(-1, -2), out)   # transpose
    return np.ascontiguousarray(out)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    """Set the schedule's rate for ``epoch``; it depends on the epoch alone, so a resumed run matches."""
    lr = cfg.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn: LossFn,  # noqa: PLR0913 - the step's parts and where it reports
                precision: str = "bfloat16", device: torch.device | str = "cpu",
                on_batch: Callable[[int, float], None] | None = None) -> dict:
    """One pass over ``batches`` of (input, target) pairs; returns mean loss, patch count and
    patches/s. ``on_batch(patches, mean loss)`` follows every batch."""
    model.train()
    total, count, t0 = 0.0, 0, time.perf_counter()
    device = torch.device(device)
    precision = resolve_precision(precision, device)   # emulated bfloat16 trains slower than float32
    for x, target in batches:
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if precision == "bfloat16":
            x = x.contiguous(memory_format=torch.channels_last)
        with precision_context(precision, device):
            loss = loss_fn(model, x, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
        if on_batch is not None:
            on_batch(count, total / count)
    dt = time.perf_counter() - t0
    return {"loss": total / max(count, 1), "patches": count, "seconds": dt,
            "patches_per_s": count / dt if dt else 0.0}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build(model_cfg: ModelConfig, train_cfg: TrainConfig, alexnet_weights: str | None = None,
          device: torch.device | str = "cpu"):
    """Seeded model, optimizer and loss, identical on every rank (the frozen AlexNet on ``device``)."""
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    if train_cfg.precision == "bfloat16":
        model = model.to(memory_format=torch.channels_last)
    alexnet = load_alexnet(alexnet_weights).to(device) if model_cfg.loss == "fm" and alexnet_weights else None
    return model, make_optimizer(model, train_cfg), make_loss(model_cfg, alexnet)


def make_card(model_cfg: ModelConfig, train_cfg: TrainConfig, patches_url: str, attrs: dict,
              history: list[dict]) -> ModelCard:
    return ModelCard(
        model=model_cfg, resize=attrs.get("resize"), source_size=attrs.get("source_size"),
        scale=attrs.get("scale"),
        score_range=score_range(model_cfg.loss),
        training={**asdict(train_cfg), "final_loss": history[-1]["loss"] if history else None,
                  "epochs_run": len(history)},
        patches={"url": patches_url, "fingerprint": attrs.get("fingerprint"), "count": attrs.get("patches"),
                 "source": attrs.get("source"), "seed": attrs.get("seed"),
                 "min_short_side": attrs.get("min_short_side")},
    )
