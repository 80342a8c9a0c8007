"""Switching the active LoRA adapter of a peft model, its train/eval mode, and reading or writing one adapter's
weights, without walking the model each time.

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

A batch whose rows use different adapters (the engine scores every agent's decisions in one forward): peft's
`adapter_names=` path registers a hook on every LoRA layer per call (walking the model) and, in every layer,
builds each adapter's row list in Python and gathers and scatters its rows. `AdapterSwitch.rows(names)` works out
each adapter's rows once per call (a slice when they are contiguous) and gives each LoRA layer, for that call, a
forward that adds each adapter's LoRA to its rows of the base layer's output: what peft's mixed batch computes
(test: the same logits). Inference only, like peft's.

Weight sync reads an adapter out of the learner's model and writes it into the engine's, once per PPO step.
peft's `get_peft_model_state_dict` / `set_peft_model_state_dict` build the whole model's state dict (or load through
`load_state_dict`) to do it: ~25 ms and ~65 ms per call here. `export` / `load` ask peft once per adapter which
parameter stands behind each of its state-dict names (the tensors its state dict returns share the parameters'
storage), and then copy exactly those tensors (tests/test_llm_lora_switch.py: the same names and values as peft's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
        self._lora_layers: list[Any] = []  # the LoRA layers with their own lora_A / base_layer (what rows() patches)
        self._modules: list[torch.nn.Module] = []
        self._flat_train = False
        self._adapters: tuple[str, ...] | None = None
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {}  # adapter -> peft state-dict name -> parameter

    def _scan(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers import PreTrainedModel

        names = tuple(self.model.peft_config)
        if names == self._adapters:
            return
        self._modules = list(self.model.modules())
        self._layers = [m for m in self._modules if isinstance(m, BaseTunerLayer)]
        self._lora_layers = [m for m in self._layers if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        # a flat loop over `training` flags is nn.Module.train only where no module overrides train() with more
        plain = (torch.nn.Module.train, PreTrainedModel.train)
        self._flat_train = all(type(m).train in plain and not getattr(m, "use_kernels", False) for m in self._modules)
        self._adapters = names
        self._params = {}  # an adapter added or removed: its parameters are found again on their next use

    def _known(self, name: str) -> None:
        if name not in self.model.peft_config:
            raise KeyError(f"no adapter {name!r}; have {', '.join(self.model.peft_config)}")

    def activate(self, name: str) -> None:
        """Make `name` the adapter every LoRA layer applies (peft's set_adapter, without its requires_grad pass)."""
        self._known(name)
        if not self.fast:
            self.model.set_adapter(name)
            return
        self._scan()
        for layer in self._layers:
            layer._active_adapter = [name]
        self.model.base_model.active_adapter = name

    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Inside the block, row i of a forward's batch goes through adapter names[i] (BASE_ADAPTER: none), as with
        peft's `model(..., adapter_names=names)` (module docstring); inference only."""
        from actors.llm.engine import BASE_ADAPTER

        for name in sorted(set(names) - {BASE_ADAPTER}):
            self._known(name)
        if not self.fast:
            with self._peft_rows(names):
                yield
            return
        self._scan()
        plan: list[tuple[str, slice | torch.Tensor]] = []
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER:
                continue
            idx = [i for i, n in enumerate(names) if n == name]
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            plan.append((name, slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx)))
        layers = self._lora_layers
        for layer in layers:
            layer.__dict__["forward"] = _mixed_forward(layer, plan)
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    @contextmanager
    def _peft_rows(self, names: Sequence[str]) -> Iterator[None]:
        """peft's own mixed batch: the model's forward with adapter_names=names."""
        model = self.model
        forward = model.forward
        model.__dict__["forward"] = lambda *a, **k: forward(*a, adapter_names=list(names), **k)
        try:
            yield
        finally:
            model.__dict__.pop("forward", None)

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
            m.__dict__["training"] = mode  # what nn.Module.__setattr__ does for a bool, without its checks

    def _named(self, name: str) -> dict[str, torch.nn.Parameter]:
        """peft's state-dict names of adapter `name` -> the parameters behind them (asked of peft once)."""
        from peft import get_peft_model_state_dict

        self._scan()
        if name not in self._params:
            self._known(name)
            by_storage = {p.data_ptr(): p for p in self.model.parameters()}
            state = get_peft_model_state_dict(self.model, adapter_name=name)
            named = {k: by_storage.get(t.data_ptr()) for k, t in state.items()}
            if any(p is None or p.shape != state[k].shape for k, p in named.items()):
                raise RuntimeError(f"adapter {name!r}: peft's state dict holds tensors that are not its parameters")
            self._params[name] = named  # type: ignore[assignment]
        return self._params[name]

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Adapter `name`'s LoRA parameters (the tensors export and load read and write)."""
        return list(self._named(name).values())

    def export(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights under peft's state-dict names, as CPU copies (get_peft_model_state_dict)."""
        if not self.fast:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.model, adapter_name=name)
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return {k: p.detach().to("cpu", copy=True) for k, p in self._named(name).items()}

    def load(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy `tensors` (peft state-dict names) into adapter `name`; (missing, unexpected) names, as peft's
        set_peft_model_state_dict reports them for this adapter. Nothing is written unless the names fit."""
        if not self.fast:
            from peft import set_peft_model_state_dict

            res: Any = set_peft_model_state_dict(self.model, tensors, adapter_name=name)
            missing = [k for k in res.missing_keys if f".{name}." in k and "lora_" in k]
            return missing, list(res.unexpected_keys)
        named = self._named(name)
        missing = sorted(set(named) - set(tensors))
        unexpected = sorted(k for k, t in tensors.items() if k not in named or named[k].shape != t.shape)
        if not (missing or unexpected):
            with torch.no_grad():
                for k, t in tensors.items():
                    named[k].copy_(t)
        return missing, unexpected


def _mixed_forward(layer: Any, plan: Sequence[tuple[str, slice | torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """A LoRA layer's forward for one mixed batch: the base layer on every row, then each adapter's LoRA added to
    its rows (plan: adapter -> rows, a slice or an index tensor), as peft's _mixed_batch_forward does."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        for name, sel in plan:
            if name not in layer.lora_A:
                continue
            a, b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
            sub = x[sel].to(a.weight.dtype)
            out = (b(a(drop(sub))) * layer.scaling[name]).to(result.dtype)
            if isinstance(sel, slice):
                result[sel] += out
            else:
                result.index_add_(0, sel.to(result.device), out)
        return result

    return forward
