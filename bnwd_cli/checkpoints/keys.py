"""Parameter-name normalization: wrapper prefixes that training frameworks add to keys."""

from __future__ import annotations

import functools
from collections.abc import Iterable

WRAPPER_COMPONENTS = frozenset(
    {
        "module",  # nn.DataParallel / DistributedDataParallel / DeepSpeed engines
        "_orig_mod",  # torch.compile
        "_fsdp_wrapped_module",  # FSDP (v1)
        "_checkpoint_wrapped_module",  # activation checkpointing wrapper
        "_forward_module",  # Lightning Fabric's wrapper
    }
)


def strip_wrapper_prefixes(key: str) -> str:
    """Remove wrapper components anywhere in a dotted key.

    `module.layer1._fsdp_wrapped_module.conv.weight` -> `layer1.conv.weight`. A component named
    `module` is only a wrapper when it is not the final attribute name (a parameter is never
    called `module`).
    """
    parts = key.split(".")
    kept = [p for p in parts[:-1] if p not in WRAPPER_COMPONENTS]
    return ".".join([*kept, parts[-1]])


def common_first_component(keys: Iterable[str]) -> str | None:
    """The first dotted component shared by every key, if there is one (Lightning's attribute)."""
    first: str | None = None
    for key in keys:
        head, sep, _ = key.partition(".")
        if not sep:
            return None
        if first is None:
            first = head
        elif head != first:
            return None
    return first


def normalize_keys(keys: Iterable[str], *, strip_common_prefix: bool = False) -> dict[str, str]:
    """Map every original key to its normalized name.

    `strip_common_prefix` drops a first component shared by all keys: a LightningModule stores
    its network under an attribute (`self.model = ...`), so every key starts with `model.`.
    Names that would collide after stripping are kept as they were.
    """
    return dict(_normalized(tuple(keys), strip_common_prefix))


@functools.lru_cache(maxsize=8)
def _normalized(originals: tuple[str, ...], strip_common_prefix: bool) -> dict[str, str]:
    """`normalize_keys`, remembered: every checkpoint of a run has the same keys."""
    stripped = [strip_wrapper_prefixes(k) for k in originals]
    if strip_common_prefix and len(stripped) > 0:
        head = common_first_component(stripped)
        if head is not None:
            stripped = [k[len(head) + 1 :] for k in stripped]
    if len(set(stripped)) != len(stripped):
        return {k: k for k in originals}
    return dict(zip(originals, stripped, strict=True))
