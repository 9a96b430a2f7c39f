"""transformers integration: the 'grape' quantization config and quantizer, and when they are registered.

A pruned checkpoint's config.json says `"quant_method": "grape"` and carries the per-layer
counts; `_process_model_before_weight_loading` shrinks each MoE block of the empty model to those
counts before weights load. Given a base checkpoint and a GrapeConfig without a layout,
`_process_model_after_weight_loading` prunes it instead (calibrating on `config.dataset`), the way
GPTQ quantizes on load.

Registration uses transformers' own `register_quantization_config` / `register_quantizer`. Those
live in `transformers.quantizers.auto`, which imports every quantization backend installed (torchao
prints warnings as it loads), and transformers imports it anyway before it loads any model. So
`import optimum_grape` does not import it: registration runs the moment transformers does (a
one-shot import hook, `_AfterImport`), or at once if transformers already has.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

logger = logging.getLogger("optimum_grape")
QUANTIZERS_MODULE = "transformers.quantizers.auto"


def register_with_transformers() -> None:
    """Make 'grape' known to transformers: now if it has loaded its quantizers, else when it does. Idempotent."""
    if QUANTIZERS_MODULE in sys.modules and hasattr(sys.modules[QUANTIZERS_MODULE], "register_quantizer"):
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(QUANTIZERS_MODULE, _register))


def _register() -> None:
    from transformers.quantizers import auto

    from .checkpoint.requantized import install
    from .config import GrapeConfig

    quantizer = grape_quantizer_class()
    for mapping, register, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.register_quantization_config,
                                    GrapeConfig),
                                   (auto.AUTO_QUANTIZER_MAPPING, auto.register_quantizer, quantizer)):
        if "grape" not in mapping:
            register("grape")(cls)  # the official hook; it refuses a second registration
        elif mapping["grape"] is not cls:  # this package reloaded: its new class replaces the stale one
            mapping["grape"] = cls
    install()  # per-layer counts that survive a later quantizer


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `callback` once module `name` has been imported, then removes itself."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenCall(spec.loader, self._fire)
                return spec
        return None

    def _fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()


class _ThenCall(importlib.abc.Loader):
    """A module's own loader, followed by a callback once the module has executed."""

    def __init__(self, loader, callback) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self.loader, name)


_QUANTIZER_CLASS = None


def grape_quantizer_class():
    """`GrapeHfQuantizer`, built on first use: subclassing transformers' HfQuantizer imports its quantizers."""
    global _QUANTIZER_CLASS
    if _QUANTIZER_CLASS is None:
        from transformers.quantizers.base import HfQuantizer

        from .config import GrapeConfig

        class GrapeHfQuantizer(HfQuantizer):
            requires_calibration = False

            def validate_environment(self, *args, **kwargs) -> None:
                self.quantization_config.validate()

            def _process_model_before_weight_loading(self, model, **kwargs):
                from .merging.apply import resize_to_layout

                layout = self.quantization_config.pruned_layout
                if layout:
                    resize_to_layout(model, layout)
                return model

            def _process_model_after_weight_loading(self, model, **kwargs):
                # Pruning changes shapes, not number formats: transformers marks models loaded through a
                # quantizer as quantized, which forbids .half()/.float() and plain fine-tuning. Undo that.
                model.is_quantized = False
                if self.quantization_config.pruned_layout:
                    return model
                from transformers import AutoTokenizer

                from .pruner import GrapePruner

                config = self.quantization_config
                source = getattr(model, "name_or_path", None) or model.config._name_or_path
                tokenizer = AutoTokenizer.from_pretrained(source) if source else None
                pruner = GrapePruner(GrapeConfig.from_dict({**config.to_dict(), "pruned_layout": None}))
                pruner.prune(model, None, tokenizer)
                config.pruned_layout = model.config.quantization_config.pruned_layout
                model.config.quantization_config = config
                model.grape_plan = pruner.last_plan
                return model

            def is_serializable(self, safe_serialization=None) -> bool:
                return True

            @property
            def is_trainable(self) -> bool:
                return True

            @property
            def is_qat_trainable(self) -> bool:
                return True

        GrapeHfQuantizer.__module__ = __name__
        GrapeHfQuantizer.__qualname__ = "GrapeHfQuantizer"
        _QUANTIZER_CLASS = GrapeHfQuantizer
    return _QUANTIZER_CLASS


def __getattr__(name: str):
    if name == "GrapeHfQuantizer":
        return grape_quantizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
