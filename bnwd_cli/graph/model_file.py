"""Loading a user's model file: the factory, the example input, and trained weights.

A model file is plain Python that defines a factory (`build_model()` by default) returning a
`torch.nn.Module`, and optionally `example_input()` returning what the model's forward takes (a
tensor, a tuple of positional arguments, or a dict of keyword arguments). Anything that goes
wrong inside the user's code -- import, factory, example input, forward pass -- becomes a
`ModelFileError` that quotes the user's own traceback lines, never a raw traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sys
import sysconfig
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bnwd_cli.errors import CheckpointError, ModelFileError, UsageError

DEFAULT_FACTORY = "build_model"
EXAMPLE_INPUT_FUNCTION = "example_input"
INPUT_SEED = 0
"""Seed of torch's RNG while the factory and `example_input()` run, and of the random input
built from `--input-shape`: the same file gives the same model and input on every run."""


@dataclass(frozen=True)
class ExampleInput:
    """What the model's forward is called with: `model(*args, **kwargs)`."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Shapes of the tensors, for messages: `(8, 3, 32, 32)` or `x=(2, 16), mask=(2, 16)`."""
        parts = [_describe_value(a) for a in self.args]
        parts += [f"{k}={_describe_value(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts) if parts else "no arguments"


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a user's file, with the input it is analyzed on."""

    model: torch.nn.Module
    example_input: ExampleInput
    path: Path
    factory: str
    input_source: str
    """Where the input came from: `example_input()` or `--input-shape 8,3,32,32`."""
    checkpoint: Path | None = None
    notes: tuple[str, ...] = ()


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_describe_value(v) for v in value) + "]"
    return type(value).__name__


def as_example_input(value: Any) -> ExampleInput:
    """Accept a tensor, a tuple/list of positional arguments, a dict of keyword arguments, or an
    `ExampleInput`; anything else is a usage error (the caller names the source)."""
    if isinstance(value, ExampleInput):
        return value
    if isinstance(value, torch.Tensor):
        return ExampleInput((value,))
    if isinstance(value, tuple | list):
        return ExampleInput(tuple(value))
    if isinstance(value, Mapping):
        return ExampleInput((), dict(value))
    raise UsageError(
        f"example input of type {type(value).__name__}: expected a tensor, a tuple of "
        "positional arguments or a dict of keyword arguments"
    )


# -- the user's traceback ------------------------------------------------------------------

_LIBRARY_ROOTS = tuple(
    Path(p).resolve()
    for p in {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        str(Path(torch.__file__).parent),
        str(Path(__file__).parents[1]),  # bnwd_cli itself
    }
)


def _is_under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def user_traceback(exc: BaseException, roots: Sequence[Path] = ()) -> str:
    """The frames of `exc` that belong to the user: under `roots` when given, else every frame
    outside the standard library, site-packages, torch and bnwd. One line per frame."""
    lines = []
    resolved_roots = [r.resolve() for r in roots]
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            filename = Path(frame.filename).resolve()
        except (OSError, ValueError):
            continue
        if frame.filename.startswith("<"):
            continue
        if resolved_roots:
            if not _is_under(filename, resolved_roots):
                continue
        elif _is_under(filename, _LIBRARY_ROOTS):
            continue
        code = f": {frame.line.strip()}" if frame.line else ""
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}{code}')
    return "\n".join(lines)


def describe_user_error(
    what: str, exc: BaseException, roots: Sequence[Path] = (), hint: str = ""
) -> ModelFileError:
    """A `ModelFileError` for `exc` raised while doing `what` in the user's code."""
    message = f"{what} failed: {type(exc).__name__}: {exc}".rstrip()
    frames = user_traceback(exc, roots)
    if frames:
        message += "\n" + frames
    if hint:
        message += f"\n{hint}"
    return ModelFileError(message)


@contextlib.contextmanager
def user_code(what: str, roots: Sequence[Path] = (), hint: str = "") -> Iterator[None]:
    """Run user code; any exception except an interrupt becomes a `ModelFileError`."""
    try:
        yield
    except (KeyboardInterrupt, ModelFileError, UsageError, CheckpointError):
        raise
    except BaseException as exc:  # SystemExit from a user's script is an error too
        raise describe_user_error(what, exc, roots, hint) from None


# -- loading -------------------------------------------------------------------------------


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_bnwd_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in user code look modules up here
    with user_code(f"{path}: importing the model file", [path.parent]):
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Let the model file import its sibling modules, as `python model.py` would."""
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _callables(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if callable(value)
        and not name.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
    )


def random_input(shape: tuple[int, ...]) -> ExampleInput:
    """A standard-normal input of `shape`, the same on every run."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    return ExampleInput((torch.randn(shape, generator=generator),))


def load_model_file(
    path: Path,
    *,
    factory: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    checkpoint: Path | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Import `path`, build the model with its factory and get its example input.

    `input_shape` (from `--input-shape`) wins over the file's `example_input()`. With
    `checkpoint`, trained weights are loaded into the model before it is returned: invariance
    must hold for the weights that were trained, not only at initialisation.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    factory_name = factory or DEFAULT_FACTORY
    if not factory_name.isidentifier():
        raise UsageError(f"--factory {factory_name!r}: not a Python function name")
    roots = [path.parent]
    # The factory and example_input() run with torch's RNG seeded: the same file gives the same
    # weights and input on every run (the caller's RNG state is restored afterwards).
    with _on_sys_path(path.parent), torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPUT_SEED)
        module = _import_file(path)
        build = getattr(module, factory_name, None)
        if build is None or not callable(build):
            found = ", ".join(_callables(module)) or "none"
            default_hint = (
                f"define {DEFAULT_FACTORY}() or pass --factory NAME"
                if factory is None
                else "check the name"
            )
            raise ModelFileError(
                f"{path}: no function {factory_name}() ({default_hint}; functions in the file: "
                f"{found})"
            )
        with user_code(f"{path}: {factory_name}()", roots):
            model = build()
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(
                f"{path}: {factory_name}() returned {type(model).__name__}, expected a "
                "torch.nn.Module"
            )
        if input_shape is not None:
            example = random_input(input_shape)
            source = "--input-shape " + ",".join(str(d) for d in input_shape)
        else:
            make_input = getattr(module, EXAMPLE_INPUT_FUNCTION, None)
            if make_input is None or not callable(make_input):
                raise ModelFileError(
                    f"{path}: no example input; define {EXAMPLE_INPUT_FUNCTION}() in the file "
                    "or pass --input-shape, e.g. --input-shape 8,3,32,32"
                )
            with user_code(f"{path}: {EXAMPLE_INPUT_FUNCTION}()", roots):
                raw = make_input()
            try:
                example = as_example_input(raw)
            except UsageError:
                raise ModelFileError(
                    f"{path}: {EXAMPLE_INPUT_FUNCTION}() returned {type(raw).__name__}; return "
                    "a tensor, a tuple of positional arguments or a dict of keyword arguments"
                ) from None
            source = f"{EXAMPLE_INPUT_FUNCTION}()"
    notes: tuple[str, ...] = ()
    if checkpoint is not None:
        notes = load_checkpoint_into(model, checkpoint, trust_pickle=trust_pickle)
    return LoadedModel(
        model=model,
        example_input=example,
        path=path,
        factory=factory_name,
        input_source=source,
        checkpoint=checkpoint,
        notes=notes,
    )


def load_checkpoint_into(
    model: torch.nn.Module, checkpoint: Path, *, trust_pickle: bool = False
) -> tuple[str, ...]:
    """Load a checkpoint's model weights into `model` (through the same reader as `inspect`).

    Every parameter must be present with its shape; missing buffers are only noted (a
    checkpoint without `num_batches_tracked` is common and harmless here).
    """
    from bnwd_cli.checkpoints import read_state_dict

    state = read_state_dict(Path(checkpoint), trust_pickle=trust_pickle)
    own = model.state_dict()
    param_names = {name for name, _ in model.named_parameters()}
    missing = [name for name in own if name not in state]
    missing_params = [name for name in missing if name in param_names]
    unexpected = [name for name in state if name not in own]
    wrong_shape = [
        f"{name} {tuple(state[name].shape)} vs model {tuple(own[name].shape)}"
        for name in own
        if name in state and tuple(state[name].shape) != tuple(own[name].shape)
    ]
    if missing_params or wrong_shape or (unexpected and not own.keys() & state.keys()):
        problems = []
        if missing_params:
            problems.append(f"missing parameters {_short_list(missing_params)}")
        if wrong_shape:
            problems.append(f"shape mismatch {_short_list(wrong_shape)}")
        if unexpected:
            problems.append(f"keys the model lacks {_short_list(unexpected)}")
        raise CheckpointError(
            checkpoint,
            "does not match the model built by the factory: " + "; ".join(problems),
        )
    with torch.no_grad():
        for name, tensor in own.items():
            if name in state:
                tensor.copy_(state[name].to(dtype=tensor.dtype))
    notes = []
    if missing:
        notes.append(
            f"checkpoint {checkpoint} lacks buffers {_short_list(missing)}; kept the model's"
        )
    if unexpected:
        notes.append(f"checkpoint {checkpoint} has keys the model lacks: {_short_list(unexpected)}")
    return tuple(notes)


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
