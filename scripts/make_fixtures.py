"""Generate the real-library checkpoint fixtures under ``tests/fixtures/``.

Every fixture folder is written by the library it imitates (Lightning's ``Trainer`` and
``ModelCheckpoint``, 🤗 ``Trainer``, timm's ``CheckpointSaver``, ``safetensors``, ``torch.save``),
after a few real optimisation steps of one tiny network on seeded synthetic data. Nothing in the
files is hand-written; the tests in ``tests/test_fixture_files.py`` check that each folder is what
it claims, and tests of ``bnwd`` recompute reference numbers from the raw files.

How to run (from the repository root; the project venv is not used, it has none of these
libraries)::

    python3 -m venv /work/fixture-venv
    echo 'torch==2.13.0' > /tmp/torch-pin.txt
    /work/fixture-venv/bin/pip install -c /tmp/torch-pin.txt torch==2.13.0 \\
        lightning transformers accelerate timm safetensors huggingface_hub
    /work/fixture-venv/bin/pip uninstall -y torchvision   # see "timm" below
    # transformers 5 can no longer write pytorch_model.bin, so one folder needs transformers 4:
    python3 -m venv /work/fixture-venv-tf4
    /work/fixture-venv-tf4/bin/pip install -c /tmp/torch-pin.txt torch==2.13.0 \\
        'transformers==4.57.6' accelerate safetensors
    /work/fixture-venv/bin/python scripts/make_fixtures.py            # all folders
    /work/fixture-venv/bin/python scripts/make_fixtures.py --only timm_run lightning_run

``hf_trainer_bin_run`` is delegated to ``--tf4-python`` (default
``/work/fixture-venv-tf4/bin/python``) when the running interpreter has transformers >= 5.

Library versions that produced the committed files (also in ``tests/fixtures/VERSIONS.txt``,
rewritten on every run): Python 3.11.7, torch 2.13.0+cpu, lightning 2.6.6, transformers 5.23.0
(``hf_trainer_bin_run``: transformers 4.57.6), accelerate 1.15.0, timm 1.0.31,
safetensors 0.8.0, huggingface_hub 2.4.0 (used by transformers' sharding), numpy 2.4.6.

Notes
-----
* The network is the same everywhere: ``Conv2d(3,4,3,bias=False) -> BatchNorm2d(4) -> ReLU ->
  Conv2d(4,6,3) -> BatchNorm2d(6) -> ReLU -> AdaptiveAvgPool2d(1) -> Flatten -> Linear(6,3)``,
  inputs 3x8x8, batch 8, 32 training samples (4 batches per epoch), labels in {0,1,2}.
* timm: the only torchvision CPU wheel here is a CUDA build (``0.28.0+cu130``) whose C extension
  cannot load against the CPU torch, and ``import timm`` imports ``torchvision.ops.misc`` (for
  ``FrozenBatchNorm2d``) at module level. Before importing timm we therefore register a stand-in
  ``torchvision.ops.misc`` module holding a ``FrozenBatchNorm2d`` class, used only for
  ``isinstance`` checks in timm's freeze utilities that this script never calls. timm's own
  ``create_optimizer_v2``, ``ModelEmaV3`` and ``CheckpointSaver`` then run unmodified, and the
  stand-in never reaches a checkpoint (the tests check the pickled globals).
* File modification times carry no information: every written file gets the same fixed mtime
  (git does not keep mtimes anyway). Order must come from the step/epoch in names and contents.
* Paths stored inside checkpoints (Lightning's ``ModelCheckpoint`` state, 🤗 ``TrainingArguments``)
  are relative, because every run is started with ``tests/fixtures`` as working directory.
* Re-running reproduces every file byte for byte, except ``legacy_torch_run/*.pt``: the legacy
  (non-zip) format names storages by their memory address, so its bytes differ on every save
  while the tensors it holds do not.
* Every fixture trains the same initial weights (seed 0) on the same batches with the same
  optimiser where the library lets us choose it (SGD lr 0.05, momentum 0.9, weight decay 5e-4,
  plain loop order), so ``plain_torch_run/step_2.pt``, ``safetensors_run/step-0002``,
  ``legacy_torch_run/step_2.pt`` and Lightning's ``step=2`` hold bit-identical weights, as do
  ``plain_state_dict_run/epochN.pth`` and the three ``prefixed_run`` variants. 🤗 (AdamW, its own
  default) and timm (nesterov SGD, BN/bias excluded from weight decay) follow their own recipes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import random
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FIXED_MTIME = 1_000_000_000  # 2001-09-09; the same for every file, so mtimes order nothing
SEED = 0
N_TRAIN = 32
BATCH = 8
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
DEFAULT_TF4_PYTHON = "/work/fixture-venv-tf4/bin/python"


# --------------------------------------------------------------------------- shared pieces


def make_net() -> nn.Sequential:
    """The one network every fixture trains."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def seed_all(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synthetic_data(n: int = N_TRAIN, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs 3x8x8 with a label that depends on the mean of each channel (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = x.mean(dim=(2, 3)).argmax(dim=1)
    return x, y


def loader() -> DataLoader:
    x, y = synthetic_data()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False, num_workers=0)


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    on_step: Callable[[int, int], None] | None = None,
) -> None:
    """Plain loop over the fixed loader; ``on_step(step, epoch)`` after each optimiser step
    (step counts from 1, epoch from 0)."""
    model.train()
    step = 0
    epoch = 0
    while step < steps:
        for x, y in loader():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, epoch)
            if step >= steps:
                return
        epoch += 1


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def fresh_dir(name: str) -> Path:
    """Remove and recreate one fixture folder (only ever a direct child of tests/fixtures)."""
    path = FIXTURES / name
    assert path.parent == FIXTURES and name and "/" not in name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- Lightning


def make_lightning_run() -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    fresh_dir("lightning_run")

    class TinyModule(L.LightningModule):
        def __init__(self, lr: float = LR, weight_decay: float = WEIGHT_DECAY, width: int = 6):
            super().__init__()
            self.save_hyperparameters()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(
                self.parameters(),
                lr=self.hparams.lr,
                momentum=MOMENTUM,
                weight_decay=self.hparams.weight_decay,
            )

    L.seed_everything(SEED, workers=True)
    module = TinyModule()
    checkpoint = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)
    with chdir(FIXTURES):
        trainer = L.Trainer(
            default_root_dir="lightning_run",
            accelerator="cpu",
            devices=1,
            max_steps=6,  # 4 batches per epoch: steps 2 and 4 in epoch 0, step 6 in epoch 1
            callbacks=[checkpoint],
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            deterministic=True,
        )
        trainer.fit(module, train_dataloaders=loader())


# --------------------------------------------------------------------------- 🤗 transformers


def _hf_classes():
    from transformers import PretrainedConfig, PreTrainedModel

    class BnwdTinyConfig(PretrainedConfig):
        model_type = "bnwd_tiny"

        def __init__(self, num_labels: int = 3, **kwargs):
            super().__init__(num_labels=num_labels, **kwargs)

    class BnwdTinyModel(PreTrainedModel):
        config_class = BnwdTinyConfig
        base_model_prefix = "net"
        main_input_name = "pixel_values"

        def __init__(self, config: BnwdTinyConfig):
            super().__init__(config)
            self.net = make_net()
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            # Keep PyTorch's default initialisation (seeded), as the other fixtures do.
            return

        def forward(self, pixel_values=None, labels=None, **kwargs):
            logits = self.net(pixel_values)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    return BnwdTinyConfig, BnwdTinyModel


class DictDataset(Dataset):
    def __init__(self) -> None:
        self.x, self.y = synthetic_data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _hf_trainer_run(name: str, *, safetensors: bool) -> None:
    import transformers
    from transformers import Trainer, TrainingArguments

    major = int(transformers.__version__.split(".")[0])
    fresh_dir(name)
    config_cls, model_cls = _hf_classes()
    transformers.set_seed(SEED)
    model = model_cls(config_cls())
    extra = {}
    if major < 5:
        # transformers 5 removed the switch: it always writes model.safetensors.
        extra["save_safetensors"] = safetensors
        # 4.x defaults logging_dir to runs/<date>_<hostname>, pickled into training_args.bin;
        # fixed here so a re-run reproduces the file byte for byte.
        extra["logging_dir"] = f"{name}/runs"
    elif not safetensors:
        raise RuntimeError("pytorch_model.bin needs transformers < 5 (see --tf4-python)")
    with chdir(FIXTURES):
        args = TrainingArguments(
            output_dir=name,
            max_steps=4,
            per_device_train_batch_size=BATCH,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            learning_rate=1e-2,
            weight_decay=0.01,  # default AdamW; 🤗 leaves bias/norm-named params undecayed
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=SEED,
            data_seed=SEED,
            disable_tqdm=True,
            **extra,
        )
        Trainer(model=model, args=args, train_dataset=DictDataset()).train()


def make_hf_trainer_run() -> None:
    _hf_trainer_run("hf_trainer_run", safetensors=True)


def make_hf_trainer_bin_run(tf4_python: str) -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        _hf_trainer_run("hf_trainer_bin_run", safetensors=False)
        return
    if not Path(tf4_python).exists():
        raise SystemExit(
            f"hf_trainer_bin_run needs transformers 4.x; no interpreter at {tf4_python} "
            "(pass --tf4-python, see the module docstring)"
        )
    subprocess.run(
        [tf4_python, str(Path(__file__).resolve()), "--only", "hf_trainer_bin_run"],
        check=True,
        cwd=REPO,
    )


def make_sharded_run() -> None:
    """A ``save_pretrained(max_shard_size=...)`` of the 🤗 model after 10 plain SGD steps."""
    import transformers

    run = fresh_dir("sharded_run")
    config_cls, model_cls = _hf_classes()
    transformers.set_seed(SEED)
    model = model_cls(config_cls())
    train_steps(model.net, sgd(model.parameters()), steps=10)
    # 1,580 bytes of tensors; shards fill greedily in key order (504 | 864+24+104+84 bytes),
    # so 1,100 gives exactly two shards.
    model.save_pretrained(run / "checkpoint-10", max_shard_size=1100)


# --------------------------------------------------------------------------- timm


def _import_timm_without_torchvision() -> types.SimpleNamespace:
    """Import the timm pieces train.py uses, when torchvision cannot be imported.

    ``import timm`` runs ``timm/__init__.py``, which imports ``timm.models`` and ``timm.data``,
    and those import torchvision's datasets and transforms at module level. None of that is needed
    to save a checkpoint, so instead (see also the module docstring):

    1. ``timm``, ``timm.utils`` and ``timm.models`` are registered as bare packages whose
       ``__init__`` is not run; their real submodules are then imported from timm's own files.
    2. ``timm.layers`` (imported by ``timm.utils.model`` and ``timm.models._manipulate``) needs
       ``torchvision.ops.misc.FrozenBatchNorm2d``; a stand-in class is registered for it.
    3. ``timm.optim._param_groups`` does ``from timm.models import group_parameters``; the bare
       ``timm.models`` gets the real function from ``timm.models._manipulate``.

    Returned: timm's real ``CheckpointSaver``, ``ModelEmaV3`` and ``create_optimizer_v2``.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]

        class FrozenBatchNorm2d(nn.Module):
            """Stand-in for torchvision.ops.misc.FrozenBatchNorm2d; never instantiated here."""

            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision stand-in: FrozenBatchNorm2d is not available")

        FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
            sys.modules[name] = mod
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]

    spec = importlib.util.find_spec("timm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (
        ("timm", root),
        ("timm.utils", root / "utils"),
        ("timm.models", root / "models"),
    ):
        if name in sys.modules:
            continue
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        pkg.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        pkg.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = pkg
    manipulate = importlib.import_module("timm.models._manipulate")
    sys.modules["timm.models"].group_parameters = manipulate.group_parameters  # type: ignore[attr-defined]
    saver = importlib.import_module("timm.utils.checkpoint_saver")
    ema = importlib.import_module("timm.utils.model_ema")
    optim = importlib.import_module("timm.optim")
    version = importlib.import_module("timm.version")
    return types.SimpleNamespace(
        CheckpointSaver=saver.CheckpointSaver,
        ModelEmaV3=ema.ModelEmaV3,
        create_optimizer_v2=optim.create_optimizer_v2,
        __version__=version.__version__,
    )


def make_timm_run() -> None:
    timm = _import_timm_without_torchvision()
    run = fresh_dir("timm_run")
    seed_all()
    model = make_net()
    # What timm's train.py passes: its parsed argparse.Namespace (a subset of its options).
    args = argparse.Namespace(
        model="bnwd_tiny",
        num_classes=3,
        input_size=(3, 8, 8),
        batch_size=BATCH,
        epochs=2,
        opt="sgd",
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        model_ema=True,
        model_ema_decay=0.9,
        eval_metric="top1",
        checkpoint_hist=10,
        seed=SEED,
        output=str(run.relative_to(FIXTURES)),
    )
    # timm's optimizer factory: by default puts biases and 1-D params (BN gammas/betas) in a
    # weight_decay=0 group, as train.py does.
    optimizer = timm.create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    model_ema = timm.ModelEmaV3(model, decay=args.model_ema_decay)
    saver = timm.CheckpointSaver(
        model=model,
        optimizer=optimizer,
        args=args,
        model_ema=model_ema,
        checkpoint_dir=str(run),
        recovery_dir=str(run),
        decreasing=False,
        max_history=args.checkpoint_hist,
    )
    x_val, y_val = synthetic_data(n=16, seed=SEED + 1)
    num_updates = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            num_updates += 1
            model_ema.update(model, step=num_updates)
        model.eval()
        with torch.no_grad():
            top1 = (model(x_val).argmax(1) == y_val).float().mean().item() * 100.0
        saver.save_checkpoint(epoch, metric=top1)


# --------------------------------------------------------------------------- plain torch


def make_plain_torch_run() -> None:
    run = fresh_dir("plain_torch_run")
    seed_all()
    model = make_net()
    opt = sgd(model.parameters())

    def save(step: int, epoch: int) -> None:
        if step % 2 == 0:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "epoch": epoch,
                },
                run / f"step_{step}.pt",
            )

    train_steps(model, opt, steps=6, on_step=save)


def make_plain_state_dict_run() -> None:
    run = fresh_dir("plain_state_dict_run")
    seed_all()
    model = make_net()
    opt = sgd(model.parameters())

    def save(step: int, epoch: int) -> None:
        if step % 4 == 0:  # end of each 4-batch epoch
            torch.save(model.state_dict(), run / f"epoch{epoch + 1}.pth")

    train_steps(model, opt, steps=8, on_step=save)


def make_prefixed_run() -> None:
    """Three sub-runs whose bare state dicts carry wrapper prefixes, all from real wrappers:

    * ``dataparallel/``: ``nn.DataParallel(net).state_dict()`` -> ``module.0.weight``
    * ``compiled/``: ``torch.compile(net, backend="eager").state_dict()`` -> ``_orig_mod.0.weight``
    * ``compiled_dataparallel/``: ``torch.compile(nn.DataParallel(net))`` (the order PyTorch
      recommends for DDP) -> ``_orig_mod.module.0.weight``

    Training goes through the wrapper (CPU DataParallel with no GPU simply calls the module;
    the "eager" backend needs no C compiler).
    """
    run = fresh_dir("prefixed_run")
    wrappers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "dataparallel": nn.DataParallel,
        "compiled": lambda m: torch.compile(m, backend="eager"),
        "compiled_dataparallel": lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
    }
    for sub, wrap in wrappers.items():
        (run / sub).mkdir()
        seed_all()
        wrapped = wrap(make_net())
        opt = sgd(wrapped.parameters())

        def save(step: int, epoch: int, wrapped: nn.Module = wrapped, sub: str = sub) -> None:
            if step % 4 == 0:
                torch.save(wrapped.state_dict(), run / sub / f"epoch{epoch + 1}.pth")

        train_steps(wrapped, opt, steps=8, on_step=save)
        torch._dynamo.reset()


def make_safetensors_run() -> None:
    from safetensors.torch import save_file

    run = fresh_dir("safetensors_run")
    seed_all()
    model = make_net()
    opt = sgd(model.parameters())

    def save(step: int, epoch: int) -> None:
        save_file(model.state_dict(), run / f"step-{step:04d}.safetensors")

    train_steps(model, opt, steps=3, on_step=save)


def make_legacy_torch_run() -> None:
    run = fresh_dir("legacy_torch_run")
    seed_all()
    model = make_net()
    opt = sgd(model.parameters())

    def save(step: int, epoch: int) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "epoch": epoch,
            },
            run / f"step_{step}.pt",
            _use_new_zipfile_serialization=False,
        )

    train_steps(model, opt, steps=2, on_step=save)


# --------------------------------------------------------------------------- bookkeeping


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_versions(tf4_python: str) -> None:
    lines = [
        "# Library versions that wrote the fixtures (scripts/make_fixtures.py rewrites this).",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    lines += [
        f"{d} {_version(d)}"
        for d in (
            "lightning",
            "transformers",
            "accelerate",
            "timm",
            "safetensors",
            "huggingface_hub",
            "numpy",
        )
    ]
    if Path(tf4_python).exists():
        out = subprocess.run(
            [
                tf4_python,
                "-c",
                "import transformers, accelerate, torch; print(transformers.__version__, "
                "accelerate.__version__, torch.__version__)",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        lines.append(
            f"hf_trainer_bin_run: transformers {out[0]}, accelerate {out[1]}, torch {out[2]}"
        )
    lines.append("timm_run: imported with a torchvision stand-in (see scripts/make_fixtures.py)")
    (FIXTURES / "VERSIONS.txt").write_text("\n".join(lines) + "\n")


def pin_mtimes_and_modes() -> None:
    """Same mtime everywhere; 0644/0755 modes (safetensors writes its files 0600)."""
    for path in FIXTURES.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)


def main(argv: list[str] | None = None) -> None:
    makers: dict[str, Callable[[], None]] = {
        "lightning_run": make_lightning_run,
        "hf_trainer_run": make_hf_trainer_run,
        "hf_trainer_bin_run": lambda: make_hf_trainer_bin_run(opts.tf4_python),
        "sharded_run": make_sharded_run,
        "plain_torch_run": make_plain_torch_run,
        "plain_state_dict_run": make_plain_state_dict_run,
        "prefixed_run": make_prefixed_run,
        "safetensors_run": make_safetensors_run,
        "legacy_torch_run": make_legacy_torch_run,
        # last: it installs the torchvision stand-in into sys.modules
        "timm_run": make_timm_run,
    }
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(makers), default=list(makers))
    parser.add_argument("--tf4-python", default=DEFAULT_TF4_PYTHON)
    opts = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    delegated = opts.only == ["hf_trainer_bin_run"] and _version("transformers").startswith("4.")
    for name, make in makers.items():
        if name in opts.only:
            print(f"== {name}", flush=True)
            make()
    if not delegated:
        write_versions(opts.tf4_python)
    pin_mtimes_and_modes()


if __name__ == "__main__":
    main()
