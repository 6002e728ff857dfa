"""The public entry points: attach a selection method to a model instance, and undo it."""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from .adapters import AttachedState, find_adapter
from .adapters.base import MODES, PATCH_MARK, restore_forwards
from .checkpoint import write_selector
from .methods import get_method_class
from .methods.base import check_options, method_options
from .ops.topk import validate_loss_weight, validate_retention
from .selector_sources import load_selector

__all__ = [
    "attach",
    "attached",
    "detach",
    "is_attached",
    "get_scorer",
    "get_method",
    "save_selector",
    "last_selection",
    "set_retention",
    "set_selection_loss_weight",
    "get_state",
]

# Names under which the method module and the state live on the model instance.
MODULE_NAME = "visual_token_selector"
STATE_ATTRIBUTE = "_visionselector_state"


def attach(model, method: str = "visionselector", retention: float = 0.2, selector: str | os.PathLike | None = None,
           *, mode: str = "auto", selection_loss_weight: float = 1.0, **options):
    """Patch ``model`` (the instance only) so that it keeps a fraction of its visual tokens.

    Args:
        model: a supported ``transformers`` vision-language model instance.
        method: a registered method name (see :func:`visionselector.list_methods`).
        retention: fraction of each sample's visual tokens kept, in (0, 1]; the budget is
            ``max(1, floor(retention * N))`` over all images and frames of the sample.
        selector: a trained scorer: a folder written by :func:`save_selector`, a
            VisionSelector release (Qwen2.5-VL checkpoint folder), an AngelSlim scorer
            folder, or the hub id of any of these (see
            :func:`visionselector.selector_sources.load_selector`); or ``None`` for a
            freshly initialised one (to train).
        mode: ``"hard"`` drops tokens from the sequence; ``"soft"`` keeps them scaled by
            the differentiable mask (training); ``"auto"`` is soft while the method is in
            training mode (``model.train()``) and hard otherwise.
        selection_loss_weight: weight of the selection loss added to the language loss
            in soft mode (the curriculum changes it during training).
        **options: options of the method (for ``visionselector``: ``hidden_dim``).

    Returns:
        ``model``, patched.
    """
    retention = validate_retention(retention)
    selection_loss_weight = validate_loss_weight(selection_loss_weight)
    adapter = find_adapter(model)
    if is_attached(model):
        raise RuntimeError("a selection method is already attached to this model; call visionselector.detach first "
                           "(or set_retention to change the retention)")
    _refuse_nested(model)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    method_class = get_method_class(method)
    hidden_size = adapter.hidden_size(model)
    training_retention = None
    state_dict = None
    if selector is not None:
        config, state_dict = load_selector(selector)  # the config's field types are checked there
        if config["method"] != method:
            raise ValueError(f"selector at {selector} was saved for method {config['method']!r}, not {method!r}")
        try:
            saved_options = check_options(method_class, config.get("method_config", {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"selector at {selector}: its method_config does not fit method {method!r}: "
                             f"{error}") from None
        saved_width = config.get("hidden_size")
        if saved_width != hidden_size:
            raise ValueError(
                f"selector at {selector} was saved for hidden size {saved_width}, but this model's language model "
                f"has hidden size {hidden_size}"
            )
        if config.get("model_family") not in (None, adapter.family):
            raise ValueError(f"selector at {selector} was trained on a {config['model_family']!r} model; "
                             f"this model is {adapter.family!r}")
        options = {**saved_options, **options}
        training_retention = config.get("training_retention")
    if mode == "soft" and not method_class.trainable:
        raise ValueError(f"mode='soft' needs a trainable method; {method!r} is training-free")
    selection_method = _build_method(method_class, hidden_size, options)
    if state_dict is not None:
        try:
            selection_method.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(f"selector weights at {selector} do not fit method {method!r}: {error}") from None
    reference = model.get_input_embeddings().weight
    selection_method.to(device=reference.device)
    selection_method.train(model.training)
    state = AttachedState(adapter=adapter, method=selection_method, method_name=method, retention=retention,
                          mode=mode, selection_loss_weight=selection_loss_weight,
                          training_retention=training_retention)
    _install(model, state)
    return model


def _install(model, state: AttachedState) -> None:
    """Put ``state`` and its method on ``model`` and patch it; nothing stays behind if patching fails."""
    model.add_module(MODULE_NAME, state.method)
    setattr(model, STATE_ATTRIBUTE, state)
    try:
        state.adapter.patch(model, state)
        # Instance attributes that copy and pickle look up before the class's.
        model.__dict__["__deepcopy__"] = lambda memo: _deepcopy_attached(model, memo)
        state.restore.append(lambda: model.__dict__.pop("__deepcopy__", None))
        for module in {id(m): m for m in state.patched_modules(model)}.values():
            module.__dict__["__reduce_ex__"] = _refuse_pickling
            state.restore.append(lambda module=module: module.__dict__.pop("__reduce_ex__", None))
    except Exception:
        _undo(model, state)
        raise


def _refuse_nested(model) -> None:
    """One selection method per model tree: attaching to a model and to a module inside it (or around
    it) would select twice and leave patches behind when one of them is detached."""
    for name, module in model.named_modules():
        if module is not model and STATE_ATTRIBUTE in module.__dict__:
            raise RuntimeError(f"a selection method is attached to {name!r} inside this model; detach it there "
                               "first (one selection method per model)")
    if any(getattr(value, PATCH_MARK, False) for value in model.__dict__.values()):
        raise RuntimeError("this module belongs to a model that has a selection method attached; attach to that "
                           "model only, or detach it first (one selection method per model)")


def _refuse_pickling(protocol):
    raise TypeError("a model with a selection method attached cannot be pickled (torch.save(model)) or "
                    "shallow-copied: its patched forwards are closures over its state. Save the model with "
                    "save_pretrained (or detach it first) and the selector with visionselector.save_selector, then "
                    "attach again after loading; copy.deepcopy(model) gives an independent attached copy")


def _deepcopy_attached(model, memo):
    """An independent copy: the model copied unpatched, then the copy of the method attached to it."""
    state = get_state(model)
    _undo(model, state)
    try:
        copied = copy.deepcopy(model, memo)
        method = copy.deepcopy(state.method, memo)
    finally:
        _install(model, state)
    twin = AttachedState(adapter=state.adapter, method=method, method_name=state.method_name,
                         retention=state.retention, mode=state.mode, selection_loss_weight=state.selection_loss_weight,
                         training_retention=state.training_retention)
    _install(copied, twin)
    return copied


def _build_method(method_class, hidden_size: int, options: dict):
    # Names, types and ranges of every option now, so that attach fails rather than the first forward.
    options = check_options(method_class, options)
    try:
        return method_class(hidden_size, **options)
    except TypeError as error:
        raise TypeError(f"invalid options for method {method_class.name!r}: {error}; "
                        f"accepted options: {', '.join(method_options(method_class)) or 'none'}") from None


def _undo(model, state: AttachedState) -> None:
    restore_forwards(state)
    model._modules.pop(MODULE_NAME, None)
    model.__dict__.pop(STATE_ATTRIBUTE, None)


def is_attached(model) -> bool:
    return STATE_ATTRIBUTE in getattr(model, "__dict__", {})


def get_state(model) -> AttachedState:
    """The attached state; ``RuntimeError`` if nothing is attached."""
    if not is_attached(model):
        raise RuntimeError("no selection method is attached to this model; call visionselector.attach first")
    return model.__dict__[STATE_ATTRIBUTE]


def detach(model):
    """Remove what :func:`attach` added; the model behaves exactly as before. Returns ``model``."""
    _undo(model, get_state(model))
    return model


def get_method(model):
    """The attached :class:`~visionselector.methods.SelectionMethod` module."""
    return get_state(model).method


def get_scorer(model) -> torch.nn.Module:
    """The learned scorer module of the attached method."""
    state = get_state(model)
    scorer = getattr(state.method, "scorer", None)
    if scorer is None:
        raise TypeError(f"method {state.method_name!r} has no learned scorer")
    return scorer


def set_retention(model, retention: float) -> None:
    """Change the retention of the attached method (one trained scorer serves any retention)."""
    get_state(model).retention = validate_retention(retention)


def set_selection_loss_weight(model, weight: float) -> None:
    """Set lambda, the weight of the selection loss in soft mode (a finite number >= 0)."""
    get_state(model).selection_loss_weight = validate_loss_weight(weight)


def save_selector(model, directory: str | os.PathLike) -> str:
    """Write the attached method's weights and config (never the MLLM's weights) to ``directory``."""
    state = get_state(model)
    config = {
        "method": state.method_name,
        "method_config": state.method.config_dict(),
        "hidden_size": state.adapter.hidden_size(model),
        "model_family": state.adapter.family,
        "model_class": type(model).__name__,
        "training_retention": state.training_retention if state.training_retention is not None else state.retention,
    }
    return str(write_selector(directory, config, state.method.state_dict()))


def last_selection(model) -> list[torch.Tensor]:
    """Per sample, the sorted indices (into its visual tokens) of those that reached the language model
    in the last call that started a sequence (a prefill, or ``generate``; decoding steps keep it, and a
    later turn that adds images reports those images' tokens).

    After ``generate`` with beams or ``num_return_sequences`` there is one entry per input sample. In
    soft mode (a trainable method in training mode) every visual token reaches the model, scaled by
    the soft mask, so all are reported.
    """
    record = get_state(model).last
    if record is None:
        raise RuntimeError("no selection to report: the last forward that started a sequence had no input_ids to "
                           "locate visual tokens (inputs_embeds only), or none has run since attach")
    return [indices.clone() for indices in record.kept]


@contextlib.contextmanager
def attached(model, method: str = "visionselector", retention: float = 0.2, selector=None, **options):
    """``with attached(model, ...):`` attach on entry (same arguments as :func:`attach`) and detach on
    exit, also when the block raises; yields ``model``."""
    attach(model, method, retention, selector, **options)
    try:
        yield model
    finally:
        detach(model)
