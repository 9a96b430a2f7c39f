"""A model whose weights stay on disk until asked for: the skeleton on the meta device, and loading
one part of it (the embeddings and head, or one decoder layer) from the safetensors shards.

Built as `from_pretrained` builds a model (same class, config and dtype, buffers such as rotary
frequencies computed for real), and loaded through transformers' own key conversion
(`convert_and_load_state_dict_in_model`), so a materialised part holds exactly the tensors
`from_pretrained` would give it. `release` moves a part back to the meta device, freeing its memory.
With a `LayerScratch`, a decoder layer is converted on its first load only and read back from the
scratch copy afterwards.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import UnsupportedModelError, remote_code_hint
from ..adapters.alignment import SOURCE_ATTRIBUTE
from ..calibration.stream import decoder_layers
from ..runtime.memory import return_free_memory
from .checkpoint_index import CheckpointIndex
from .scratch import LayerScratch

logger = logging.getLogger("optimum_grape")
REST = None  # the group of everything outside the decoder layers


def _quiet_loading():
    """transformers' loading progress bar, once per part, would flood the log."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _apply_pruned_layout(model, config) -> None:
    """A checkpoint optimum-grape pruned keeps its own count per layer: shape the empty model to it,
    as the 'grape' quantizer does when transformers loads the checkpoint whole."""
    from ..merging.apply import resize_to_layout

    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if isinstance(quant, dict) and quant.get("quant_method") == "grape" and quant.get("pruned_layout"):
        resize_to_layout(model, quant["pruned_layout"])


class Skeleton:
    """The meta-device model of a checkpoint folder and its parts, loadable one at a time."""

    def __init__(self, folder, trust_remote_code: bool = False, model_class=None, scratch_beside=None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.folder = folder
        self.index = CheckpointIndex(folder)
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            hint = "" if trust_remote_code else remote_code_hint(str(err))
            raise UnsupportedModelError(f"Cannot read the config of {str(folder)!r} ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0] if str(err) else ''}).{hint}") from None
        dtype = getattr(config, "dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype or self.index.first_float_dtype() or torch.float32
        cls = model_class or _architecture_class(config)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) computed for real
            if cls is None:
                self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype,
                                                              trust_remote_code=trust_remote_code)
            else:
                self.model = cls._from_config(config, dtype=self.dtype)
        self.model.eval()
        _apply_pruned_layout(self.model, config)
        if self.model.can_generate():  # as from_pretrained reads it
            from transformers import GenerationConfig

            try:
                self.model.generation_config = GenerationConfig.from_pretrained(folder)
            except OSError:
                pass  # no generation_config.json: the one derived from the config stays
        self.model.config.name_or_path = str(folder)
        self.model.name_or_path = str(folder)
        self.mapping = get_model_conversion_mapping(self.model, None, None)
        self._used: dict[int, object] = {}  # conversions used by any load: what saving must revert
        meta_state = self.model.state_dict()
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        prefix = self.model.base_model_prefix

        def target_of(key: str) -> str:
            return rename_source_key(key, renamings, converters, prefix, meta_state)[0]

        self._target_of = target_of
        self.layers_path, self.layers = decoder_layers(self.model)
        self.groups = self.index.group_by_layer(target_of, self.layers_path)
        missing = [i for i in range(len(self.layers)) if i not in self.groups]
        if missing:
            raise UnsupportedModelError(f"No weights for decoder layers {missing} were found in {folder}: is the "
                                        "checkpoint complete?")
        _quiet_loading()
        # Converted layers kept between loads beside the output `scratch_beside` where its disk has room
        # (made last: a checkpoint refused above leaves no folder); None: every load converts again.
        self.scratch = LayerScratch.if_room(scratch_beside, self.index.size_bytes()) if scratch_beside else None

    # -- loading and freeing --------------------------------------------------------------------
    def load(self, group: int | None) -> None:
        """Materialise decoder layer `group` (or REST: everything else) from the checkpoint, or from the
        scratch copy of its first load."""
        if group is REST or self.scratch is None or not self.scratch.restore(group, self.layers[group]):
            self._convert(group)
            if group is not REST and self.scratch is not None:
                self.scratch.store(group, self.layers[group])
        module = self.part(group)
        for name, param in self._own_parameters(module, group):  # lets planning reuse neuron matches
            setattr(param, SOURCE_ATTRIBUTE, (str(self.folder), group, name))

    def _convert(self, group: int | None) -> None:
        """Load a part through transformers' key conversion, as `from_pretrained` would."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        # One conversion at a time, largest first: fusing every expert's tensors into one holds the
        # sources and the fused result together, so it runs while the least else of the part is loaded.
        by_target: dict[str, list[str]] = {}
        for key in self.groups.get(group, []):
            by_target.setdefault(self._target_of(key), []).append(key)
        mismatched = []
        for keys in sorted(by_target.values(), key=lambda ks: -sum(self.index.nbytes(k) for k in ks)):
            state = {key: self.index.read(key) for key in keys}
            mapping = copy.deepcopy(self.mapping)
            config = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self.model._get_dtype_plan(self.dtype),
                                         weight_mapping=mapping)
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
            mismatched += sorted(map(str, getattr(info, "mismatched_keys", ()) or ()))
            del state
            for original, used in zip(self.mapping, mapping):
                if used.was_used():
                    self._used[id(original)] = original
        if group is REST:
            self.model.tie_weights()
        return_free_memory()  # the checkpoint's per-expert tensors, stacked into fused ones and freed
        module = self.part(group)
        still = [n for n, p in self._own_parameters(module, group) if p.is_meta]
        if still and mismatched:
            raise UnsupportedModelError(
                f"The weights of {'the non-layer part' if group is REST else f'decoder layer {group}'} in {self.folder} "
                f"do not fit its config.json (shape mismatch, e.g. {mismatched[0]}): restore the config (an edited "
                "expert count?) or the weights.")
        if still:
            raise UnsupportedModelError(
                f"After loading {'the non-layer weights' if group is REST else f'decoder layer {group}'} from "
                f"{self.folder}, {len(still)} parameter(s) are still missing, e.g. {still[:3]}: the checkpoint does "
                "not hold them under names transformers converts for this model class.")

    def release(self, group: int | None) -> None:
        """Free a part: its parameters go back to the meta device (buffers are small and stay)."""
        if self.scratch is not None:
            self.scratch.settle()  # the part's scratch copy is written from its memory: finish it first
        module = self.part(group)
        own = {id(p) for _, p in self._own_parameters(module, group)}
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and id(param) in own and not param.is_meta:
                    owner._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                           requires_grad=param.requires_grad)
        return_free_memory()

    def close(self) -> None:
        """Delete the scratch copies (the scratch folder also goes at interpreter exit)."""
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None

    def part(self, group: int | None) -> nn.Module:
        return self.model if group is REST else self.layers[group]

    def _own_parameters(self, module: nn.Module, group):
        if group is not REST:
            return list(module.named_parameters())
        inside = {id(p) for layer in self.layers for p in layer.parameters()}
        return [(n, p) for n, p in module.named_parameters() if id(p) not in inside]

    def used_conversions(self) -> list:
        """The checkpoint's key conversions that loading applied, in transformers' order (for saving)."""
        return [m for m in self.mapping if id(m) in self._used]

    def size_bytes(self) -> int:
        return self.index.size_bytes()


def _architecture_class(config):
    """The class the checkpoint was saved from (`config.architectures`), when transformers has it: a
    multimodal `...ForConditionalGeneration` is not an AutoModelForCausalLM. None: use the auto class."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None
