"""The generic placeholder adapter: written once, specialised by one short file per family.

Three instance-level wrappers, each around the original bound method (no forward is
copied and no module of ``transformers`` is patched):

* the multimodal core's ``forward``: remembers ``input_ids`` and the visual inputs of the
  call (the text model only receives embeddings), checks them, and numbers decoding
  steps the way the uncompressed model would when the caller passes no positions;
* the text model's ``forward``: receives the full sequence with the visual features in
  place; finds the visual tokens by their placeholder ids, selects, and applies one
  :class:`~visionselector.adapters.compaction.Compaction` to embeddings, positions, mask
  and the family's per-token extras (hard mode), or scales the visual tokens by the soft
  mask (training); remembers the prefill and translates masks and positions of later
  decoding steps to the compacted cache;
* the generation model's ``forward``: the loss on the labels of the kept tokens, plus the
  weighted selection loss in soft mode.

A family file subclasses :class:`ModelAdapter` and supplies hooks: its classes, where
the vision tower and text model are, the placeholder ids, the position strategy, how
images are encoded, per-token extras, the query/key projection that in-LLM methods
read and the encoder-attention probe.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import ClassVar

import torch

from ..ops.merge import additive_mask
from .base import (
    AttachedState,
    HardSelection,
    SelectionRecord,
    SoftSelection,
    CACHE_NAMES,
    cache_keyword,
    cache_length,
    check_weighted_attention,
    decode_attention_mask,
    forget_prefill,
    gather_prompt,
    joined_key_bias,
    given_cache,
    output_cache,
    pruned_prompt,
    remember_prefill,
    replace_forward,
    replace_method,
    select_tokens,
    weighted_decoding_mask,
)
from .compaction import Compaction
from .layer_pruning import LayerPruning, install_layer_pruning, layer_type, standard_query_key
from .positions import MRoPEPositions, PositionStrategy

__all__ = ["ModelAdapter", "UncompressedLength"]


class UncompressedLength:
    """Stands in for a pruned cache where a model asks only for its length, so that it numbers
    the next tokens as if the cache held the whole prompt."""

    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class ModelAdapter:
    """A model family, as hooks around the generic select-and-compact machinery."""

    family: ClassVar[str] = ""  # the config.model_type this adapter serves
    class_names: ClassVar[tuple[str, ...]] = ()  # (generation class, core class)
    module: ClassVar[str] = ""  # transformers.models.<module>.modeling_<module>
    positions: ClassVar[PositionStrategy] = MRoPEPositions()
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

    # ---- hooks: where things are -------------------------------------------------------

    @classmethod
    def classes(cls) -> tuple[type, ...]:
        import importlib

        modeling = importlib.import_module(f"transformers.models.{cls.module}.modeling_{cls.module}")
        return tuple(getattr(modeling, name) for name in cls.class_names)

    @classmethod
    def supports(cls, model) -> bool:
        return isinstance(model, cls.classes())

    @classmethod
    def core(cls, model):
        """The multimodal model (vision tower, projector, text model) inside ``model``."""
        return model.model if isinstance(model, cls.classes()[0]) else model

    @classmethod
    def text_model(cls, core):
        return core.language_model

    @classmethod
    def vision_tower(cls, core):
        return core.visual

    @classmethod
    def hidden_size(cls, model) -> int:
        return int(model.config.text_config.hidden_size)

    @classmethod
    def placeholder_ids(cls, config) -> dict[str, int]:
        """Modality -> the token id that stands for each of its visual tokens in ``input_ids``."""
        return {"image": int(config.image_token_id), "video": int(config.video_token_id)}

    # ---- hooks: inputs and outputs of the vision side -----------------------------------

    @classmethod
    def check_inputs(cls, model, input_ids: torch.Tensor, inputs: dict) -> None:
        """Fail clearly when visual inputs do not fit the placeholders (optional)."""

    @classmethod
    def encode_images(cls, model, pixels: dict) -> list:
        """The vision side's output for each image of ``pixels`` (the image processor's output)."""
        raise NotImplementedError(f"{cls.family}: encoding images on their own is not supported")

    @classmethod
    def image_grid(cls, model, batch: dict) -> tuple[int, int]:
        """``(rows, columns)`` of the visual tokens of a one-image batch, row-major (for pictures)."""
        raise ValueError(f"the {cls.family} adapter cannot lay an image's tokens on one grid")

    @classmethod
    def run_vision(cls, model, batch: dict) -> None:
        """Run the vision side on a batch's visual inputs and drop the result (benchmarks time it)."""
        raise NotImplementedError(f"{cls.family}: running the vision side on its own is not supported")

    @classmethod
    def token_count(cls, encoded) -> int:
        """Visual tokens of one item of :meth:`encode_images`."""
        return len(encoded)

    @classmethod
    def encoder_outputs(cls, encoded: list) -> dict:
        """The ``mm_encoder_outputs`` model argument for items of :meth:`encode_images`."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(encoded))}

    reads_encoder_attention: ClassVar[bool] = False  # implements install_encoder_attention_probe
    images_encode_alone: ClassVar[bool] = True  # an image's features do not depend on the sample's other images
    # Some decoder layers carry a recurrent state through every token (linear attention), so
    # padding inside a sequence is not neutral.
    recurrent_state: ClassVar[bool] = False
    lays_out_grids: ClassVar[bool] = False  # implements segments

    @classmethod
    def refusal(cls, method) -> str | None:
        """Why ``method`` (a selection method class or instance) cannot run on this family, or ``None``."""
        if "encoder_attention" in method.needs and not cls.reads_encoder_attention:
            return "it reads the vision encoder's attention, which this family's adapter does not record"
        if "segments" in method.needs and not cls.lays_out_grids:
            return "it needs the visual tokens laid out in grids, which this family's adapter cannot say"
        if getattr(method, "merges", False) and cls.recurrent_state:
            return ("it merges tokens and weighs attention to them with an additive mask, but this language model's "
                    "linear-attention layers have no attention logits to weigh; set merge=False")
        if "prompt" in method.needs and method.prune_layer is not None:
            return "it prunes inside the language model, where the prompt's hidden states, not its embeddings, are read"
        return None

    @classmethod
    def install_encoder_attention_probe(cls, core, state: AttachedState) -> None:
        raise ValueError(f"method {state.method_name!r} needs the vision encoder's attention, which the "
                         f"{cls.family} adapter does not read")

    # ---- hooks: per-token extras and signals --------------------------------------------

    @classmethod
    def compact_extras(cls, kwargs: dict, compaction: Compaction, visual_mask: torch.Tensor) -> dict:
        """Text-model keyword arguments that hold per-token tensors, restricted to the kept tokens."""
        return kwargs

    @classmethod
    def scale_extras(cls, kwargs: dict, scale: torch.Tensor, visual_mask: torch.Tensor) -> dict:
        """The same arguments in soft mode, each visual token's part scaled by ``scale`` ``[B, L]``."""
        return kwargs

    @classmethod
    def segments(cls, state: AttachedState, token_ids, visual_mask, positions, inputs: dict):
        """Each sample's visual blocks as ``(frames, height, width)`` token grids, in sequence order;
        ``positions`` are the full positions, ``None`` where the caller passed none."""
        raise ValueError(f"the {cls.family} adapter cannot lay out visual tokens in grids")

    query_key = staticmethod(standard_query_key)

    @classmethod
    def decoding_positions(cls, core, input_ids, inputs_embeds, kwargs: dict, uncompressed_past: int):
        """Positions the core would compute for a decoding step if its cache held the whole prompt;
        ``None`` where the core leaves positions to the text model."""
        return None

    # ---- the generic machinery ------------------------------------------------------------

    @classmethod
    def visual_mask(cls, model, token_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(token_ids, dtype=torch.bool)
        for token_id in cls.placeholder_ids(model.config).values():
            mask |= token_ids == token_id
        return mask

    @classmethod
    def patch(cls, model, state: AttachedState) -> None:
        reason = cls.refusal(state.method)
        if reason is not None:
            raise ValueError(f"method {state.method_name!r} cannot run on {cls.family} models: {reason}")
        core = cls.core(model)
        text_model = cls.text_model(core)
        check_weighted_attention(state, text_model)
        strategy = cls.positions
        core_forward, text_forward = core.forward, text_model.forward

        @functools.wraps(core_forward)
        def model_forward(input_ids=None, *args, **kwargs):
            inputs = {name: kwargs[name] for name in kwargs if kwargs[name] is not None and any(
                name.startswith(prefix) for prefix in ("pixel_values", "image_", "video_", "mm_", "batch_num"))}
            has_visual = any(_given(inputs.get(name)) for name in cls.visual_inputs)
            if input_ids is None and has_visual:
                raise ValueError("visual token selection needs input_ids to locate the image/video placeholder "
                                 "tokens; pass input_ids rather than inputs_embeds")
            if input_ids is not None:
                cls.check_inputs(model, input_ids, kwargs)
            cache = given_cache(kwargs)
            if cache_length(cache) == 0:
                state.last = None  # a new sequence: no earlier call's record may describe it
            memory = pruned_prompt(cache)
            if memory is not None:
                if kwargs.get("position_ids") is None:
                    tokens = kwargs.get("inputs_embeds")
                    # Only the shape [B, q, ...] and device of the embeddings are read.
                    tokens = tokens if tokens is not None else input_ids[..., None]
                    uncompressed = memory.uncompressed(cache_length(cache))
                    positions = cls.decoding_positions(core, input_ids, tokens, kwargs, uncompressed)
                    if positions is not None:
                        kwargs["position_ids"] = positions[..., -tokens.shape[1]:]
            state.current_input_ids = input_ids
            state.current_inputs = inputs
            try:
                return core_forward(input_ids, *args, **kwargs)
            finally:
                state.current_input_ids = None
                state.current_inputs = {}

        def create_masks(embeds, mask_2d, cache, layer_idx):
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
            masks = {}
            for index in range(layer_idx, len(text_model.layers)):
                kind = layer_type(text_model, index)
                if kind not in masks:
                    if kind not in builders:
                        raise ValueError(f"pruning inside the language model does not support {kind!r} layers")
                    masks[kind] = builders[kind](config=text_model.config, inputs_embeds=embeds,
                                                 attention_mask=mask_2d, layer_idx=index, **{mask_cache: cache})
            return masks

        @functools.wraps(text_forward)
        def text_model_forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                               use_cache=None, **kwargs):
            past_key_values = given_cache(kwargs)
            kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_NAMES}

            def call(mask, positions, embeds, **extra):
                return text_forward(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    inputs_embeds=embeds, use_cache=use_cache,
                                    **{text_cache: past_key_values, **kwargs, **extra})

            token_ids = state.current_input_ids
            past_length = cache_length(past_key_values)
            aligned = token_ids is not None and inputs_embeds is not None and token_ids.shape == inputs_embeds.shape[:2]
            if past_length > 0 and aligned and any(_given(state.current_inputs.get(name)) for name in cls.visual_inputs):
                visual_mask = cls.visual_mask(model, token_ids)
                if bool(visual_mask.any()):
                    return continue_with_images(call, token_ids, visual_mask, attention_mask, position_ids,
                                                past_key_values, inputs_embeds, kwargs)
            memory = pruned_prompt(past_key_values)
            if memory is not None:
                tokens = inputs_embeds if inputs_embeds is not None else input_ids
                batch, query_length = tokens.shape[:2]
                positions = strategy.continuing(position_ids, memory.uncompressed(past_length), query_length, batch,
                                                tokens.device)
                mask = decode_attention_mask(memory, attention_mask, past_length, query_length)
                if memory.key_bias is not None:  # the cache holds merged tokens, whatever is attached now
                    check_weighted_attention(state, text_model, weighted=True)
                    mask = weighted_decoding_mask(memory, mask, past_length, query_length, model_dtype(inputs_embeds))
                if memory.first_pruned_layer == 0:
                    return call(mask, positions, inputs_embeds)
                # Pruned inside the LLM: early layers keep the full mask, later ones get the compacted one.
                context = LayerPruning(prefill=False, active=True)
                context.masks = create_masks(inputs_embeds, mask, past_key_values, memory.first_pruned_layer)
                state.layer_pruning = context
                try:
                    return call(attention_mask, positions, inputs_embeds)
                finally:
                    state.layer_pruning = None

            if not aligned or past_length > 0:
                return call(attention_mask, position_ids, inputs_embeds)
            visual_mask = cls.visual_mask(model, token_ids)
            check_mask(attention_mask)

            batch, length = token_ids.shape
            token_valid = (attention_mask.bool() if attention_mask is not None
                           else torch.ones(batch, length, dtype=torch.bool, device=token_ids.device))
            visual_mask = visual_mask & token_valid
            forget_prefill(past_key_values)
            if not bool(visual_mask.any()):
                state.last = state.call_record = SelectionRecord(
                    [visual_mask.new_zeros(0, dtype=torch.long)] * batch, visual_mask.sum(1), state.resolved_mode())
                return call(attention_mask, position_ids, inputs_embeds)
            right_padded = attention_mask is not None and bool((~token_valid[:, -1]).any())
            prune_layer = state.method.prune_layer
            if prune_layer is not None and state.retention < 1.0:
                context = LayerPruning(prefill=True, visual_mask=visual_mask, token_valid=token_valid,
                                       pad_left=not right_padded)
                state.layer_pruning = context
                try:
                    outputs = call(attention_mask, position_ids, inputs_embeds)
                finally:
                    state.layer_pruning = None
                remember_prefill(context.cache, length, context.compaction.valid, prune_layer + 1)
                return outputs

            positions = strategy.full(position_ids, batch, length, inputs_embeds.device)
            inputs = state.current_inputs
            selection = select_tokens(
                state, inputs_embeds, visual_mask, token_valid, pad_left=not right_padded,
                extras={
                    "segments": lambda: cls.segments(state, token_ids, visual_mask,
                                                     None if position_ids is None else positions, inputs),
                    "encoder_attention": lambda: take_encoder_attention(cls, model, state, token_ids, inputs_embeds),
                    "prompt": lambda: prompt_of(state, inputs_embeds, token_valid & ~visual_mask),
                },
            )
            state.call_record = state.last
            if selection is None:
                return call(attention_mask, position_ids, inputs_embeds)
            if isinstance(selection, SoftSelection):
                extras = cls.scale_extras(kwargs, selection.scale, visual_mask)
                mask = attention_mask
                if selection.dropped is not None:  # dropped tokens stay in place, but nothing attends to them
                    mask = (token_valid & ~selection.dropped).to(attention_mask.dtype if attention_mask is not None
                                                                  else torch.long)
                return call(mask, position_ids, inputs_embeds * selection.scale.unsqueeze(-1), **extras)

            assert isinstance(selection, HardSelection)
            compaction = selection.compaction
            extras = cls.compact_extras(kwargs, compaction, visual_mask)
            embeds = compaction.apply(selection.embeds)
            if selection.key_bias is not None:
                check_weighted_attention(state, text_model)
                compact_mask = additive_mask(compaction.valid, selection.key_bias, compaction.compact_length,
                                             embeds.dtype)
            elif compaction.all_valid and not strategy.explicit_mask:
                compact_mask = None
            else:
                compact_mask = compaction.mask(attention_mask.dtype if attention_mask is not None else torch.long)
            outputs = call(compact_mask, strategy.compact(positions, compaction), embeds, **extras)
            remember_prefill(output_cache(outputs), length, compaction.valid, key_bias=selection.key_bias)
            return outputs

        def continue_with_images(call, token_ids, visual_mask, attention_mask, position_ids, cache, inputs_embeds,
                                 kwargs):
            """A forward that adds images to a conversation already in ``cache`` (a later turn): the new
            images' tokens compete for their own budget and the chunk is compacted behind the cache."""
            if state.method.prune_layer is not None and state.retention < 1.0:
                raise NotImplementedError(
                    f"method {state.method_name!r} prunes inside the language model, which needs the whole sequence "
                    "in one forward; adding images to a conversation that already has a cache works with the methods "
                    "that prune before the language model. Start a new cache with all the images instead")
            if state.resolved_mode() == "soft":
                raise NotImplementedError("soft selection (training) needs the images in the first forward of a "
                                          "cache; call model.eval() for hard selection")
            check_mask(attention_mask)
            past_length = cache_length(cache)
            memory = pruned_prompt(cache)
            batch, length = token_ids.shape
            device = inputs_embeds.device
            mask = attention_mask
            if memory is not None:
                mask = decode_attention_mask(memory, attention_mask, past_length, length)
            elif mask is not None and mask.shape[1] != past_length + length:
                raise ValueError(f"attention_mask has length {mask.shape[1]}; with {past_length} cached tokens and "
                                 f"{length} new ones it should have {past_length + length}")
            if mask is None:
                mask = torch.ones(batch, past_length + length, dtype=torch.long, device=device)
            mask = mask.to(device=device, dtype=torch.bool)
            prefix, token_valid = mask[:, :past_length], mask[:, past_length:]
            uncompressed = memory.uncompressed(past_length) if memory is not None else past_length
            positions = strategy.continuing(position_ids, uncompressed, length, batch, device)
            visual_mask = visual_mask & token_valid
            selection = select_tokens(
                state, inputs_embeds, visual_mask, token_valid, pad_left=True,
                extras={
                    "segments": lambda: cls.segments(state, token_ids, visual_mask, positions, state.current_inputs),
                    "encoder_attention": lambda: take_encoder_attention(cls, model, state, token_ids,
                                                                       inputs_embeds),
                    "prompt": lambda: prompt_of(state, inputs_embeds, token_valid & ~visual_mask),
                },
            )
            state.call_record = state.last
            chunk_bias = None
            if selection is None:  # retention 1: the new turn stays whole
                if memory is None:
                    return call(attention_mask, position_ids, inputs_embeds)
                compaction = Compaction.from_keep(torch.ones_like(token_valid), pad_left=True)
                embeds, extras, chunk_valid = inputs_embeds, {}, token_valid
            else:
                chunk_bias = selection.key_bias
                compaction = selection.compaction
                if cls.recurrent_state and not compaction.all_valid:
                    raise NotImplementedError(
                        f"the samples of this batch keep different numbers of their new visual tokens, and the "
                        f"{cls.family} language model carries a recurrent state through the padding that would "
                        "fill the gap; continue each conversation in its own call")
                embeds = compaction.apply(selection.embeds)
                extras, chunk_valid = cls.compact_extras(kwargs, compaction, visual_mask), compaction.valid
            compact_mask = torch.cat([prefix, chunk_valid], dim=1)
            key_bias = joined_key_bias(memory, past_length, chunk_bias, chunk_valid)
            mask = compact_mask.long()
            if key_bias is not None:
                check_weighted_attention(state, text_model, weighted=True)
                mask = additive_mask(compact_mask, key_bias, chunk_valid.shape[1], embeds.dtype)
            outputs = call(mask, strategy.compact(positions, compaction), embeds, **extras)
            remember_prefill(cache, uncompressed + length, compact_mask, key_bias=key_bias)
            return outputs

        from transformers.masking_utils import create_causal_mask

        text_cache, mask_cache = cache_keyword(text_forward), cache_keyword(create_causal_mask)
        replace_forward(core, model_forward, state)
        replace_forward(text_model, text_model_forward, state)
        generation_class = cls.classes()[0]
        if isinstance(model, generation_class):
            replace_forward(model, labelled_forward(model, state), state)
            install_generation_hooks(model, state)
        if "encoder_attention" in state.method.needs:
            cls.install_encoder_attention_probe(core, state)
        if state.method.prune_layer is not None:
            install_layer_pruning(text_model, state, create_masks, cls.query_key)


def model_dtype(inputs_embeds) -> torch.dtype:
    return inputs_embeds.dtype if inputs_embeds is not None else torch.get_default_dtype()


def install_generation_hooks(model, state: AttachedState) -> None:
    """Make ``generate`` read a pruned cache by the length it would have without pruning.

    ``generate`` continues a conversation from a returned cache by dropping as many leading
    ``input_ids`` as the cache holds, and numbers the new tokens from that length too. After
    pruning the cache holds fewer tokens than it stands for, so both hooks are given the
    uncompressed length.
    """
    prepare = model.prepare_inputs_for_generation

    @functools.wraps(prepare)
    def prepare_inputs_for_generation(input_ids, *args, next_sequence_length=None, is_first_iteration=False,
                                      **kwargs):
        cache = given_cache(kwargs)
        memory = pruned_prompt(cache)
        if memory is not None and is_first_iteration and next_sequence_length is not None:
            embeds = kwargs.get("inputs_embeds")
            total = (embeds if embeds is not None else input_ids).shape[1]
            stored = cache_length(cache)
            if next_sequence_length == total - stored:
                next_sequence_length = total - memory.uncompressed(stored)
        return prepare(input_ids, *args, next_sequence_length=next_sequence_length,
                       is_first_iteration=is_first_iteration, **kwargs)

    replace_method(model, "prepare_inputs_for_generation", prepare_inputs_for_generation, state)
    generate = model.generate

    @functools.wraps(generate)
    def checked_generate(*args, **kwargs):
        check_generation_options(model, state, kwargs)
        if state.resolved_mode() == "soft":
            warnings.warn(
                f"generating while method {state.method_name!r} is in training mode: selection is soft, so every "
                "visual token reaches the model (scaled by the soft mask) and last_selection reports all of them; "
                "call model.eval() for hard selection", stacklevel=2)
        output = generate(*args, **kwargs)
        inputs = next((kwargs[name] for name in ("input_ids", "inputs", "inputs_embeds")
                       if kwargs.get(name) is not None), args[0] if args else None)
        if inputs is not None and state.last is not None:
            state.last = state.last.per_sample(inputs.shape[0])
        return output

    replace_method(model, "generate", checked_generate, state)
    positions = getattr(model, "_prepare_position_ids_for_generation", None)
    if positions is None:
        return

    @functools.wraps(positions)
    def prepare_position_ids_for_generation(inputs_tensor, model_kwargs):
        cache = given_cache(model_kwargs)
        memory = pruned_prompt(cache)
        if memory is not None:
            stand_in = UncompressedLength(memory.uncompressed(cache_length(cache)))
            model_kwargs = {**model_kwargs, **{name: stand_in for name in CACHE_NAMES if name in model_kwargs}}
        return positions(inputs_tensor, model_kwargs)

    replace_method(model, "_prepare_position_ids_for_generation", prepare_position_ids_for_generation, state)


# Cache implementations that hold the uncompressed layout or build 4-D masks for it.
_DYNAMIC_CACHES = (None, "dynamic", "offloaded")


def check_generation_options(model, state: AttachedState, kwargs: dict) -> None:
    """Refuse, by name, the ``generate`` options that cannot run on a pruned prompt."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{name: value for name, value in kwargs.items() if hasattr(config, name)})
    cache = given_cache(kwargs)
    if kwargs.get("assistant_model") is not None or getattr(config, "prompt_lookup_num_tokens", None):
        raise ValueError("assisted decoding (assistant_model, prompt_lookup_num_tokens) is not supported with visual "
                         "token selection: it crops the cache by uncompressed lengths, and a pruned cache is shorter. "
                         "Use plain greedy or sampled decoding")
    if getattr(config, "cache_implementation", None) not in _DYNAMIC_CACHES or getattr(cache, "is_compileable", False):
        raise ValueError(f"cache_implementation={config.cache_implementation!r} (a static, compilable cache) is not "
                         "supported with visual token selection: its masks describe the uncompressed sequence. Use "
                         "the default dynamic cache")
    if getattr(config, "prefill_chunk_size", None):
        raise ValueError("prefill_chunk_size is not supported with visual token selection, which chooses among all "
                         "visual tokens of the prompt in one forward")
    if config.use_cache is False and state.method.prune_layer is not None and state.retention < 1.0:
        raise ValueError(f"use_cache=False is not supported with method {state.method_name!r}: it selects by the "
                         f"attention of the last token at decoder layer {state.method.prune_layer}, and without a "
                         "cache every step re-runs the prompt with the answer so far, so the selection would change "
                         "as the answer grows. Use the default use_cache=True")
    if config.use_cache is False and "prompt" in state.method.needs and state.retention < 1.0:
        raise ValueError(f"use_cache=False is not supported with method {state.method_name!r}: it selects by the "
                         "prompt's text, and without a cache every step re-runs the prompt with the answer so far, "
                         "so the selection would change as the answer grows. Use the default use_cache=True")


def _given(value) -> bool:
    """Whether a visual keyword argument carries anything (``generate`` passes ``mm_encoder_outputs={}``)."""
    if value is None:
        return False
    if isinstance(value, dict):
        return any(item is not None for item in value.values())
    return True


def check_mask(attention_mask) -> None:
    if attention_mask is not None and not (torch.is_tensor(attention_mask) and attention_mask.ndim == 2):
        raise NotImplementedError(
            "visual token selection needs a 2-D attention mask (or none) when it selects; a 4-D mask comes from a "
            "compiled or static cache (generate(cache_implementation='static')), which pruning does not support: "
            "use the default dynamic cache")


# Encodings whose attention is kept until a selection reads it; older ones are dropped, so that
# encoding many images without a forward (a feature cache) cannot grow the state without bound.
_RECORDED_ENCODINGS = 16


def record_encoder_attention(state: AttachedState, modality: str, output, attention: torch.Tensor) -> None:
    """Keep the attention ``[n]`` each visual token of one encoder call received, with the tokens' features
    (``output.pooler_output``), by which a later selection finds the attention of exactly its own tokens."""
    features = getattr(output, "pooler_output", None)
    if features is None:
        return
    if isinstance(features, (list, tuple)):
        features = torch.cat([item.reshape(-1, item.shape[-1]) for item in features])
    features = features.reshape(-1, features.shape[-1]).detach()
    if features.shape[0] != attention.numel():
        raise RuntimeError(f"the encoder attention probe saw {attention.numel()} {modality} tokens but the encoder "
                           f"returned {features.shape[0]}")
    entries = state.encoder_attention.setdefault(modality, [])
    entries.append((features, attention.detach().flatten()))
    del entries[:-_RECORDED_ENCODINGS]


def take_encoder_attention(adapter, model, state: AttachedState, token_ids, inputs_embeds) -> torch.Tensor:
    """The attention each visual token of the batch received in the vision encoder, ``[B, L]`` (0 at text).

    Each token's value is found by its features among the recorded encodings, so attention
    recorded for other images (stale, or precomputed ``mm_encoder_outputs``) is never used, and
    batches that ``generate`` expanded (beams, ``num_return_sequences``) find theirs.
    """
    recorded = state.encoder_attention
    scores = torch.zeros(token_ids.shape, dtype=torch.float32, device=token_ids.device)
    for modality, token_id in adapter.placeholder_ids(model.config).items():
        mask = token_ids == token_id
        if not bool(mask.any()):
            continue
        wanted = inputs_embeds[mask.to(inputs_embeds.device)].detach()
        scores[mask] = _attention_of(wanted, recorded.get(modality, []), modality).to(scores.device)
    return scores


def _attention_of(wanted: torch.Tensor, entries: list, modality: str) -> torch.Tensor:
    """The recorded attention of each row of ``wanted`` ``[c, D]``, looked up by its exact features."""
    hint = ("VisionZip reads the attention while the model encodes pixels: pass pixel_values / "
            "pixel_values_videos (not precomputed mm_encoder_outputs)")
    if not entries:
        raise RuntimeError(f"no encoder attention was recorded for the {modality} tokens of this batch; {hint}")
    last_features, last_attention = entries[-1]
    if last_features.shape == wanted.shape and torch.equal(last_features.to(wanted.device, wanted.dtype), wanted):
        return last_attention.to(wanted.device).float()  # the usual case: the batch's own encoding, as encoded
    features = torch.cat([f.to(device=wanted.device, dtype=wanted.dtype) for f, _ in entries])
    attention = torch.cat([a.to(wanted.device) for _, a in entries]).float()
    lookup = {key: index for index, key in enumerate(_row_keys(features))}
    found = [lookup.get(key) for key in _row_keys(wanted)]
    missing = sum(index is None for index in found)
    if missing:
        raise RuntimeError(f"the encoder attention recorded does not belong to {missing} of the {len(found)} "
                           f"{modality} tokens of this batch (it was recorded for other images); {hint}")
    return attention[torch.tensor(found, device=wanted.device)]


def _row_keys(rows: torch.Tensor) -> list[bytes]:
    raw = rows.contiguous().view(torch.uint8).cpu().numpy()
    return [row.tobytes() for row in raw]


def prompt_of(state: AttachedState, inputs_embeds: torch.Tensor, text_mask: torch.Tensor):
    """The prompt a question-aware method reads: the embeddings of the text tokens ``text_mask``
    ``[B, L]`` less the answer (tokens the running call's labels supervise). In soft mode
    (training) the labels are required, since the answer is then part of the input."""
    labels = state.current_labels
    if labels is None:
        if state.resolved_mode() == "soft":
            raise ValueError(f"method {state.method_name!r} reads the prompt; in soft mode (training) pass labels "
                             "to the forward (-100 except on the answer) so that the answer tokens in the input are "
                             "left out of what it reads")
    elif labels.shape != text_mask.shape:
        # The text model sees only the new tokens of a continued sequence; labels cover the whole call's input.
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the sequence the method reads has shape "
                         f"{tuple(text_mask.shape)}; give one label per input token")
    else:
        text_mask = text_mask & (labels.to(text_mask.device) == -100)
    return gather_prompt(inputs_embeds, text_mask)


def labelled_forward(model, state: AttachedState):
    """Outer forward: loss on the labels of the kept tokens, plus the selection loss."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, labels=None, return_dict=None, **kwargs):
        if len(args) > 5:
            raise TypeError("pass labels and later arguments by keyword to a model with a visual token selector")
        state.call_record = None
        state.current_labels = labels if torch.is_tensor(labels) else None
        try:
            outputs = original(*args, return_dict=True, **kwargs)
            record = state.call_record
        finally:
            state.call_record = None
            state.current_labels = None
        if labels is not None:
            if record is not None and record.compaction is not None:
                labels = record.compaction.apply_labels(labels.to(record.compaction.index.device))
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            language_loss = model.loss_function(
                logits=outputs.logits, labels=labels, vocab_size=model.config.text_config.vocab_size, **loss_kwargs
            )
            loss = language_loss
            state.last_losses = {"language": language_loss.detach()}
            if record is not None and record.selection_loss is not None:
                loss = loss + state.selection_loss_weight * record.selection_loss
                state.last_losses.update(selection=record.selection_loss.detach(),
                                         selection_weight=state.selection_loss_weight)
            fields = {key: value for key, value in outputs.items() if key != "loss"}
            outputs = type(outputs)(loss=loss, **fields)
        if return_dict is False:
            return outputs.to_tuple()
        return outputs

    return forward
