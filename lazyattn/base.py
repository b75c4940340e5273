"""What every method shares: a name, its parameters, and an ``apply`` context manager."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Method(Protocol):
    name: str

    def apply(self, model: nn.Module) -> ContextManager[Any]: ...

    def params(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class Dense:
    """The unmodified model: the reference every method is compared against."""

    name = "dense"

    def params(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        yield model
