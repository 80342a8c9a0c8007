"""Switching the active LoRA adapter of a peft model, and its train/eval mode, without walking the model each time.

peft's `set_adapter`, `disable_adapter()` and torch's `train()` each walk every module of the PeftModel: with three
SmolLM2 adapters that is ~3,800 modules, and `set_adapter` also resets `requires_grad` of every adapter's weights.
Measured on this CPU in the LLM population (issue 16): ~0.1 s per disable_adapter, ~0.06 s per set_adapter and ~0.03 s
per train() call, several of each per PPO step: about a tenth of an iteration spent walking modules.

What a forward reads is two fields of each LoRA layer: its active adapter and its disabled flag, and each module's
`training` flag. `AdapterSwitch` finds the LoRA layers and the modules once (again whenever an adapter is added) and
sets exactly those fields, so a forward after it computes what it computes after peft's own calls
(tests/test_llm_lora_switch.py compares logits and gradients). What it does not do, on purpose: the `requires_grad`
bookkeeping. Only the active adapter's weights take part in a forward, so only they get gradients, whatever the
flags of the others; each learner marks its own weights trainable once (PPOLearner).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class AdapterSwitch:
    """Fast active-adapter, disable and train/eval switching for one PeftModel (module docstring)."""

    def __init__(self, model: Any, fast: bool = True) -> None:
        self.model = model
        self.fast = fast
        """False: peft's own set_adapter / disable_adapter and torch's train (the plain reference, and the code path
        before this class: benchmarks/llm_population.py's "today")."""
        self._layers: list[Any] = []
        self._modules: list[torch.nn.Module] = []
        self._flat_train = False
        self._adapters: tuple[str, ...] | None = None

    def _scan(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers import PreTrainedModel

        names = tuple(self.model.peft_config)
        if names == self._adapters:
            return
        self._modules = list(self.model.modules())
        self._layers = [m for m in self._modules if isinstance(m, BaseTunerLayer)]
        # a flat loop over `training` flags is nn.Module.train only where no module overrides train() with more
        plain = (torch.nn.Module.train, PreTrainedModel.train)
        self._flat_train = all(type(m).train in plain and not getattr(m, "use_kernels", False) for m in self._modules)
        self._adapters = names

    def activate(self, name: str) -> None:
        """Make `name` the adapter every LoRA layer applies (peft's set_adapter, without its requires_grad pass)."""
        if name not in self.model.peft_config:
            raise KeyError(f"no adapter {name!r}; have {', '.join(self.model.peft_config)}")
        if not self.fast:
            self.model.set_adapter(name)
            return
        self._scan()
        for layer in self._layers:
            layer._active_adapter = [name]
        self.model.base_model.active_adapter = name

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model alone inside the block (peft's disable_adapter for LoRA); the flags are restored after."""
        if not self.fast:
            with self.model.disable_adapter():
                yield
            return
        self._scan()
        before = [layer._disable_adapters for layer in self._layers]
        for layer in self._layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(self._layers, before, strict=True):
                layer._disable_adapters = flag

    def train(self, mode: bool = True) -> None:
        """model.train(mode), as one flat pass over the modules found once."""
        if self.fast:
            self._scan()
        if not (self.fast and self._flat_train):
            self.model.train(mode)
            return
        for m in self._modules:
            m.training = mode
