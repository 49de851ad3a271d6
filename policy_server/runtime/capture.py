"""Capture what enters chosen modules of a model during one forward pass (routing features).

The value-subspace router scores the hidden states entering an action-expert value projection.
Those states only belong to one robot if nothing else runs the shared model while the hook is
registered, so ``PolicyRuntime.capture`` uses this under its own lock; this module only knows how
to hook, record and unhook.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from policy_server.errors import InputError, StateError


def module_path(key: str) -> str:
    """Module path owning ``key``: a weight key (``a.b.weight``) names its module ``a.b``; a plain
    module path is returned unchanged."""
    return key[:-len(".weight")] if key.endswith(".weight") else key


class InputCapture:
    """Context manager recording the first positional input of the modules owning ``keys``.

    ``inputs[key]``: float32 (N, in) on the CPU, every token of every batch row flattened (the
    last call wins when a module runs more than once per forward). Modules are resolved when the
    context is entered, so layers swapped in after construction (side-path wrappers) are hooked.
    """

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        if not keys:
            raise InputError("capture: no module keys given")
        self.model, self.keys = model, list(keys)
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook_for(self, key: str):
        def hook(_mod, args):
            x = args[0].detach()
            self.inputs[key] = x.reshape(-1, x.shape[-1]).to("cpu", torch.float32).clone()
        return hook

    def __enter__(self) -> "InputCapture":
        for key in self.keys:
            try:
                mod = self.model.get_submodule(module_path(key))
            except AttributeError as e:
                self.__exit__()
                raise InputError(f"the model has no module {module_path(key)!r} (from capture "
                                 f"key {key!r})") from e
            self._handles.append(mod.register_forward_pre_hook(self._hook_for(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> dict[str, torch.Tensor]:
        """{key: float32 (N, in)}; ``StateError`` naming a key whose module never ran."""
        missing = [k for k in self.keys if k not in self.inputs]
        if missing:
            raise StateError(f"capture: modules {missing} were not called by the forward pass")
        return {k: self.inputs[k] for k in self.keys}
