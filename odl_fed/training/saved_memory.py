"""What a training step holds for its backward pass, counted with ``saved_tensors_hooks``.

Every tensor autograd saves passes through the pack hook when it is saved. Bytes are counted per
storage (a view keeps its whole storage alive; two views of one storage are held once), and
parameters are left out: they are held whether or not anything trains. Modules can be tagged so
that a step's bytes split by the module that saved them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Context manager counting the bytes saved for backward while it is active.

    Parameters
    ----------
    exclude : iterable of Tensor (default: ())
        Tensors not to count (a model's parameters), matched by storage.
    modules : mapping of name -> nn.Module (default: {})
        Modules whose forward tags what is saved inside it with the name.
    """

    def __init__(self, exclude: Iterable[Tensor] = (), modules: Mapping[str, nn.Module] | None = None):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._modules = dict(modules or {})
        self._storages: dict[int, int] = {}  # data_ptr -> nbytes
        self._by_tag: dict[str, set[int]] = defaultdict(set)
        self._stack: list[str] = []
        self._handles: list = []
        self._hooks = None

    def _pack(self, tensor: Tensor) -> Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._excluded and storage.nbytes() > 0:
                self._storages[ptr] = storage.nbytes()
                self._by_tag[self._stack[-1] if self._stack else ""].add(ptr)
        return tensor

    def _enter_module(self, name: str):
        def hook(module, args) -> None:
            self._stack.append(name)

        return hook

    def _leave_module(self, module, args, output) -> None:
        self._stack.pop()

    def __enter__(self) -> SavedTensorMeter:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
            self._handles.append(module.register_forward_hook(self._leave_module))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of all distinct storages saved."""
        return sum(self._storages.values())

    def nbytes_of(self, tags: Iterable[str]) -> int:
        """Bytes of the distinct storages saved inside the modules tagged ``tags``."""
        ptrs = set().union(*(self._by_tag.get(tag, set()) for tag in tags))
        return sum(self._storages[p] for p in ptrs)

    def by_tag(self) -> dict[str, int]:
        return {tag: self.nbytes_of([tag]) for tag in self._by_tag}
