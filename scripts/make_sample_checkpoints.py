"""Generate the bundled sample runs in `sample_checkpoints/` by really training a small BN CNN.

Run once by developers (never in CI); the output is committed. It needs scikit-learn for its
bundled 8x8 digits dataset (no download). scikit-learn is not a bnwd dependency, so use a
separate venv outside the repository, with the project's torch:

    python3 -m venv /tmp/sample-venv
    echo "torch==2.13.0" > /tmp/torch-pin.txt
    /tmp/sample-venv/bin/pip install -c /tmp/torch-pin.txt torch==2.13.0 numpy scikit-learn
    /tmp/sample-venv/bin/python scripts/make_sample_checkpoints.py

It takes about a minute on 2 CPU cores. It trains the model in `sample_checkpoints/model.py`
(conv-BN-ReLU x3, global average pool, linear head; `conv2` has a dead bias before its BN) with
`torch.optim.SGD(momentum=0.9)` at a constant learning rate (no schedule, so what changes is
weight decay's doing). Both runs use the same seed, init and batches, and random +-1 pixel shifts,
which keep the gradient noise alive after the training set is fitted. It writes two runs:

    sample_checkpoints/sgd_wd_all/      weight decay on every parameter (PyTorch default, 1 group)
    sample_checkpoints/sgd_no_conv_wd/  the blog's "NoConvL2": weight_decay=0 for the conv weights,
                                        decay on everything else (BN gamma/beta, conv2.bias, fc)

Each run folder holds `step_000000.pt` (init) ... `step_003000.pt`, each
`torch.save({"model": state_dict, "optimizer": opt.state_dict(), "step": s, "epoch": e})`, all
loadable with `torch.load(..., weights_only=True)`. The optimizer is built from named parameters,
so its `param_groups` carry `param_names`. `run.json` records the hyperparameters and the final
accuracy.

It then re-reads every checkpoint with `weights_only=True` and prints, in float64, for each conv
weight: the norm first -> last, the per-step relative update `||w_{t+1}-w_t|| / ||w_t||` (measured
at every step during training) averaged over the first and over the last checkpoint interval, the
relative step between consecutive checkpoints, and the RMS per-row angular update over the last
quarter against the SGDM equilibrium `sqrt(2*lr*wd/(1+m))` (THEORY.md section 3). It exits 1 if
the runs do not show what they are bundled for: in `sgd_wd_all` the conv norms settle (the mean norm
of the last quarter's checkpoints within 10% of the third quarter's) with the angular update within
25% of the equilibrium value; in `sgd_no_conv_wd` the conv norms grow more than 1.5x and their
per-step relative update falls below half its early value.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"

SEED = 0
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
BATCH_SIZE = 64
STEPS = 3000
CHECKPOINT_EVERY = 150  # 21 checkpoints, step 0 included
TEST_FRACTION = 0.2
MAX_SHIFT = 1  # random translation augmentation, pixels


@dataclass(frozen=True)
class RunSpec:
    name: str
    description: str
    decay_conv_weights: bool


RUNS = (
    RunSpec(
        "sgd_wd_all",
        "Weight decay on every parameter: PyTorch's default, a single param group.",
        decay_conv_weights=True,
    ),
    RunSpec(
        "sgd_no_conv_wd",
        "The blog's NoConvL2: no weight decay on the conv weights (their own param group with "
        "weight_decay=0), weight decay on everything else.",
        decay_conv_weights=False,
    ),
)


def load_model_module() -> ModuleType:
    """Import sample_checkpoints/model.py by path: the one definition of the architecture."""
    spec = importlib.util.spec_from_file_location("bnwd_sample_model", SAMPLES / "model.py")
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import {SAMPLES / 'model.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits, standardized, split 80/20 by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scikit-learn is needed for the digits dataset; see this script's docstring")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    n_test = round(TEST_FRACTION * len(labels))
    test, train = order[:n_test], order[n_test:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return images[train], labels[train], images[test], labels[test]


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels in each direction (zero fill)."""
    s, size = MAX_SHIFT, x.shape[-1]
    padded = F.pad(x, (s, s, s, s))
    crops = torch.stack(
        [
            padded[..., dy : dy + size, dx : dx + size]
            for dy in range(2 * s + 1)
            for dx in range(2 * s + 1)
        ]
    )
    choice = torch.randint(0, len(crops), (x.shape[0],), generator=generator)
    return crops[choice, torch.arange(x.shape[0])]


def is_conv_weight(name: str, param: nn.Parameter) -> bool:
    return name.endswith("weight") and param.dim() == 4


def build_optimizer(model: nn.Module, spec: RunSpec) -> torch.optim.SGD:
    """SGD from (name, param) pairs, so the state dict's param_groups carry param_names."""
    if spec.decay_conv_weights:
        return torch.optim.SGD(
            model.named_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
    named = list(model.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [(n, p) for n, p in named if is_conv_weight(n, p)], "weight_decay": 0.0},
        {"params": [(n, p) for n, p in named if not is_conv_weight(n, p)]},
    ]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


@dataclass
class Trace:
    """Per-step measurements on the conv weights, taken in float64 during training."""

    rel_update: dict[str, list[float]] = field(default_factory=dict)
    row_angle_ms: dict[str, list[float]] = field(default_factory=dict)  # mean over rows of angle^2
    dead_bias_grad: float = 0.0
    conv2_weight_grad: float = 0.0


def train(spec: RunSpec, model_module: ModuleType, data: tuple[torch.Tensor, ...]) -> Trace:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(SEED)
    model = model_module.build_model()
    model.train()
    opt = build_optimizer(model, spec)
    conv = {n: p for n, p in model.named_parameters() if is_conv_weight(n, p)}
    trace = Trace({n: [] for n in conv}, {n: [] for n in conv})

    out = SAMPLES / spec.name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("step_*.pt"):
        old.unlink()
    steps_per_epoch = len(y_train) // BATCH_SIZE  # drop_last: every step sees a full batch
    batches = torch.Generator().manual_seed(SEED + 1)

    def save(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
        }
        torch.save(state, out / f"step_{step:06d}.pt")

    save(0)
    perm = torch.randperm(len(y_train), generator=batches)
    for step in range(1, STEPS + 1):
        i = (step - 1) % steps_per_epoch
        if i == 0 and step > 1:
            perm = torch.randperm(len(y_train), generator=batches)
        idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
        before = {n: p.detach().double().flatten(1) for n, p in conv.items()}
        loss = F.cross_entropy(model(random_shift(x_train[idx], batches)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, p in conv.items():
                w0, w1 = before[n], p.double().flatten(1)
                trace.rel_update[n].append(((w1 - w0).norm() / w0.norm()).item())
                cos = (w0 * w1).sum(1) / (w0.norm(dim=1) * w1.norm(dim=1))
                angle = torch.arccos(cos.clamp(-1.0, 1.0))
                trace.row_angle_ms[n].append(angle.square().mean().item())
        if step % CHECKPOINT_EVERY == 0:
            save(step)

    # The dead bias: its gradient through bn2 (train mode) is zero up to rounding.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x_train[:BATCH_SIZE]), y_train[:BATCH_SIZE]).backward()
    params = dict(model.named_parameters())
    trace.dead_bias_grad = params["conv2.bias"].grad.double().norm().item()
    trace.conv2_weight_grad = params["conv2.weight"].grad.double().norm().item()

    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    info = {
        "run": spec.name,
        "description": spec.description,
        "generated_by": "scripts/make_sample_checkpoints.py",
        "model": "sample_checkpoints/model.py:build_model",
        "dataset": {
            "name": "scikit-learn digits (8x8 grayscale, 10 classes)",
            "train_size": len(y_train),
            "test_size": len(y_test),
            "preprocessing": "pixels/16, standardized with the train set's mean and std",
            "augmentation": f"random translation by up to {MAX_SHIFT} pixel, zero fill",
        },
        "optimizer": "torch.optim.SGD",
        "lr": LR,
        "lr_schedule": "constant",
        "momentum": MOMENTUM,
        "dampening": 0.0,
        "nesterov": False,
        "param_groups": [
            {"weight_decay": g["weight_decay"], "param_names": g["param_names"]}
            for g in opt.param_groups
        ],
        "batch_size": BATCH_SIZE,
        "steps": STEPS,
        "steps_per_epoch": steps_per_epoch,
        "checkpoint_every": CHECKPOINT_EVERY,
        "seed": SEED,
        "torch_version": torch.__version__,
        "final": {
            "train_loss": round(train_loss, 4),
            "train_accuracy": round(train_acc, 4),
            "test_loss": round(test_loss, 4),
            "test_accuracy": round(test_acc, 4),
        },
    }
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(
        f"{spec.name}: {STEPS} steps, train acc {train_acc:.4f}, test acc {test_acc:.4f} "
        f"(test loss {test_loss:.4f})"
    )
    return trace


def summarize(spec: RunSpec, trace: Trace) -> list[str]:
    """Re-read the run's checkpoints (weights_only=True), print the conv layers' figures in
    float64, and return the checks that failed."""
    folder = SAMPLES / spec.name
    paths = sorted(folder.glob("step_*.pt"))
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    steps = [s["step"] for s in states]
    info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    print(
        f"\n== {spec.name}: {len(paths)} checkpoints (steps {steps[0]}..{steps[-1]}), all loaded "
        f"with weights_only=True; test accuracy {info['final']['test_accuracy']:.4f}"
    )
    failures = []
    third = [i for i, s in enumerate(steps) if 0.5 * STEPS <= s <= 0.75 * STEPS]
    fourth = [i for i, s in enumerate(steps) if s >= 0.75 * STEPS]
    window = CHECKPOINT_EVERY
    predicted = math.sqrt(2 * LR * WEIGHT_DECAY / (1 + MOMENTUM))
    for name in trace.rel_update:
        w = [s["model"][name].double() for s in states]
        norms = np.array([t.norm().item() for t in w])
        interval = [(b - a).norm().item() / a.norm().item() for a, b in itertools.pairwise(w)]
        upd = np.array(trace.rel_update[name])
        early, late = upd[:window].mean(), upd[-window:].mean()
        angle = math.sqrt(np.mean(trace.row_angle_ms[name][-STEPS // 4 :]))
        settle = norms[fourth].mean() / norms[third].mean() - 1.0
        growth = norms[-1] / norms[0]
        print(
            f"  {name}: norm {norms[0]:.3f} -> {norms[-1]:.3f} (x{growth:.2f}; peak "
            f"{norms.max():.3f}); mean norm, last quarter vs third quarter: {settle:+.1%}"
        )
        print(
            f"    per-step relative update {early:.2e} (steps 1-{window}) -> {late:.2e} "
            f"(steps {STEPS - window + 1}-{STEPS}): x{late / early:.2f}"
        )
        print(
            f"    relative step between checkpoints {interval[0]:.3f} "
            f"(steps {steps[0]}-{steps[1]}) -> {interval[-1]:.3f} (steps {steps[-2]}-{steps[-1]})"
        )
        line = f"    RMS per-row angular update, last {STEPS // 4} steps: {angle:.2e} rad/step"
        if spec.decay_conv_weights:
            line += f" (SGDM equilibrium sqrt(2*lr*wd/(1+m)) = {predicted:.2e})"
        print(line)
        if spec.decay_conv_weights:
            if abs(settle) >= 0.10:
                failures.append(f"{spec.name} {name}: norm still moving ({settle:+.1%})")
            if abs(angle / predicted - 1.0) >= 0.25:
                failures.append(f"{spec.name} {name}: angle {angle:.2e} vs {predicted:.2e}")
        else:
            if growth <= 1.5:
                failures.append(f"{spec.name} {name}: norm grew only x{growth:.2f}")
            if late / early >= 0.5:
                failures.append(
                    f"{spec.name} {name}: relative update fell only x{late / early:.2f}"
                )
    bias = [s["model"]["conv2.bias"].double().norm().item() for s in states]
    print(
        f"  conv2.bias (dead, before bn2): norm {bias[0]:.4f} -> {bias[-1]:.4f} (weight decay "
        f"alone); gradient norm at the end {trace.dead_bias_grad:.1e} "
        f"(conv2.weight: {trace.conv2_weight_grad:.1e})"
    )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    start = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed thread count: same float reductions on every machine
    model_module = load_model_module()
    data = load_digits_split()
    traces = [train(spec, model_module, data) for spec in RUNS]
    failures = [f for spec, trace in zip(RUNS, traces, strict=True) for f in summarize(spec, trace)]
    print(f"\ngenerated in {time.perf_counter() - start:.1f} s")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    if not failures:
        print(
            "checks passed: sgd_wd_all conv norms settle at the SGDM equilibrium angle; "
            "sgd_no_conv_wd conv norms grow >1.5x and their relative update falls below half"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
