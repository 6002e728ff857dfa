"""Qwen2.5-VL (``transformers`` 5.x): visual tokens, 3-D M-RoPE positions, labels.

Nothing here copies a ``transformers`` forward. Three instance-level wrappers do the
work, each around the original bound method:

* ``Qwen2_5_VLModel.forward``: remembers ``input_ids`` for the call (the language
  model only receives embeddings) and checks images against their placeholders.
* ``Qwen2_5_VLTextModel.forward``: receives the full sequence with the visual
  features already scattered in and the full 3-D positions computed by
  ``get_rope_index``; keeps the selected tokens with their original positions (hard
  mode) or scales visual tokens by the soft mask (training), and translates masks of
  decoding steps to the compacted cache.
* ``Qwen2_5_VLForConditionalGeneration.forward``: computes the loss on the labels of
  the kept tokens, plus the weighted selection loss in soft mode.
"""

from __future__ import annotations

import functools

import torch

from .base import (
    AttachedState,
    HardSelection,
    ModelAdapter,
    SelectionRecord,
    SoftSelection,
    decode_attention_mask,
    remember_prefill,
    replace_forward,
    replace_method,
    select_tokens,
)
from ..ops.sequence import gather_sequence
from .layer_pruning import LayerPruning, install_layer_pruning

__all__ = ["Qwen2_5_VLAdapter"]

_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


class Qwen2_5_VLAdapter(ModelAdapter):
    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    @classmethod
    def _classes(cls):
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

        return modeling.Qwen2_5_VLForConditionalGeneration, modeling.Qwen2_5_VLModel

    @classmethod
    def supports(cls, model) -> bool:
        return isinstance(model, cls._classes())

    @classmethod
    def core(cls, model):
        generation_class, _ = cls._classes()
        return model.model if isinstance(model, generation_class) else model

    @classmethod
    def hidden_size(cls, model) -> int:
        return int(model.config.text_config.hidden_size)

    @classmethod
    def patch(cls, model, state: AttachedState) -> None:
        core = cls.core(model)
        config = model.config
        visual_token_ids = (int(config.image_token_id), int(config.video_token_id))
        merge_unit = int(config.vision_config.spatial_merge_size) ** 2

        core_forward = core.forward
        language_forward = core.language_model.forward

        @functools.wraps(core_forward)
        def model_forward(input_ids=None, *args, **kwargs):
            if input_ids is None and any(kwargs.get(name) is not None for name in _VISUAL_INPUTS):
                raise ValueError(
                    "visual token selection needs input_ids to locate the image/video placeholder tokens; "
                    "pass input_ids rather than inputs_embeds"
                )
            if input_ids is not None:
                _check_placeholders(input_ids, kwargs, visual_token_ids, merge_unit)
            state.current_input_ids = input_ids
            try:
                return core_forward(input_ids, *args, **kwargs)
            finally:
                state.current_input_ids = None

        @functools.wraps(language_forward)
        def text_model_forward(
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            inputs_embeds=None,
            use_cache=None,
            **kwargs,
        ):
            call = functools.partial(language_forward, input_ids=input_ids, past_key_values=past_key_values,
                                     use_cache=use_cache, **kwargs)
            token_ids = state.current_input_ids
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            memory = state.prefill
            if past_length > 0 and memory is not None and memory.cache() is past_key_values:
                query_length = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
                if token_ids is not None and _visual_mask(token_ids, visual_token_ids).any():
                    raise NotImplementedError("adding images to a cache whose visual tokens were pruned is not supported")
                positions = _three_d_positions(position_ids, memory.full_length + memory.appended(past_length),
                                               query_length, inputs_embeds)
                mask = decode_attention_mask(state, attention_mask, past_length, query_length)
                if memory.first_pruned_layer == 0:
                    return call(attention_mask=mask, position_ids=positions, inputs_embeds=inputs_embeds)
                # Pruned inside the LLM: early layers keep the full mask, later ones get the compacted one.
                context = LayerPruning(prefill=False, active=True)
                context.mask = create_mask(inputs_embeds, mask, past_key_values, memory.first_pruned_layer)
                state.layer_pruning = context
                try:
                    return call(attention_mask=attention_mask, position_ids=positions, inputs_embeds=inputs_embeds)
                finally:
                    state.layer_pruning = None

            if token_ids is None or inputs_embeds is None or token_ids.shape != inputs_embeds.shape[:2]:
                return call(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
            visual_mask = _visual_mask(token_ids, visual_token_ids)
            if past_length > 0:
                if bool(visual_mask.any()):
                    raise NotImplementedError(
                        "visual token selection needs the images in the first forward of a cache (prefill)"
                    )
                return call(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
            if attention_mask is not None and not (torch.is_tensor(attention_mask) and attention_mask.ndim == 2):
                raise NotImplementedError("visual token selection needs a 2-D attention mask (or none) at prefill")

            batch, length = token_ids.shape
            token_valid = (attention_mask.bool() if attention_mask is not None
                           else torch.ones(batch, length, dtype=torch.bool, device=token_ids.device))
            visual_mask = visual_mask & token_valid
            state.prefill = None
            if not bool(visual_mask.any()):
                state.last = state.call_record = SelectionRecord(
                    [visual_mask.new_zeros(0, dtype=torch.long)] * batch, visual_mask.sum(1), state.resolved_mode())
                return call(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
            right_padded = attention_mask is not None and bool((~token_valid[:, -1]).any())
            prune_layer = state.method.prune_layer
            if prune_layer is not None and state.retention < 1.0:
                context = LayerPruning(prefill=True, visual_mask=visual_mask, token_valid=token_valid,
                                       pad_left=not right_padded)
                state.layer_pruning = context
                try:
                    outputs = call(attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds)
                finally:
                    state.layer_pruning = None
                remember_prefill(state, context.cache, length, context.compact_valid, prune_layer + 1)
                return outputs

            positions = _three_d_positions(position_ids, 0, length, inputs_embeds)
            selection = select_tokens(
                state, inputs_embeds, visual_mask, token_valid, pad_left=not right_padded,
                extras={
                    "segments": lambda: _visual_segments(token_ids, visual_mask, positions, position_ids is not None),
                    "encoder_attention": lambda: _take_encoder_attention(state, token_ids, visual_token_ids),
                },
            )
            state.call_record = state.last
            if selection is None:
                return call(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
            if isinstance(selection, SoftSelection):
                scaled = inputs_embeds * selection.scale.unsqueeze(-1)
                return call(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=scaled)

            assert isinstance(selection, HardSelection)
            compact_positions = gather_sequence(positions, selection.index, seq_dim=2)
            compact_embeds = gather_sequence(selection.embeds, selection.index)
            all_valid = bool(selection.valid.all())
            compact_mask = None if all_valid else selection.valid.to(
                attention_mask.dtype if attention_mask is not None else torch.long)
            outputs = call(attention_mask=compact_mask, position_ids=compact_positions, inputs_embeds=compact_embeds)
            remember_prefill(state, getattr(outputs, "past_key_values", None), length, selection.valid)
            return outputs

        def create_mask(embeds, mask_2d, cache, layer_idx):
            from transformers.masking_utils import create_causal_mask

            return create_causal_mask(config=core.language_model.config, inputs_embeds=embeds,
                                      attention_mask=mask_2d, past_key_values=cache, layer_idx=layer_idx)

        replace_forward(core, model_forward, state)
        replace_forward(core.language_model, text_model_forward, state)

        generation_class, _ = cls._classes()
        if isinstance(model, generation_class):
            replace_forward(model, _labelled_forward(model, state), state)
        if "encoder_attention" in state.method.needs:
            _install_encoder_attention_probe(core, state)
        if state.method.prune_layer is not None:
            install_layer_pruning(core.language_model, state, create_mask)


def _visual_mask(token_ids: torch.Tensor, visual_token_ids: tuple[int, int]) -> torch.Tensor:
    return (token_ids == visual_token_ids[0]) | (token_ids == visual_token_ids[1])


def _visual_segments(token_ids, visual_mask, positions, have_positions: bool):
    """Each sample's visual blocks as ``(frames, height, width)`` token grids, in sequence order.

    Read off the 3-D M-RoPE positions, which hold the layout whatever path built the
    inputs (``generate`` encodes images before the forward and passes no grids): a
    block's first token sets ``(t0, h0, w0)``; a row is the tokens at ``h0 + r``, a frame
    restarts at ``(h0, w0)`` with a later time, and the next block starts elsewhere.
    """
    if not have_positions:
        raise ValueError("this method needs the 3-D positions of the visual tokens; pass mm_token_type_ids "
                         "(the processor returns it) so that the model can compute them")
    layout = []
    for row_ids, row_mask, row_t, row_h, row_w in zip(token_ids.tolist(), visual_mask.tolist(),
                                                     *(p.tolist() for p in positions)):
        blocks, start, length = [], 0, len(row_ids)
        while start < length:
            if not row_mask[start]:
                start += 1
                continue
            end = start
            while end < length and row_mask[end] and row_ids[end] == row_ids[start]:
                end += 1
            while start < end:  # one run of placeholders may hold several blocks
                h0, w0 = row_h[start], row_w[start]
                width = 1
                while start + width < end and row_h[start + width] == h0 and row_w[start + width] == w0 + width:
                    width += 1
                height = 1
                while (start + height * width < end and row_h[start + height * width] == h0 + height
                       and row_w[start + height * width] == w0):
                    height += 1
                frames, size = 1, height * width
                while (start + frames * size < end and row_h[start + frames * size] == h0
                       and row_w[start + frames * size] == w0
                       and row_t[start + frames * size] >= row_t[start + (frames - 1) * size]):
                    frames += 1
                blocks.append((frames, height, width))
                start += frames * size
        layout.append(blocks)
    return layout


def _install_encoder_attention_probe(core, state: AttachedState) -> None:
    """Record, per merged visual token, the attention it receives in the vision encoder's
    last full-attention block (mean over heads and queries of its image, then over the
    patches merged into it). Only these scores are computed, in chunks of queries; the
    encoder itself keeps running on whatever attention implementation it uses.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = core.visual
    if not getattr(visual, "fullatt_block_indexes", None):
        raise ValueError("this vision encoder has no full-attention block to read attention from")
    attention = visual.blocks[visual.fullatt_block_indexes[-1]].attn
    merge_unit = visual.spatial_merge_unit
    probe: dict = {}

    def permute(input_tensor, window_index, seq_len):
        probe["window_index"] = window_index
        return original_permute(input_tensor, window_index, seq_len=seq_len)

    def before_attention(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            length = hidden.shape[0]
            query, key, _ = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
            probe["received"] = _attention_received(query, key, cu_seqlens, module.scaling)

    def after_encoder(module, args, output):
        received, window_index = probe.pop("received", None), probe.pop("window_index", None)
        if received is None or window_index is None:
            raise RuntimeError("the vision encoder ran without the attention probe seeing its full-attention block")
        merged = received.view(-1, merge_unit).mean(1)
        probe["result"] = merged[torch.argsort(window_index)]

    def features_with_attention(modality, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            outputs = original(*args, **kwargs)
            result = probe.pop("result", None)
            if result is not None:
                state.encoder_attention[modality] = result
            return outputs

        return wrapper

    original_permute = visual.permute_input_for_window_attn
    replace_method(visual, "permute_input_for_window_attn", permute, state)
    for modality in ("image", "video"):
        name = f"get_{modality}_features"
        replace_method(core, name, features_with_attention(modality, getattr(core, name)), state)
    for handle in (attention.register_forward_pre_hook(before_attention, with_kwargs=True),
                   visual.register_forward_hook(after_encoder)):
        state.restore.append(handle.remove)


def _attention_received(query, key, cu_seqlens, scaling, chunk: int = 512) -> torch.Tensor:
    """Mean attention each token receives within its image: ``query``/``key`` ``[S, H, d]`` -> ``[S]``."""
    received = torch.zeros(query.shape[0], dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = key[start:end].transpose(0, 1).float()  # [H, n, d]
        total = torch.zeros(end - start, dtype=torch.float32, device=query.device)
        for first in range(start, end, chunk):
            queries = query[first:min(first + chunk, end)].transpose(0, 1).float()
            total += torch.softmax(queries @ keys.transpose(1, 2) * scaling, dim=-1).sum((0, 1))
        received[start:end] = total / (query.shape[1] * (end - start))
    return received


def _take_encoder_attention(state: AttachedState, token_ids, visual_token_ids) -> torch.Tensor:
    """The recorded attention, placed at the image and video tokens of the sequence ``[B, L]``."""
    recorded, state.encoder_attention = state.encoder_attention, {}
    scores = torch.zeros(token_ids.shape, dtype=torch.float32, device=token_ids.device)
    for modality, token_id in zip(("image", "video"), visual_token_ids):
        mask = token_ids == token_id
        count = int(mask.sum())
        if count == 0:
            continue
        values = recorded.get(modality)
        if values is None or values.numel() != count:
            found = "none" if values is None else values.numel()
            raise RuntimeError(
                f"encoder attention was recorded for {found} {modality} tokens but the batch has {count}; "
                "it is recorded when the model encodes pixels (pixel_values / pixel_values_videos), "
                "not for precomputed or expanded encoder outputs"
            )
        scores[mask] = values.to(scores.device)
    return scores


def _three_d_positions(position_ids, start: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions ``[3, B, length]`` as the text model would use them.

    ``generate`` passes ``[4, B, L]`` (a text row, then temporal/height/width); plain
    calls pass ``[3, B, L]``, ``[B, L]`` or nothing, in which case the text model counts
    from the number of tokens already seen, here the *uncompressed* count ``start``.
    The text row is dropped: it only serves to detect packed sequences, and compacted
    positions are not contiguous.
    """
    if position_ids is None:
        positions = torch.arange(start, start + length, device=like.device)
        return positions.view(1, 1, -1).expand(3, like.shape[0], -1)
    if position_ids.ndim == 2:
        return position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


def _check_placeholders(input_ids, kwargs, visual_token_ids, merge_unit) -> None:
    """Fail clearly when the number of placeholders differs from what the grids produce."""
    for name, token_id, grid_name, what in (
        ("pixel_values", visual_token_ids[0], "image_grid_thw", "image"),
        ("pixel_values_videos", visual_token_ids[1], "video_grid_thw", "video"),
    ):
        if kwargs.get(name) is None:
            continue
        grid = kwargs.get(grid_name)
        if grid is None:
            raise ValueError(f"{name} given without {grid_name}; the processor returns both")
        expected = int(grid.prod(-1).sum()) // merge_unit
        found = int((input_ids == token_id).sum())
        if expected != found:
            raise ValueError(
                f"{what} placeholder mismatch: input_ids hold {found} {what} tokens (id {token_id}) but "
                f"{grid_name} describes {expected} merged patches; build inputs with the model's processor"
            )


def _labelled_forward(model, state: AttachedState):
    """Outer forward: loss on the labels of the kept tokens, plus the selection loss."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, labels=None, return_dict=None, **kwargs):
        if len(args) > 5:
            raise TypeError("pass labels and later arguments by keyword to a model with a visual token selector")
        state.call_record = None
        try:
            outputs = original(*args, return_dict=True, **kwargs)
            record = state.call_record
        finally:
            state.call_record = None
        if labels is not None:
            if record is not None and record.token_index is not None:
                labels = gather_sequence(labels.to(record.token_index.device), record.token_index)
                labels = labels.masked_fill(~record.token_valid, -100)
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
