"""Getting a model's data-flow graph, in one small vocabulary of operations.

Two front ends produce the same `ModelGraph`:

- `torch.fx` symbolic tracing (tried first): standard `torch.nn` modules stay leaves and are
  translated from their attributes; user modules, functional calls and tensor methods are traced
  through. Shapes come from running the traced graph once on the example input.
- an execution trace: the model runs once on the example input under a `TorchFunctionMode` that
  records every torch function, functional call and tensor method with the tensors flowing in
  and out (global module hooks say which module ran it). It sees what an actual execution does,
  so data-dependent control flow -- which breaks symbolic tracing -- is no obstacle; it is used
  when symbolic tracing fails, or when asked for.

Both front ends normalize each call to a canonical operation name (`conv`, `batch_norm`, `relu`,
`add`, `reshape`, ...) with named arguments, tensors replaced by `Ref`s to the nodes that made
them. The analysis (`graph.analyze`) only ever sees this form.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from bnwd_cli.errors import ModelFileError
from bnwd_cli.graph.classes import ClassificationMethod
from bnwd_cli.graph.model_file import ExampleInput, describe_user_error


class TraceMethod(StrEnum):
    """How to get the graph: fx first with fallback, or one of them only."""

    AUTO = "auto"
    FX = "fx"
    EXECUTION = "execution"


@dataclass(frozen=True)
class Ref:
    """A tensor argument: the output of node `node`."""

    node: int


@dataclass
class OpNode:
    """One operation of the traced forward pass."""

    index: int
    op: str
    """Canonical operation (`conv`, `batch_norm`, `relu`, `add`, ..., `param`, `input`)."""
    args: dict[str, Any]
    """Normalized arguments; tensors are `Ref`s (lists of `Ref`s for `cat`/`stack`)."""
    shape: tuple[int, ...] | None
    """Output shape; None for a node whose output is a tuple (its elements are `item` nodes)."""
    module: str
    """Dotted path of the innermost module that ran this operation ('' for the root)."""
    label: str
    """How paths and norm names show this node: a module path or a function name."""
    fn_name: str
    """The raw function, method or module-class name, for notes."""
    refs: tuple[int, ...] = ()
    """Indices of every tensor input."""


@dataclass
class ModelGraph:
    """The traced forward pass, nodes in execution (topological) order."""

    nodes: list[OpNode]
    params: dict[str, int]
    """Parameter name (as `named_parameters()` gives it) -> its node."""
    outputs: tuple[int, ...]
    """Nodes holding the tensors of the model's output."""
    method: ClassificationMethod
    notes: tuple[str, ...] = ()
    consumers: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.consumers = [[] for _ in self.nodes]
        for node in self.nodes:
            for ref in dict.fromkeys(node.refs):
                self.consumers[ref].append(node.index)


# -- canonical names -----------------------------------------------------------------------

_ALIASES: dict[str, str] = {}


def _alias(op: str, *names: str) -> None:
    for name in names:
        _ALIASES[name] = op


_alias(
    "identity",
    "clone", "contiguous", "detach", "to", "type", "float", "double", "half", "bfloat16",
    "cpu", "cuda", "requires_grad", "data", "alias", "type_as", "identity", "real",
    "nan_to_num", "resolve_conj", "resolve_neg",
)  # fmt: skip
_alias("dropout", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout")
_alias(
    "reshape",
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
    "reshape_as", "_unsafe_view", "ravel", "atleast_1d", "atleast_2d", "atleast_3d",
)  # fmt: skip
_alias("expand", "expand", "expand_as", "broadcast_to")
_alias("repeat", "repeat", "tile")
_alias("permute", "permute")
_alias("transpose", "transpose", "swapaxes", "swapdims")
_alias("t", "t", "T")
_alias("mt", "mT", "mH", "H")
_alias("movedim", "movedim", "moveaxis")
_alias("relu", "relu", "leaky_relu", "rrelu", "prelu")
_alias("abs", "abs", "absolute")
_alias("neg", "neg", "negative")
_alias("add", "add", "iadd", "radd")
_alias("sub", "sub", "isub", "subtract")
_alias("rsub", "rsub")
_alias("mul", "mul", "imul", "rmul", "multiply")
_alias("div", "div", "truediv", "itruediv", "true_divide", "divide")
_alias("rdiv", "rdiv", "rtruediv")
_alias("pow", "pow", "ipow", "float_power")
_alias("sqrt", "sqrt")
_alias("rsqrt", "rsqrt")
_alias("reciprocal", "reciprocal")
_alias("square", "square")
_alias("clamp", "clamp", "clip")
_alias("clamp_min", "clamp_min")
_alias("clamp_max", "clamp_max")
_alias("maximum", "maximum", "fmax", "minimum", "fmin")
_alias("max", "max", "min")
_alias("reduce", "mean", "sum", "nansum", "nanmean")
_alias("var", "var")
_alias("std", "std")
_alias("var_mean", "var_mean")
_alias("std_mean", "std_mean")
_alias("amax", "amax", "amin")
_alias("vnorm", "norm", "vector_norm", "linalg_vector_norm")
for _nd in ("1d", "2d", "3d"):
    _alias(
        "pool",
        f"max_pool{_nd}", f"max_pool{_nd}_with_indices", f"avg_pool{_nd}",
        f"adaptive_avg_pool{_nd}", f"adaptive_max_pool{_nd}",
        f"adaptive_max_pool{_nd}_with_indices", f"lp_pool{_nd}",
        f"maxpool{_nd}", f"avgpool{_nd}", f"adaptiveavgpool{_nd}", f"adaptivemaxpool{_nd}",
    )  # fmt: skip
    _alias("conv", f"conv{_nd}")
    _alias("conv_transpose", f"conv_transpose{_nd}")
_alias("interpolate", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
_alias("pad", "pad", "constant_pad_nd")
_alias("cat", "cat", "concat", "concatenate")
_alias("stack", "stack")
_alias("split", "split", "chunk", "unbind", "tensor_split", "split_with_sizes")
_alias("getitem", "getitem")
_alias("setitem", "setitem")
_alias("select", "select")
_alias("narrow", "narrow")
_alias("index_select", "index_select")
_alias("where", "where")
_alias("masked_fill", "masked_fill")
_alias("linear", "linear")
_alias("matmul", "matmul", "mm", "bmm")
_alias("rmatmul", "rmatmul")
_alias("addmm", "addmm")
_alias("embedding", "embedding")
_alias("batch_norm", "batch_norm")
_alias("instance_norm", "instance_norm")
_alias("layer_norm", "layer_norm")
_alias("group_norm", "group_norm")
_alias("rms_norm", "rms_norm")
_alias("normalize", "normalize")
_alias("weight_norm", "_weight_norm")
_alias("sdpa", "scaled_dot_product_attention")
_alias("softmax", "softmax", "log_softmax")
_alias(
    "compare",
    "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal",
    "not_equal", "sign", "signbit",
)  # fmt: skip
_alias("copy", "copy")
_alias(
    "const",
    "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace",
    "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "new_tensor", "bernoulli", "fill", "zero", "eye", "normal", "uniform", "randperm",
    "empty_strided", "scalar_tensor", "grad",
)  # fmt: skip
_alias(
    "nonhom",
    "gelu", "silu", "sigmoid", "tanh", "softplus", "mish", "hardswish", "hardsigmoid",
    "elu", "selu", "celu", "relu6", "hardtanh", "exp", "log", "log1p", "expm1", "erf", "sin",
    "cos", "softsign", "logsigmoid", "tanhshrink", "glu", "hardshrink", "softshrink",
    "threshold", "logsumexp", "rpow", "alpha_dropout", "feature_alpha_dropout", "exp2",
    "log2", "log10", "sigmoid_", "swish", "erfc",
)  # fmt: skip

_SILENT = frozenset(
    {"size", "dim", "numel", "shape", "dtype", "device", "is_contiguous", "stride", "item",
     "tolist", "bool", "int", "long", "len", "ndim", "is_floating_point", "requires_grad_",
     "element_size", "nelement", "data_ptr", "storage_offset", "get_device", "is_cuda",
     "set_grad_enabled", "_set_grad_enabled", "repr", "format", "hash", "getattr", "nonzero"}
)  # fmt: skip
"""Calls that only read metadata: never graph nodes (`requires_grad_` returns its input)."""

_NORM_OPS = frozenset(
    {"batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "normalize",
     "weight_norm"}
)  # fmt: skip
NORM_OPS = _NORM_OPS
"""Operations that normalize their input (the ones that make weights scale-invariant)."""


def raw_name(func: Any) -> str:
    """The bare name of a torch function, tensor method, property getter or operator."""
    if isinstance(func, str):
        return func
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # property getters (x.T, x.mT, x.data) come as descriptor.__get__
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return str(name)


def base_name(name: str) -> tuple[str, bool]:
    """(`add`, in-place?) for `add`, `add_`, `__add__`, `__iadd__`; dunders lose underscores."""
    if name.startswith("__") and name.endswith("__"):
        return name[2:-2], name.startswith("__i") and name[2:-2] in _ALIASES
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        return name[:-1], True
    return name, False


def canonical_op(name: str) -> str:
    base, _ = base_name(name)
    return _ALIASES.get(base) or _ALIASES.get(base.lstrip("_")) or "unknown"


def _is_method(fn: Any) -> bool:
    if isinstance(fn, str):  # fx call_method
        return True
    qualname = getattr(fn, "__qualname__", "") or ""
    return qualname.startswith(("TensorBase.", "Tensor.", "_TensorBase."))


# -- argument normalization ----------------------------------------------------------------


def _p(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _dims(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list | tuple | torch.Size) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _varargs_ints(args: Sequence[Any], start: int, kwargs: dict[str, Any], name: str) -> Any:
    if len(args) > start and isinstance(args[start], list | tuple | torch.Size):
        return tuple(args[start])
    if len(args) > start:
        return tuple(args[start:])
    return kwargs.get(name)


def _first_ref(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, Ref):
            return value
    return None


def _all_refs(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Ref]:
    return [Ref(i) for i in dict.fromkeys(_flatten_refs([list(args), kwargs]))]


def _reduce_args(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    rest = list(args[1:])
    dim = kwargs.get("dim", kwargs.get("axis"))
    keepdim = kwargs.get("keepdim", False)
    if rest and (isinstance(rest[0], int | list | tuple) and not isinstance(rest[0], bool)):
        dim = rest.pop(0)
    bools = [v for v in rest if isinstance(v, bool)]
    if "keepdim" not in kwargs and bools:
        keepdim = bools[-1]
    if dim is not None and not isinstance(dim, bool):
        dims = _dims(dim)
        return {"x": args[0], "dims": dims if dims else None, "keepdim": bool(keepdim)}
    return {"x": args[0], "dims": None, "keepdim": bool(keepdim)}


def normalize_call(
    name: str, fn: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Canonical op and named arguments of one call (tensors already `Ref`s)."""
    op = canonical_op(name)
    base, _ = base_name(name)
    a = list(args)
    kw = dict(kwargs)
    x = a[0] if a else _first_ref(a, kw)
    if op in {"identity", "dropout", "reshape", "expand", "t", "mt", "abs", "neg", "sqrt",
              "rsqrt", "reciprocal", "square", "nonhom", "unknown", "const"}:  # fmt: skip
        if op == "dropout" and _p(a, kw, 2, "training", True) is False:
            op = "identity"
        first = x if isinstance(x, Ref) else _first_ref(a, kw)
        if op in {"nonhom", "unknown"}:
            return op, {"x": first, "all": _all_refs(a, kw)}
        return op, {"x": first}
    if op == "relu":
        weight = _p(a, kw, 1, "weight") if base == "prelu" else None
        return op, {"x": x, "weight": weight if isinstance(weight, Ref) else None}
    if op == "repeat":
        return op, {"x": x, "sizes": _varargs_ints(a, 1, kw, "repeats")}
    if op == "permute":
        return op, {"x": x, "dims": _varargs_ints(a, 1, kw, "dims")}
    if op == "transpose":
        return op, {"x": x, "d0": _p(a, kw, 1, "dim0"), "d1": _p(a, kw, 2, "dim1")}
    if op == "movedim":
        return op, {
            "x": x,
            "source": _dims(_p(a, kw, 1, "source")),
            "destination": _dims(_p(a, kw, 2, "destination")),
        }
    if op in {"add", "sub", "rsub", "mul", "div", "rdiv", "maximum", "compare"}:
        other = _p(a, kw, 1, "other", 0 if base in {"sign", "signbit"} else None)
        first, second = (other, x) if op in {"rsub", "rdiv"} else (x, other)
        op = {"rsub": "sub", "rdiv": "div"}.get(op, op)
        out: dict[str, Any] = {"a": first, "b": second}
        if op == "div":
            out["rounding_mode"] = kw.get("rounding_mode")
        if op in {"add", "sub"}:
            out["alpha"] = _p(a, kw, 2, "alpha", 1)
        return op, out
    if op == "pow":
        if not isinstance(x, Ref):
            return "nonhom", {"x": _first_ref(a, kw)}
        return op, {"x": x, "exponent": _p(a, kw, 1, "exponent")}
    if op == "clamp":
        return op, {"x": x, "min": _p(a, kw, 1, "min"), "max": _p(a, kw, 2, "max")}
    if op == "clamp_min":
        return "clamp", {"x": x, "min": _p(a, kw, 1, "min"), "max": None}
    if op == "clamp_max":
        return "clamp", {"x": x, "min": None, "max": _p(a, kw, 1, "max")}
    if op == "max":
        second = _p(a, kw, 1, "dim", kw.get("other"))
        if isinstance(second, Ref):
            return "maximum", {"a": x, "b": second}
        if second is None:
            return "amax", {"x": x, "dims": None, "keepdim": False}
        return "max_dim", {"x": x, "dims": _dims(second), "keepdim": bool(_p(a, kw, 2, "keepdim"))}
    if op in {"reduce", "var", "std", "var_mean", "std_mean"}:
        return op, _reduce_args(a, kw)
    if op == "amax":
        dims = _dims(_p(a, kw, 1, "dim", ()))
        return op, {"x": x, "dims": dims or None, "keepdim": bool(_p(a, kw, 2, "keepdim"))}
    if op == "vnorm":
        dim, keep = _p(a, kw, 2, "dim"), _p(a, kw, 3, "keepdim", False)
        return op, {"x": x, "dims": _dims(dim), "keepdim": bool(keep)}
    if op == "pool":
        return op, _pool_args(base, a, kw)
    if op == "interpolate":
        return op, {"x": x, "mode": _p(a, kw, 3, "mode", "nearest")}
    if op == "pad":
        if base == "constant_pad_nd":
            return op, {"x": x, "pad": tuple(_p(a, kw, 1, "pad")), "mode": "constant",
                        "value": _p(a, kw, 2, "value", 0)}  # fmt: skip
        value = _p(a, kw, 3, "value")
        return op, {
            "x": x,
            "pad": tuple(_p(a, kw, 1, "pad")),
            "mode": _p(a, kw, 2, "mode", "constant"),
            "value": 0 if value is None else value,
        }
    if op in {"cat", "stack"}:
        tensors = _p(a, kw, 0, "tensors")
        return op, {"tensors": list(tensors), "dim": _p(a, kw, 1, "dim", 0)}
    if op == "split":
        dim = _p(a, kw, 1, "dim", 0) if base == "unbind" else _p(a, kw, 2, "dim", 0)
        return op, {"x": x, "dim": dim, "unbind": base == "unbind"}
    if op == "getitem":
        return op, {"x": x, "index": a[1]}
    if op == "setitem":
        return op, {"x": x, "index": a[1], "value": a[2]}
    if op == "select":
        return op, {"x": x, "dim": _p(a, kw, 1, "dim"), "index": _p(a, kw, 2, "index")}
    if op == "narrow":
        return op, {
            "x": x,
            "dim": _p(a, kw, 1, "dim"),
            "start": _p(a, kw, 2, "start"),
            "length": _p(a, kw, 3, "length"),
        }
    if op == "index_select":
        return op, {"x": x, "dim": _p(a, kw, 1, "dim"), "index": _p(a, kw, 2, "index")}
    if op == "where":
        if _is_method(fn):
            return op, {"cond": _p(a, kw, 1, "condition"), "a": x, "b": _p(a, kw, 2, "other")}
        if len(a) + len(kw) < 3:
            return "unknown", {"x": x, "all": _all_refs(a, kw)}
        return op, {"cond": x, "a": _p(a, kw, 1, "input"), "b": _p(a, kw, 2, "other")}
    if op == "masked_fill":
        return op, {"x": x, "mask": _p(a, kw, 1, "mask"), "value": _p(a, kw, 2, "value")}
    if op in {"conv", "conv_transpose"}:
        return op, {
            "x": x,
            "weight": _p(a, kw, 1, "weight"),
            "bias": _p(a, kw, 2, "bias"),
            "groups": _p(a, kw, 6, "groups", 1),
            "transposed": op == "conv_transpose",
        }
    if op == "linear":
        return op, {"x": x, "weight": _p(a, kw, 1, "weight"), "bias": _p(a, kw, 2, "bias")}
    if op in {"matmul", "rmatmul"}:
        other = _p(a, kw, 1, "other")
        return "matmul", ({"a": other, "b": x} if op == "rmatmul" else {"a": x, "b": other})
    if op == "addmm":
        return op, {"bias": x, "a": _p(a, kw, 1, "mat1"), "b": _p(a, kw, 2, "mat2")}
    if op == "embedding":
        if fn is torch.embedding:
            return op, {"idx": _p(a, kw, 1, "indices"), "weight": x}
        return op, {"idx": x, "weight": _p(a, kw, 1, "weight")}
    if op in {"batch_norm", "instance_norm"}:
        return op, _batch_norm_args(op, fn, a, kw)
    if op == "layer_norm":
        shape = _p(a, kw, 1, "normalized_shape")
        return op, {
            "x": x,
            "ndim": len(_dims(shape) or ()),
            "weight": _p(a, kw, 2, "weight"),
            "bias": _p(a, kw, 3, "bias"),
        }
    if op == "rms_norm":
        shape = _p(a, kw, 1, "normalized_shape")
        return op, {"x": x, "ndim": len(_dims(shape) or ()), "weight": _p(a, kw, 2, "weight"),
                    "bias": None}  # fmt: skip
    if op == "group_norm":
        return op, {
            "x": x,
            "groups": _p(a, kw, 1, "num_groups"),
            "weight": _p(a, kw, 2, "weight"),
            "bias": _p(a, kw, 3, "bias"),
        }
    if op == "normalize":
        return op, {"x": x, "dim": _p(a, kw, 2, "dim", 1)}
    if op == "weight_norm":
        return op, {"v": x, "g": _p(a, kw, 1, "g"), "dim": _p(a, kw, 2, "dim", 0)}
    if op == "sdpa":
        return op, {
            "q": x,
            "k": _p(a, kw, 1, "key"),
            "v": _p(a, kw, 2, "value"),
            "mask": _p(a, kw, 3, "attn_mask"),
            "dropout_p": _p(a, kw, 4, "dropout_p", 0.0),
        }
    if op == "softmax":
        return op, {"x": x, "dim": _p(a, kw, 1, "dim")}
    if op == "copy":
        return op, {"x": x, "src": _p(a, kw, 1, "src")}
    return "unknown", {"x": x, "all": _all_refs(a, kw)}


def _pool_args(base: str, a: Sequence[Any], kw: dict[str, Any]) -> dict[str, Any]:
    nd = 1 if "1d" in base else 3 if "3d" in base else 2
    if "adaptive" in base:
        kind = "adaptive_max" if "max" in base else "adaptive_avg"
        indices = "with_indices" in base or bool(_p(a, kw, 2, "return_indices", False))
        return {"x": a[0], "kind": kind, "nd": nd, "padding": 0, "count_include_pad": False,
                "return_indices": indices}  # fmt: skip
    if base.startswith("lp_pool"):
        return {"x": a[0], "kind": "lp", "nd": nd, "padding": 0, "count_include_pad": False,
                "return_indices": False}  # fmt: skip
    if base.startswith("max_pool"):
        indices = "with_indices" in base or bool(_p(a, kw, 6, "return_indices", False))
        return {"x": a[0], "kind": "max", "nd": nd, "padding": _p(a, kw, 3, "padding", 0),
                "count_include_pad": False, "return_indices": indices}  # fmt: skip
    return {
        "x": a[0],
        "kind": "avg",
        "nd": nd,
        "padding": _p(a, kw, 3, "padding", 0),
        "count_include_pad": bool(_p(a, kw, 5, "count_include_pad", True)),
        "return_indices": False,
    }


def _batch_norm_args(op: str, fn: Any, a: Sequence[Any], kw: dict[str, Any]) -> dict[str, Any]:
    # F.batch_norm/F.instance_norm take (input, running_mean, running_var, weight, bias, ...);
    # torch.batch_norm/torch.instance_norm take (input, weight, bias, running_mean, ...).
    functional = inspect.isfunction(fn)
    if functional:
        running_mean, weight, bias = (
            _p(a, kw, 1, "running_mean"),
            _p(a, kw, 3, "weight"),
            _p(a, kw, 4, "bias"),
        )
    else:
        weight, bias, running_mean = (
            _p(a, kw, 1, "weight"),
            _p(a, kw, 2, "bias"),
            _p(a, kw, 3, "running_mean"),
        )
    flag_name = "training" if op == "batch_norm" else "use_input_stats"
    flag = _p(a, kw, 5, flag_name, op == "instance_norm")
    return {
        "x": a[0],
        "weight": weight,
        "bias": bias,
        "batch_stats": bool(flag) or running_mean is None,
    }


# -- leaf modules (fx) ---------------------------------------------------------------------


def module_call(
    module: nn.Module, args: Sequence[Any], param_ref: Callable[[Any], Any]
) -> tuple[str, dict[str, Any]]:
    """Canonical op of a standard `torch.nn` module called on `args` (fx leaf modules)."""
    x = args[0] if args else None
    kind = type(module).__name__.lower()
    weight = param_ref(getattr(module, "weight", None))
    bias = param_ref(getattr(module, "bias", None))
    if isinstance(module, nn.modules.conv._ConvNd):
        op = "conv_transpose" if module.transposed else "conv"
        return op, {"x": x, "weight": weight, "bias": bias, "groups": module.groups,
                    "transposed": module.transposed}  # fmt: skip
    if isinstance(module, nn.Linear):
        return "linear", {"x": x, "weight": weight, "bias": bias}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        batch_stats = module.training or module.running_mean is None
        return "batch_norm", {"x": x, "weight": weight, "bias": bias, "batch_stats": batch_stats}
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        batch_stats = module.training or not module.track_running_stats
        return "instance_norm", {"x": x, "weight": weight, "bias": bias,
                                 "batch_stats": batch_stats}  # fmt: skip
    if isinstance(module, nn.LayerNorm):
        return "layer_norm", {"x": x, "ndim": len(module.normalized_shape), "weight": weight,
                              "bias": bias}  # fmt: skip
    if isinstance(module, nn.GroupNorm):
        return "group_norm", {"x": x, "groups": module.num_groups, "weight": weight,
                              "bias": bias}  # fmt: skip
    rms_norm_cls = getattr(nn, "RMSNorm", None)
    if rms_norm_cls is not None and isinstance(module, rms_norm_cls):
        return "rms_norm", {"x": x, "ndim": len(module.normalized_shape), "weight": weight,
                            "bias": None}  # fmt: skip
    if isinstance(module, nn.PReLU):
        return "relu", {"x": x, "weight": weight}
    if isinstance(module, nn.ReLU | nn.LeakyReLU | nn.RReLU):
        return "relu", {"x": x, "weight": None}
    if isinstance(module, nn.modules.dropout._DropoutNd) and not isinstance(
        module, nn.AlphaDropout | nn.FeatureAlphaDropout
    ):
        return ("dropout" if module.training else "identity"), {"x": x}
    if isinstance(module, nn.Identity):
        return "identity", {"x": x}
    if isinstance(module, nn.Flatten | nn.Unflatten):
        return "reshape", {"x": x}
    if isinstance(module, nn.modules.pooling._MaxPoolNd):
        nd = {"maxpool1d": 1, "maxpool3d": 3}.get(kind, 2)
        return "pool", {"x": x, "kind": "max", "nd": nd, "padding": module.padding,
                        "count_include_pad": False,
                        "return_indices": module.return_indices}  # fmt: skip
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        nd = {"avgpool1d": 1, "avgpool3d": 3}.get(kind, 2)
        return "pool", {"x": x, "kind": "avg", "nd": nd,
                        "padding": getattr(module, "padding", 0),
                        "count_include_pad": getattr(module, "count_include_pad", True),
                        "return_indices": False}  # fmt: skip
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
        nd = {"adaptiveavgpool1d": 1, "adaptiveavgpool3d": 3}.get(kind, 2)
        return "pool", {"x": x, "kind": "adaptive_avg", "nd": nd, "padding": 0,
                        "count_include_pad": False, "return_indices": False}  # fmt: skip
    if isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
        nd = {"adaptivemaxpool1d": 1, "adaptivemaxpool3d": 3}.get(kind, 2)
        return "pool", {"x": x, "kind": "adaptive_max", "nd": nd, "padding": 0,
                        "count_include_pad": False,
                        "return_indices": module.return_indices}  # fmt: skip
    if isinstance(module, nn.modules.pooling._LPPoolNd):
        return "pool", {"x": x, "kind": "lp", "nd": 1 if "1d" in kind else 2, "padding": 0,
                        "count_include_pad": False, "return_indices": False}  # fmt: skip
    if isinstance(module, nn.modules.padding._ConstantPadNd):
        return "pad", {"x": x, "pad": tuple(module.padding), "mode": "constant",
                       "value": module.value}  # fmt: skip
    if isinstance(
        module, nn.modules.padding._ReflectionPadNd | nn.modules.padding._ReplicationPadNd
    ):
        return "pad", {"x": x, "pad": tuple(module.padding), "mode": "reflect", "value": 0}
    if isinstance(module, nn.Upsample):
        return "interpolate", {"x": x, "mode": module.mode}
    if isinstance(module, nn.Embedding):
        return "embedding", {"idx": x, "weight": weight}
    if isinstance(module, nn.Softmax | nn.LogSoftmax):
        return "softmax", {"x": x, "dim": module.dim}
    op = canonical_op(kind)
    if op in {"nonhom", "identity"}:
        return op, {"x": x}
    # Anything else is not modelled: its inputs and its own parameters are taken to lose
    # scale invariance (conservative).
    params = [param_ref(p) for p in module.parameters(recurse=False)]
    inputs = list(_flatten_refs(list(args)))
    return "unknown", {
        "x": x,
        "all": [Ref(i) for i in inputs] + [p for p in params if p is not None],
    }


# -- building ------------------------------------------------------------------------------


def _flatten_refs(value: Any) -> Iterator[int]:
    if isinstance(value, Ref):
        yield value.node
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _flatten_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten_refs(v)
    elif isinstance(value, slice):
        yield from _flatten_refs((value.start, value.stop, value.step))


_NORM_MODULE_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class _Builder:
    """Appends nodes; shared by both front ends."""

    def __init__(self, model: nn.Module, method: ClassificationMethod) -> None:
        self.model = model
        self.method = method
        self.nodes: list[OpNode] = []
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.params: dict[str, int] = {}
        self.param_ids: dict[int, int] = {}
        for name, param in model.named_parameters():
            index = self.add("param", {"name": name}, tuple(param.shape), "", name, "parameter")
            self.params[name] = index
            self.param_ids[id(param)] = index

    def add(
        self,
        op: str,
        args: dict[str, Any],
        shape: tuple[int, ...] | None,
        module: str,
        label: str,
        fn_name: str,
    ) -> int:
        index = len(self.nodes)
        refs = tuple(_flatten_refs(args))
        self.nodes.append(OpNode(index, op, args, shape, module, label, fn_name, refs))
        return index

    def label(self, module: str, fn_name: str, op: str) -> str:
        """A module path for an op that is its module's whole job, else the function name."""
        owner = self.modules.get(module)
        if module and owner is not None:
            is_norm = (
                isinstance(owner, _NORM_MODULE_TYPES) or "norm" in type(owner).__name__.lower()
            )
            if op in _NORM_OPS and is_norm:
                return module
            if not any(True for _ in owner.children()) and op != "param":
                return module
        name = base_name(fn_name)[0]
        return f"{module}:{name}" if module and op in _NORM_OPS else name


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_tensor_tuple(value: Any) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value)
    )


# -- execution trace -----------------------------------------------------------------------


class _ExecutionRecorder(torch.overrides.TorchFunctionMode):
    """Records every torch-level call of one forward pass into a `_Builder`."""

    def __init__(self, builder: _Builder) -> None:
        super().__init__()
        self.builder = builder
        self.tensor_nodes: dict[int, int] = dict(builder.param_ids)
        self.parameter_ids = frozenset(builder.param_ids)
        self.module_stack: list[str] = [""]
        self.named = {id(m): name for name, m in builder.model.named_modules()}

    def ref(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            index = self.tensor_nodes.get(id(value))
            if index is None:  # a tensor made outside the recorded calls (plain attribute)
                index = self.builder.add("const", {}, tuple(value.shape), self.module_stack[-1],
                                         "constant", "constant")  # fmt: skip
                self.track(value, index)
            return Ref(index)
        if isinstance(value, list | tuple) and not isinstance(value, torch.Size):
            return (
                type(value)(self.ref(v) for v in value)
                if not hasattr(value, "_fields")
                else [self.ref(v) for v in value]
            )
        if isinstance(value, slice):
            return slice(self.ref(value.start), self.ref(value.stop), self.ref(value.step))
        if isinstance(value, dict):
            return {k: self.ref(v) for k, v in value.items()}
        return value

    def track(self, tensor: torch.Tensor, index: int) -> None:
        """Map `tensor` to node `index` for as long as it lives (ids are reused after that), so
        activations are freed as usual while the forward pass runs."""
        key = id(tensor)
        known = key in self.tensor_nodes
        self.tensor_nodes[key] = index
        if not known and key not in self.parameter_ids:
            weakref.finalize(tensor, self.tensor_nodes.pop, key, None)

    def bind_input(self, value: Any, label: str) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in self.tensor_nodes:
                index = self.builder.add("input", {}, tuple(value.shape), "", label, "input")
                self.track(value, index)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                self.bind_input(v, f"{label}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                self.bind_input(v, f"{label}[{k!r}]")

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        name = raw_name(func)
        base, _ = base_name(name)
        if base in _SILENT:
            return
        mutated = base == "setitem"
        if not (isinstance(out, torch.Tensor) or _is_tensor_tuple(out) or mutated):
            return
        bound_args = self.ref(list(args))
        bound_kwargs = self.ref(dict(kwargs))
        op, nargs = normalize_call(name, func, bound_args, bound_kwargs)
        module = self.module_stack[-1]
        label = self.builder.label(module, name, op)
        if mutated:
            target = args[0]
            index = self.builder.add(op, nargs, _shape(target), module, label, name)
            self.track(target, index)
            return
        if isinstance(out, torch.Tensor):
            index = self.builder.add(op, nargs, _shape(out), module, label, name)
            self.track(out, index)
            return
        parent = self.builder.add(op, nargs, None, module, label, name)
        for i, item in enumerate(out):
            index = self.builder.add("item", {"parent": Ref(parent), "index": i}, _shape(item),
                                     module, label, name)  # fmt: skip
            self.track(item, index)

    @contextmanager
    def module_hooks(self) -> Iterator[None]:
        def push(module: nn.Module, _inputs: Any) -> None:
            self.module_stack.append(self.named.get(id(module), self.module_stack[-1]))

        def pop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            if len(self.module_stack) > 1:
                self.module_stack.pop()

        pre = nn.modules.module.register_module_forward_pre_hook(push)
        post = nn.modules.module.register_module_forward_hook(pop, always_call=True)
        try:
            yield
        finally:
            pre.remove()
            post.remove()


def _output_nodes(value: Any, lookup: Callable[[torch.Tensor], int | None]) -> list[int]:
    out: list[int] = []
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            index = lookup(leaf)
            if index is not None:
                out.append(index)
    return out


def _trace_execution(model: nn.Module, example: ExampleInput, where: str) -> ModelGraph:
    builder = _Builder(model, ClassificationMethod.EXECUTION_TRACE)
    recorder = _ExecutionRecorder(builder)
    for i, arg in enumerate(example.args):
        recorder.bind_input(arg, f"input{i}")
    for key, value in example.kwargs.items():
        recorder.bind_input(value, key)
    try:
        with torch.no_grad(), recorder.module_hooks(), recorder:
            output = model(*example.args, **example.kwargs)
    except (KeyboardInterrupt, ModelFileError):
        raise
    except Exception as exc:
        raise describe_user_error(
            f"{where}the forward pass on the example input ({example.describe()})", exc
        ) from None
    outputs = _output_nodes(output, lambda t: recorder.tensor_nodes.get(id(t)))
    if not outputs:
        raise ModelFileError(
            f"{where}the model's output holds no floating-point tensor: nothing to analyze"
        )
    return ModelGraph(builder.nodes, builder.params, tuple(outputs), builder.method)


# -- torch.fx symbolic trace ---------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """Standard torch.nn modules stay leaves, except parametrized ones (weight norm etc.),
    whose parametrization is traced through so the analysis sees how the weight is made."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from torch.nn.utils import parametrize

        if type(m).__module__.startswith("torch.nn.utils.parametriz") or (
            parametrize.is_parametrized(m)
        ):
            return False
        return bool(super().is_leaf_module(m, module_qualified_name))


@dataclass(frozen=True)
class _TensorMeta:
    """What the graph needs of a tensor the traced graph made: not the tensor itself, so
    activations are freed as the interpreter goes."""

    shape: tuple[int, ...]
    floating: bool


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _TensorMeta(tuple(value.shape), value.is_floating_point())
    if _is_tensor_tuple(value):
        return tuple(_meta(v) for v in value)
    return value


def _is_meta_tuple(value: Any) -> bool:
    return (
        isinstance(value, tuple) and bool(value) and all(isinstance(v, _TensorMeta) for v in value)
    )


class _ValueRecorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = _meta(value)
        return value


class FxTraceError(Exception):
    """Symbolic tracing did not work for this model (reason in the message)."""


def _trace_fx(model: nn.Module, example: ExampleInput) -> ModelGraph:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph)
    except Exception as exc:
        raise FxTraceError(
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*example.args, **example.kwargs)
        bound.apply_defaults()
        call_args = [bound.arguments[p.target] if p.target in bound.arguments else p.args[0]
                     for p in placeholders]  # fmt: skip
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise FxTraceError(f"cannot bind the example input to forward(): {exc}") from None
    interpreter = _ValueRecorder(gm)
    try:
        with torch.no_grad():
            interpreter.run(*call_args)
    except Exception as exc:
        raise FxTraceError(
            f"running the traced graph failed: {type(exc).__name__}: {exc}"
        ) from None
    builder = _Builder(model, ClassificationMethod.FX_SYMBOLIC)
    values = interpreter.values
    index_of: dict[torch.fx.Node, int] = {}
    params_by_id = builder.param_ids
    named_buffers = dict(model.named_buffers())
    named_params = dict(model.named_parameters(remove_duplicate=False))

    def param_ref(tensor: Any) -> Ref | None:
        if isinstance(tensor, torch.Tensor) and id(tensor) in params_by_id:
            return Ref(params_by_id[id(tensor)])
        return None

    def convert(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if arg in index_of:
                value = values.get(arg)
                if isinstance(value, _TensorMeta) or _is_meta_tuple(value):
                    return Ref(index_of[arg])
            return values.get(arg)
        if isinstance(arg, list | tuple) and not isinstance(arg, torch.Size):
            return (
                type(arg)(convert(a) for a in arg)
                if not hasattr(arg, "_fields")
                else [convert(a) for a in arg]
            )
        if isinstance(arg, slice):
            return slice(convert(arg.start), convert(arg.stop), convert(arg.step))
        if isinstance(arg, dict):
            return {k: convert(v) for k, v in arg.items()}
        return arg

    for node in gm.graph.nodes:
        value = values.get(node)
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack)) if stack else ""
        owner = (
            owner if owner in builder.modules else (list(stack.values())[-1][0] if stack else "")
        )
        shape = value.shape if isinstance(value, _TensorMeta) else None
        if node.op == "placeholder":
            index_of[node] = builder.add("input", {}, shape, "", node.name, "input")
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr":
            target = str(node.target)
            if target in named_params:
                index_of[node] = params_by_id[id(named_params[target])]
            elif isinstance(value, _TensorMeta):
                kind = "buffer" if target in named_buffers else "constant"
                index_of[node] = builder.add("const", {}, shape, owner, target, kind)
            continue
        if not (isinstance(value, _TensorMeta) or _is_meta_tuple(value)):
            continue  # sizes, dims and other metadata: used as concrete values by consumers
        args = convert(list(node.args))
        kwargs = convert(dict(node.kwargs))
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            op, nargs = module_call(module, args, param_ref)
            name, fn_name, owner = str(node.target), type(module).__name__, str(node.target)
            label = name
        else:
            fn: Any = node.target
            fn_name = raw_name(fn)
            if node.op == "call_function" and fn is operator.getitem and isinstance(args[0], Ref):
                parent = builder.nodes[args[0].node]
                if parent.shape is None:
                    index_of[node] = builder.add(
                        "item", {"parent": args[0], "index": args[1]}, shape, owner,
                        parent.label, parent.fn_name,
                    )  # fmt: skip
                    continue
            op, nargs = normalize_call(fn_name, fn, args, kwargs)
            label = builder.label(owner, fn_name, op)
        index_of[node] = builder.add(op, nargs, shape, owner, label, fn_name)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [
        index_of[leaf]
        for leaf in torch.utils._pytree.tree_leaves(out_node.args[0])
        if isinstance(leaf, torch.fx.Node)
        and leaf in index_of
        and isinstance(values.get(leaf), _TensorMeta)
        and values[leaf].floating
    ]
    if not outputs:
        raise FxTraceError("the traced output holds no floating-point tensor")
    return ModelGraph(builder.nodes, builder.params, tuple(outputs), builder.method)


# -- entry point ---------------------------------------------------------------------------


@contextmanager
def _train_mode_preserving_state(model: nn.Module) -> Iterator[None]:
    """Trace in train mode (the mode scale invariance is about) and leave the model as found:
    its mode, and its buffers (a train-mode forward updates BatchNorm running statistics)."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda = sorted({t.device for t in [*model.parameters(), *model.buffers()] if t.is_cuda}, key=str)
    model.train()
    try:
        # Dropout and stochastic depth draw from the caller's RNG: fork it, and seed it so
        # the traced path (data-dependent control flow) is the same on every run.
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])


def trace_model(
    model: nn.Module,
    example: ExampleInput,
    method: TraceMethod = TraceMethod.AUTO,
    *,
    where: str = "",
) -> ModelGraph:
    """The model's graph in train mode. `AUTO` tries `torch.fx` symbolic tracing and falls back
    to the execution trace, saying why in the graph's notes. `where` prefixes error messages
    (e.g. the model file's name)."""
    with _train_mode_preserving_state(model):
        if method in (TraceMethod.AUTO, TraceMethod.FX):
            try:
                graph = _trace_fx(model, example)
            except FxTraceError as exc:
                if method is TraceMethod.FX:
                    raise ModelFileError(
                        f"{where}torch.fx symbolic tracing failed ({exc}); use --trace "
                        "execution (or auto) to analyze what a forward pass actually does"
                    ) from None
                graph = _trace_execution(model, example, where)
                graph.notes = (
                    f"torch.fx symbolic tracing failed ({exc}); used the execution trace of a "
                    "forward pass on the example input",
                )
            return graph
        return _trace_execution(model, example, where)


__all__ = [
    "NORM_OPS",
    "ModelGraph",
    "OpNode",
    "Ref",
    "TraceMethod",
    "canonical_op",
    "normalize_call",
    "raw_name",
    "trace_model",
]
