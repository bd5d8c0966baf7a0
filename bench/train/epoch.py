"""One epoch of the paper's recipe: the optimizer, the augmentation (random crop after
padding, horizontal flip) on the device, the seeded order of the images, test accuracy."""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from bench.data.cifar import ImageSet
from bench.data.splits import batches
from bench.train.recipes import Recipe, TrainConfig


def make_optimizer(model: nn.Module, recipe: Recipe, device: str) -> torch.optim.Optimizer:
    """The paper's SGD; on a GPU the fused kernel (one launch for every parameter instead of
    a few per parameter: the same update, less time between steps)."""
    return torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        fused=True if str(device).startswith("cuda") else None,
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: Tensor,
    y_train: Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    config: TrainConfig,
    bar: tqdm | None = None,
) -> tuple[float, float]:
    """One pass in the generator's order; returns mean loss and train accuracy. Sums stay
    on the device; each step's loss is checked (one sync a step, as AMP's GradScaler
    makes): a non-finite one raises `Diverged` before its gradients touch the weights."""
    model.train()
    n = len(y_train)
    order = torch.randperm(n, generator=generator).to(x_train.device)
    shifts = torch.randint(0, 2 * recipe.pad + 1, (2, n), generator=generator).to(x_train.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x_train.device) & recipe.flip
    loss_sum = torch.zeros((), device=x_train.device)
    correct = torch.zeros((), device=x_train.device, dtype=torch.long)
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    dtype = next(model.parameters()).dtype  # float32 but for numerical checks (float64)
    for start in range(0, n, recipe.batch_size):
        idx = order[start : start + recipe.batch_size]
        x = augment(x_train[idx], shifts[0, idx], shifts[1, idx], flips[idx], recipe).to(dtype)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(x.contiguous(memory_format=memory))
            loss = F.cross_entropy(logits, y_train[idx])
        if not torch.isfinite(loss):  # before backward: the weights stay those that made it
            where = first_nonfinite(model, x, memory, config.bf16)
            raise Diverged(start // recipe.batch_size + 1, -(-n // recipe.batch_size), where)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().float() * len(idx)
        correct += (logits.detach().argmax(1) == y_train[idx]).sum()
        if bar is not None and not bar.disable:
            bar.update()
            if bar.n % 25 == 0:  # reading numbers waits for the device: not every step
                seen = min(start + recipe.batch_size, n)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    return loss_sum.item() / n, correct.item() / n


class Diverged(Exception):
    """A training step whose loss is not finite: `step` of `steps` (1-based, in its epoch),
    `where` names the first parameter, buffer or activation that is not finite."""

    def __init__(self, step: int, steps: int, where: str):
        super().__init__(f"step {step} of {steps}: first non-finite: {where}")
        self.step, self.steps, self.where = step, steps, where


def nonfinite_tensor(model: nn.Module, buffers: bool = True) -> str:
    """The first parameter (then, with `buffers`, buffer) of `model`, in registration order,
    holding a value that is not finite, as "parameter NAME" / "buffer NAME"; '' if none."""
    named = [("parameter", model.named_parameters())] + (
        [("buffer", model.named_buffers())] if buffers else []
    )
    for kind, tensors in named:
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{kind} {name}"
    return ""


@torch.no_grad()
def first_nonfinite(
    model: nn.Module, x: Tensor, memory: torch.memory_format = torch.contiguous_format, bf16: bool = False
) -> str:
    """What went non-finite first on the batch `x`: a parameter, else the first module (in
    the order the forward pass finishes them) whose output is not finite, run on a copy of
    the model in its own mode, else a buffer. Buffers come last: the failing forward pass
    itself has already folded its non-finite activations into the BN running statistics."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module
    found = nonfinite_tensor(model, buffers=False)
    if found:
        return found
    copy = deepcopy(model)
    names = {module: name for name, module in copy.named_modules()}
    first: list[str] = []

    def check(module: nn.Module, _: object, out: object) -> None:
        if not first and isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
            first.append(f"the output of {names[module] or 'the network'} ({type(module).__name__})")

    hooks = [m.register_forward_hook(check) for m in copy.modules()]
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            copy(x.contiguous(memory_format=memory))
    finally:
        for hook in hooks:
            hook.remove()
    return (
        first[0]
        if first
        else nonfinite_tensor(model) or "the loss (every activation finite: the logits overflow it)"
    )


def augment(x: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, recipe: Recipe) -> Tensor:
    """uint8 B x 3 x H x W -> float [0, 1]: pad by `recipe.pad` (zeros or reflection),
    take the H x W window at (dy, dx), mirrored where `flip`; one gather for both."""
    height, width = x.shape[-2:]
    x = x.float().div_(255)
    if recipe.pad:
        x = F.pad(x, (recipe.pad,) * 4, mode=recipe.pad_mode)
    down, across = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    rows = (dy[:, None] + down)[:, None, :, None]
    cols = torch.where(flip[:, None], dx[:, None] + width - 1 - across, dx[:, None] + across)[
        :, None, None, :
    ]
    batch = torch.arange(len(x), device=x.device)[:, None, None, None]
    channel = torch.arange(3, device=x.device)[None, :, None, None]
    return x[batch, channel, rows, cols]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch: order, crops and flips depend on (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


@torch.no_grad()
def test_accuracy(
    model: nn.Module, test: ImageSet, device: torch.device, batch_size: int | None = None
) -> float:
    """Clean accuracy of `model` (put in eval mode) on the ImageSet `test`; by default 256
    images a batch on a CPU (3x faster there than 1,000, which stay out of its caches)
    and 1,000 on a GPU."""
    model.eval()
    size = batch_size or (256 if torch.device(device).type == "cpu" else 1000)
    correct = sum(
        (model(x).argmax(1) == y).sum().item() for x, y in batches(test.images, test.labels, size, device)
    )
    return correct / len(test)
