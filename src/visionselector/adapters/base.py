"""What every model family shares: the attached state and the select-and-compact step.

An adapter (one file per family) finds the visual tokens of a sequence and knows how
the family computes positions; this module takes the visual mask, asks the selection
method which tokens to keep, and builds the shorter sequence, or in soft mode scales
the visual tokens by the differentiable mask. It never knows which method chose.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..methods.base import SelectionMethod, VisualTokens
from ..ops.merge import additive_mask, size_bias
from ..ops.sequence import compact_index, gather_sequence
from ..ops.topk import hard_topk, soft_topk, token_budget
from .compaction import Compaction

__all__ = ["AttachedState", "SelectionRecord", "PrefillMemory", "pruned_prompt", "VisualBatch", "choose", "select_tokens"]

MODES = ("auto", "hard", "soft")


@dataclass
class SelectionRecord:
    """What the last forward kept.

    ``kept[b]`` indexes sample ``b``'s visual tokens (every placeholder token of the
    sample, in sequence order) in their original order. ``compaction`` (hard selection
    that shortened the sequence) maps each slot of the compacted sequence to its position
    in the input sequence. ``soft_mask`` (soft selection) is the differentiable mask
    ``[B, N_max]``.
    """

    kept: list[torch.Tensor]
    visual_counts: torch.Tensor
    mode: str
    compaction: Compaction | None = None
    soft_mask: torch.Tensor | None = None
    selection_loss: torch.Tensor | None = None

    def per_sample(self, samples: int) -> "SelectionRecord":
        """This record for ``samples`` inputs whose rows ``generate`` repeated (beams,
        ``num_return_sequences``): one entry per input. Each sample's copies chose alike."""
        rows = len(self.kept)
        if rows == samples or samples == 0 or rows % samples:
            return self
        copies = rows // samples
        for row in range(rows):
            first = row - row % copies
            if not torch.equal(self.kept[row], self.kept[first]):
                return self
        return SelectionRecord(self.kept[::copies], self.visual_counts[::copies], self.mode,
                               soft_mask=None if self.soft_mask is None else self.soft_mask[::copies])

    @property
    def token_index(self) -> torch.Tensor | None:
        return None if self.compaction is None else self.compaction.index

    @property
    def token_valid(self) -> torch.Tensor | None:
        return None if self.compaction is None else self.compaction.valid


@dataclass
class PrefillMemory:
    """What decoding steps need to translate full-length masks to the compacted cache.

    It lives on the cache object itself (:func:`remember_prefill`), so that it follows the
    cache wherever the cache goes: a copy (``copy.deepcopy(prompt_cache)``, to branch a
    conversation) carries it, and a cache the model never pruned has none.
    """

    full_length: int
    compact_length: int
    compact_mask: torch.Tensor  # BoolTensor[B, compact_length]
    # Decoder layers before this one keep the full sequence in the cache (0: all are compacted).
    first_pruned_layer: int = 0
    # [B, compact_length]: what every later query adds to its attention logit for each cached
    # prompt token (log of the tokens a merged token stands for), or None: no weighting.
    key_bias: torch.Tensor | None = None

    def appended(self, past_length: int) -> int:
        """Tokens added after the prompt, given the cache length of layer 0."""
        return past_length - (self.compact_length if self.first_pruned_layer == 0 else self.full_length)

    def uncompressed(self, past_length: int) -> int:
        """How many tokens the cache would hold without pruning, given the cache length of layer 0."""
        return self.full_length + self.appended(past_length)


@dataclass
class AttachedState:
    """Everything ``attach`` puts on a model instance."""

    adapter: Any
    method: SelectionMethod
    method_name: str
    retention: float
    mode: str = "auto"
    selection_loss_weight: float = 1.0
    training_retention: float | None = None
    # "soft": in training every visual token reaches the model scaled by its soft mask (the paper's);
    # "hard": only the top-k do, as at inference, and the gradient reaches the scores through the
    # soft mask of the kept ones (straight-through)
    training_forward: str = "soft"
    last: SelectionRecord | None = None
    call_record: SelectionRecord | None = None
    last_losses: dict = field(default_factory=dict)
    restore: list = field(default_factory=list)  # callables that undo each patch, in order of patching
    patched: list = field(default_factory=list)  # the modules whose instance attributes were replaced
    # modality -> recent encodings as (features [n, D], attention each token received [n])
    encoder_attention: dict = field(default_factory=dict)
    layer_pruning: Any = None  # the per-call context of pruning inside the language model
    current_input_ids: torch.Tensor | None = None
    current_inputs: dict = field(default_factory=dict)  # the visual keyword arguments of the running call
    current_labels: torch.Tensor | None = None  # the running call's labels: the answer a prompt must not show

    def patched_modules(self, model) -> list:
        """The model and every module whose methods were replaced on the instance."""
        return [model, *self.patched]

    def resolved_mode(self) -> str:
        if self.mode == "auto":
            return "soft" if (self.method.trainable and self.method.training) else "hard"
        return self.mode


@dataclass
class VisualBatch:
    """The visual tokens of a batch, gathered out of the full sequence.

    ``positions`` ``[B, N_max]`` are sequence positions of the visual tokens (0 in
    padding slots), ``valid`` ``[B, N_max]`` marks real ones, ``features`` ``[B, N_max, D]``.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    features: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(1)


def gather_visual(inputs_embeds: torch.Tensor, visual_mask: torch.Tensor) -> VisualBatch:
    """Collect each row's visual tokens (``visual_mask`` ``[B, L]``) left-aligned into ``[B, N_max, D]``."""
    positions, valid = compact_index(visual_mask, pad_left=False)
    return VisualBatch(positions, valid, gather_sequence(inputs_embeds, positions))


def scatter_to_sequence(values: torch.Tensor, visual: VisualBatch, length: int, fill) -> torch.Tensor:
    """Inverse of :func:`gather_visual` for per-token values ``[B, N_max]`` -> ``[B, length]``."""
    batch = values.shape[0]
    out = torch.full((batch, length + 1), fill, dtype=values.dtype, device=values.device)
    # Padding slots go to a spare column that is cut off, so they never overwrite position 0.
    target = torch.where(visual.valid, visual.positions, torch.full_like(visual.positions, length))
    out.scatter_(1, target, values)
    return out[:, :length]


def gather_prompt(inputs_embeds: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt tokens (``prompt_mask`` ``[B, L]``) left-aligned: ``(embeddings [B, T_max, D],
    valid [B, T_max])``, with at least one (invalid) slot so that every row has a shape."""
    positions, valid = compact_index(prompt_mask, pad_left=False)
    if positions.shape[1] == 0:
        positions, valid = positions.new_zeros(prompt_mask.shape[0], 1), valid.new_zeros(prompt_mask.shape[0], 1)
    return gather_sequence(inputs_embeds, positions), valid


def kept_indices(keep_visual: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample sorted indices of the kept visual tokens."""
    return [torch.nonzero(row & ok, as_tuple=False).flatten() for row, ok in zip(keep_visual, valid)]


@dataclass
class SoftSelection:
    scale: torch.Tensor  # [B, L] multiplier of each token's embedding (1 for text)
    record: SelectionRecord
    # [B, L] True at visual tokens the forward leaves out of attention (training_forward="hard"), or None
    dropped: torch.Tensor | None = None


@dataclass
class HardSelection:
    compaction: Compaction
    record: SelectionRecord
    embeds: torch.Tensor  # [B, L, D] the input embeddings, with merged features where a method merged
    # [B, L'] the attention bias of each slot of the compacted sequence (log of the tokens a merged
    # token stands for, 0 elsewhere), or None when the method did not weigh its tokens
    key_bias: torch.Tensor | None = None


def select_tokens(
    state: AttachedState,
    inputs_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    token_valid: torch.Tensor,
    *,
    pad_left: bool,
    extras: dict[str, Callable[[], Any]] | None = None,
) -> SoftSelection | HardSelection | None:
    """Run the method on a batch and describe the resulting sequence.

    Args:
        inputs_embeds: ``[B, L, D]`` with the visual features already in place.
        visual_mask: ``BoolTensor[B, L]``, True at (non-padding) visual tokens.
        token_valid: ``BoolTensor[B, L]``, False at padding.
        pad_left: side of the padding of the compacted batch.
        extras: what the family can provide on request, each a function called only for
            methods that need it: ``"segments"`` (each sample's visual blocks as
            ``(frames, height, width)`` grids), ``"encoder_attention"`` (``[B, L]``
            attention each token received in the vision encoder) and ``"prompt"`` (the
            prompt's embeddings and mask, :func:`gather_prompt`).

    Returns:
        ``None`` when nothing changes (retention 1 in hard mode); otherwise a soft
        scaling or the :class:`Compaction` (``HardSelection.embeds`` holds merged
        features when the method merged tokens). ``state.last`` is updated either way.
    """
    mode = state.resolved_mode()
    if mode == "hard" and state.retention == 1.0:
        counts = visual_mask.sum(1)
        state.last = SelectionRecord([torch.arange(int(n), device=counts.device) for n in counts], counts, mode)
        return None
    visual = gather_visual(inputs_embeds, visual_mask)
    counts = visual.counts
    budget = token_budget(state.retention, counts)
    method = state.method
    provided = {}
    for need in sorted(method.needs):
        if extras is None or need not in extras:
            raise ValueError(f"method {state.method_name!r} needs {need.replace('_', ' ')}, which this model "
                             f"family does not provide")
        provided[need] = extras[need]()
    attention = provided.get("encoder_attention")
    if attention is not None:
        attention = gather_sequence(attention.unsqueeze(-1), visual.positions).squeeze(-1)
    prompt, prompt_valid = provided.get("prompt", (None, None))
    tokens = VisualTokens(visual.features, visual.valid, provided.get("segments"), attention,
                          prompt=prompt, prompt_valid=prompt_valid)
    if mode == "soft":
        scores = method.token_scores(tokens)
        soft = soft_topk(scores, budget, mask=visual.valid)
        hard = hard_topk(scores.detach(), budget, mask=visual.valid)
        if bool(visual.valid.any()):
            selection_loss = F.binary_cross_entropy(
                soft[visual.valid].float().clamp(0.0, 1.0), hard[visual.valid].float()
            )
        else:
            selection_loss = soft.sum() * 0.0
        dropped = None
        if state.training_forward == "hard":
            # The forward sees exactly the hard selection; the gradient is the soft mask's.
            values = hard.to(soft.dtype) + soft - soft.detach()
            gone = visual.valid & ~hard.bool()
            dropped = scatter_to_sequence(gone.to(torch.float32), visual, inputs_embeds.shape[1], 0.0).bool()
        else:
            values = soft  # every visual token reaches the model, scaled by its mask value
        scale = scatter_to_sequence(values.to(inputs_embeds.dtype), visual, inputs_embeds.shape[1], 1.0)
        record = SelectionRecord(kept_indices(visual.valid, visual.valid), counts, mode, soft_mask=soft,
                                 selection_loss=selection_loss)
        state.last = record
        return SoftSelection(scale, record, dropped)
    chosen, keep_visual, compaction, record = choose(state, tokens, visual, budget, visual_mask, token_valid,
                                                     pad_left=pad_left, mode=mode)
    embeds = inputs_embeds
    if chosen.features is not None:
        values = torch.where(keep_visual.unsqueeze(-1), chosen.features.to(inputs_embeds.dtype), visual.features)
        embeds = inputs_embeds.clone()
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(visual.positions)
        embeds[rows[visual.valid], visual.positions[visual.valid]] = values[visual.valid]
    key_bias = None
    if chosen.sizes is not None:
        sizes = chosen.sizes.to(torch.float32) * keep_visual
        key_bias = compaction.apply(size_bias(scatter_to_sequence(sizes, visual, inputs_embeds.shape[1], 0.0)))
        key_bias = key_bias.masked_fill(~compaction.valid, 0.0)
    return HardSelection(compaction, record, embeds, key_bias)


def choose(state: AttachedState, tokens: VisualTokens, visual: VisualBatch, budget: torch.Tensor,
           visual_mask: torch.Tensor, token_valid: torch.Tensor, *, pad_left: bool, mode: str = "hard"):
    """The hard selection step shared by pruning before and inside the language model.

    Runs the method on ``tokens``, checks the budget and describes the shorter sequence:
    every valid text token plus the kept visual tokens. Updates ``state.last``.

    Returns ``(selection, keep_visual [B, N_max], compaction, record)``.
    """
    method = state.method
    with torch.no_grad():
        chosen = method.select(tokens, budget)
    keep_visual = chosen.keep & visual.valid
    check_budget(method, keep_visual, budget, visual.counts)
    length = visual_mask.shape[1]
    keep = (token_valid & ~visual_mask) | scatter_to_sequence(keep_visual, visual, length, False)
    compaction = Compaction.from_keep(keep, pad_left=pad_left)
    record = SelectionRecord(kept_indices(keep_visual, visual.valid), visual.counts, mode, compaction=compaction)
    state.last = record
    return chosen, keep_visual, compaction, record


def check_budget(method: SelectionMethod, keep: torch.Tensor, budget: torch.Tensor, counts: torch.Tensor) -> None:
    """A method keeps exactly the budget (or, if it says it follows its own grid, at least one
    token of every sample that has any); anything else is a bug worth a loud error."""
    kept = keep.sum(1)
    if method.exact_budget:
        wrong = not torch.equal(kept, budget.to(kept.device))
    else:
        wrong = bool(((counts > 0) & (kept == 0)).any())
    if wrong:
        raise RuntimeError(f"method {method.name!r} kept {kept.tolist()} visual tokens for budgets {budget.tolist()}")


# transformers 5.24 renamed the cache argument and output from ``past_key_values`` to ``cache``
# (the old name is deprecated until 5.40); calls inside transformers use the new one.
CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(function) -> str:
    """The name under which ``function`` takes the cache in the installed ``transformers``."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def cache_length(cache) -> int:
    """How many tokens ``cache`` holds (layer 0's count), as a plain number.

    From transformers 5.25 a hybrid cache whose first layer is linear attention (Qwen3.5)
    answers with its running token counter, a tensor that the next forward advances in
    place: a length read before a forward would silently grow with it.
    """
    return int(cache.get_seq_length()) if cache is not None else 0


def given_cache(kwargs: dict):
    """The cache a call was given, under either name; ``None`` if none."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def output_cache(outputs):
    """The cache a model output returned, under either name; ``None`` if none."""
    return next((value for value in (getattr(outputs, "cache", None), getattr(outputs, "past_key_values", None))
                 if value is not None), None)


# The attribute of a cache object that holds its PrefillMemory.
CACHE_ATTRIBUTE = "visionselector_pruned_prompt"


def remember_prefill(cache, full_length: int, compact_valid: torch.Tensor, first_pruned_layer: int = 0,
                     key_bias: torch.Tensor | None = None) -> None:
    """Note on ``cache`` that it holds a pruned prompt of ``full_length`` tokens (``compact_valid`` ``[B, L']``),
    whose keys carry ``key_bias`` ``[B, L']`` (or none)."""
    if cache is not None:
        setattr(cache, CACHE_ATTRIBUTE, PrefillMemory(full_length, compact_valid.shape[1], compact_valid,
                                                      first_pruned_layer, key_bias))


def forget_prefill(cache) -> None:
    if cache is not None and CACHE_ATTRIBUTE in getattr(cache, "__dict__", {}):
        delattr(cache, CACHE_ATTRIBUTE)


def pruned_prompt(cache) -> PrefillMemory | None:
    """The memory of the pruned prompt ``cache`` holds; ``None`` when it holds none (or nothing at all)."""
    memory = getattr(cache, CACHE_ATTRIBUTE, None) if cache is not None else None
    if memory is None:
        return None
    past_length = cache_length(cache)
    if past_length == 0:
        return None
    base = memory.compact_length if memory.first_pruned_layer == 0 else memory.full_length
    if past_length < base:
        raise ValueError(f"the cache holds {past_length} tokens, fewer than the {base} of its pruned prompt: it was "
                         "cropped into the prompt, whose visual tokens cannot be restored; start from the prompt "
                         "again (a fresh cache)")
    return memory


def decode_attention_mask(
    memory: PrefillMemory, attention_mask: torch.Tensor | None, past_length: int, query_length: int
) -> torch.Tensor | None:
    """A decoding step's 2-D mask, translated from full-sequence to compacted-cache layout.

    ``generate`` keeps the mask of the uncompressed sequence (its positions too, which
    is what we want); the cache holds only the kept tokens, so the prompt part of the
    mask is replaced by the mask of the compacted prompt.
    """
    appended = memory.appended(past_length)
    full_total = memory.full_length + appended + query_length
    compact_total = memory.compact_length + appended + query_length
    if attention_mask is None:
        if bool(memory.compact_mask.all()):
            return None
        tail = torch.ones(memory.compact_mask.shape[0], appended + query_length, dtype=torch.bool,
                          device=memory.compact_mask.device)
        return torch.cat([memory.compact_mask, tail], dim=1)
    if attention_mask.ndim != 2:
        raise NotImplementedError("visual token pruning supports 2-D attention masks only during decoding")
    if attention_mask.shape[1] == compact_total:
        return attention_mask
    if attention_mask.shape[1] != full_total:
        raise ValueError(
            f"attention_mask has length {attention_mask.shape[1]}; after pruning, a decoding step expects either "
            f"the uncompressed length {full_total} or the compacted length {compact_total}"
        )
    tail = attention_mask[:, memory.full_length:].to(torch.bool)
    return torch.cat([memory.compact_mask.to(tail.device), tail], dim=1)


def joined_key_bias(memory: PrefillMemory | None, past_length: int, chunk_bias: torch.Tensor | None,
                    chunk_valid: torch.Tensor) -> torch.Tensor | None:
    """The attention bias of a cache of ``past_length`` tokens followed by a new chunk (``chunk_valid``
    ``[B, C]``): the pruned prompt's bias, none on the tokens after it, then the chunk's own
    (``chunk_bias`` ``[B, C]``, or none); ``None`` when neither carries one."""
    prefix = memory.key_bias if memory is not None else None
    if prefix is None and chunk_bias is None:
        return None
    batch, device = chunk_valid.shape[0], chunk_valid.device
    if prefix is None:
        prefix = torch.zeros(batch, past_length, device=device)
    else:
        prefix = torch.cat([prefix.to(device), torch.zeros(batch, past_length - prefix.shape[1], device=device)], 1)
    if chunk_bias is None:
        chunk_bias = torch.zeros(chunk_valid.shape, device=device)
    return torch.cat([prefix, chunk_bias.to(device=device, dtype=prefix.dtype)], dim=1)


def weighted_decoding_mask(memory: PrefillMemory, mask: torch.Tensor | None, past_length: int, query_length: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """A decoding step's 4-D additive mask over the compacted cache, from its 2-D ``mask`` (or ``None``),
    with the bias ``memory.key_bias`` on the prompt's keys and none on the tokens after it."""
    if mask is None:
        mask = torch.ones(memory.key_bias.shape[0], past_length + query_length, dtype=torch.bool,
                          device=memory.key_bias.device)
    queries = torch.ones(mask.shape[0], query_length, dtype=torch.bool, device=mask.device)
    return additive_mask(mask.bool(), joined_key_bias(memory, past_length, None, queries), query_length, dtype)


WEIGHTED_ATTENTION = ("sdpa", "eager")


def check_weighted_attention(state: AttachedState, text_model, weighted: bool | None = None) -> None:
    """Merged tokens (``weighted``; by default, whether the attached method merges) need an attention
    that adds a float mask to its logits."""
    if weighted is None:
        weighted = state.method.merges
    implementation = getattr(text_model.config, "_attn_implementation", None)
    if weighted and implementation not in WEIGHTED_ATTENTION:
        raise ValueError(f"method {state.method_name!r} with merge=True weighs attention to each merged token by "
                         f"an additive mask, which {implementation!r} attention does not take; load the model with "
                         f"attn_implementation={' or '.join(map(repr, WEIGHTED_ATTENTION))}, or set merge=False")


# Set on every function this package puts on a module instance, so that a module already
# patched by an attached model is recognised.
PATCH_MARK = "_visionselector_patch"


def replace_method(module: torch.nn.Module, name: str, replacement, state: AttachedState) -> None:
    """Set ``module.<name>`` on the instance (usually ``forward``), remembering what to put back."""
    previous = module.__dict__.get(name, _MISSING)

    def undo():
        if previous is _MISSING:
            module.__dict__.pop(name, None)
        else:
            setattr(module, name, previous)

    state.restore.append(undo)
    setattr(replacement, PATCH_MARK, True)
    setattr(module, name, replacement)
    state.patched.append(module)


def replace_forward(module: torch.nn.Module, new_forward, state: AttachedState) -> None:
    replace_method(module, "forward", new_forward, state)


def restore_forwards(state: AttachedState) -> None:
    """Undo every patch and hook of the attached state, newest first."""
    while state.restore:
        state.restore.pop()()
    state.patched.clear()


_MISSING = object()
