"""What every method shares (the ``Method`` protocol), and ``Dense``, the unmodified model."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Method(Protocol):
    """A method is a dataclass whose fields are its hyper-parameters.

    - ``name``: its key in ``lazyattn.METHODS``;
    - ``apply(model)``: a context manager that installs the method, yields the model itself, and
      removes everything it installed on exit (also when the body raises);
    - ``params()``: the constructor fields as given (``build({"name": name, **params()})``
      rebuilds the method); it never changes after construction;
    - ``label(n_layers)``: the short row label of tables, for a model with ``n_layers`` decoder layers;
    - ``sort_key(n_layers)``: orders rows of the same method by their setting.
    """

    name: str

    def apply(self, model: nn.Module) -> ContextManager[nn.Module]: ...

    def params(self) -> dict[str, Any]: ...

    def label(self, n_layers: int) -> str: ...

    def sort_key(self, n_layers: int) -> tuple: ...


@dataclasses.dataclass
class Dense:
    """The unmodified model: the reference every method is compared against."""

    name = "dense"

    def params(self) -> dict[str, Any]:
        return {}

    def label(self, n_layers: int) -> str:
        return "Dense"

    def sort_key(self, n_layers: int) -> tuple:
        return ()

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        yield model
