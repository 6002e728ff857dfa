"""Conversations continued from a returned cache after a pruned prefill, on every family with
every method: the later turn is numbered and masked as the unpruned model would, and images
added in a later turn compete for their own budget."""

import copy

import pytest
import torch

import visionselector as vs
from visionselector.api import get_state

from families import FAMILIES
from test_family_contract import METHODS, SUBSET_METHODS, _attach, _cases, _model

TURN = [(1,), (2,)]  # two samples, one image each
NEW_TEXT = 5


def _first_turn(family, model, batch):
    # A placeholder id in the answer would be read as an image by the fresh run of the conversation.
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             suppress_tokens=list(family.placeholder_ids))
    return out.sequences, out.past_key_values


def _conversation(family, batch, sequences, seed=7):
    """The whole conversation so far plus a new text turn, as a chat front end passes it: every
    token, the mask of every token, and no pixels (the cache holds the images)."""
    new = family.batch([()] * sequences.shape[0], seed=seed)["input_ids"][:, -NEW_TEXT:]
    input_ids = torch.cat([sequences, new], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(sequences.shape[0], input_ids.shape[1]
                                                          - batch["attention_mask"].shape[1], dtype=torch.long)], 1)
    conversation = {"input_ids": input_ids, "attention_mask": mask}
    if "mm_token_type_ids" in batch:
        grown = torch.zeros_like(input_ids)
        grown[:, : batch["mm_token_type_ids"].shape[1]] = batch["mm_token_type_ids"]
        conversation["mm_token_type_ids"] = grown
    return conversation


@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_continuing_a_conversation_equals_feeding_its_tokens_one_by_one(family, method):
    # One sample: without position_ids, a LLaVA text model numbers a step from the cache length
    # whatever the padding, so a hand-written loop over a padded batch differs even unpruned.
    model = _model(family)
    _attach(model, method, 0.3)
    _check_continued_as_fed_one_by_one(family, model)


def _check_continued_as_fed_one_by_one(family, model):
    batch = family.batch(TURN[:1])
    sequences, cache = _first_turn(family, model, batch)
    conversation = _conversation(family, batch, sequences)
    stepwise = copy.deepcopy(cache)
    with torch.no_grad():
        continued = model.generate(**conversation, past_key_values=cache, max_new_tokens=2, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        # The same new tokens, one forward each, as a hand-written loop feeds them.
        done = sequences.shape[1] - 1
        for position in range(done, conversation["input_ids"].shape[1]):
            out = model(input_ids=conversation["input_ids"][:, position:position + 1], past_key_values=stepwise,
                        attention_mask=conversation["attention_mask"][:, :position + 1], use_cache=True)
    torch.testing.assert_close(continued.logits[0], out.logits[:, -1], atol=1e-5, rtol=1e-4)


# A method that reads the prompt chose with the first turn's text; a fresh run of the whole
# conversation reads the later turns too, so it may keep other tokens.
VISUAL_ONLY = [m for m in SUBSET_METHODS if "prompt" not in vs.methods.get_method_class(m).needs]


@pytest.mark.parametrize("family, method", _cases(VISUAL_ONLY))
def test_continuing_a_conversation_equals_a_fresh_pruned_run_of_all_of_it(family, method):
    # These methods choose from the visual tokens alone, so a fresh run keeps the same ones.
    model = _model(family)
    _attach(model, method, 0.3)
    batch = family.batch(TURN)
    sequences, cache = _first_turn(family, model, batch)
    kept = vs.last_selection(model)
    conversation = _conversation(family, batch, sequences)
    pixels = {k: v for k, v in batch.items() if k not in conversation}
    with torch.no_grad():
        continued = model.generate(**conversation, past_key_values=cache, max_new_tokens=3, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        fresh = model.generate(**conversation, **pixels, max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(vs.last_selection(model), kept))
    for step, (mine, theirs) in enumerate(zip(continued.logits, fresh.logits)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4, msg=f"step {step}")
    assert torch.equal(continued.sequences, fresh.sequences)


def _text_model_inputs(model, call):
    """What the unpatched text model receives for ``model(**call)``, and the call's output."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        output = model(**call, use_cache=True)
    finally:
        handle.remove()
    return captured, output


def _restricted(inputs, keep, start=0):
    """The text model's keyword arguments for only the tokens ``keep`` ``BoolTensor[L]`` (batch of one);
    positions the text model would count itself from ``start`` where none were given."""
    index = torch.nonzero(keep).flatten()
    positions = inputs["position_ids"]
    if positions is None:
        positions = torch.arange(start, start + keep.shape[0])[None]
    restricted = {"inputs_embeds": inputs["inputs_embeds"][:, index], "position_ids": positions[..., index]}
    if inputs.get("visual_pos_masks") is not None:  # DeepStack: one row per visual token
        visual = inputs["visual_pos_masks"][0]
        restricted["visual_pos_masks"] = visual[index][None]
        survives = keep[visual]
        restricted["deepstack_visual_embeds"] = [rows[survives] for rows in inputs["deepstack_visual_embeds"]]
    return restricted


def _kept_tokens(input_ids, placeholder_ids, kept):
    visual = torch.isin(input_ids[0], torch.tensor(placeholder_ids))
    keep = ~visual
    keep[torch.nonzero(visual).flatten()[kept]] = True
    return keep


@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_images_added_in_a_later_turn_compete_for_their_own_budget(family, method):
    model = _model(family)
    _attach(model, method, 0.3)
    first = family.batch([(1,)])
    later = family.batch([(0,)], seed=5)  # a new turn: text, a new image, text
    pixels = {k: v for k, v in later.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        prompt = model(**first, use_cache=True)
        kept_first = vs.last_selection(model)[0]
        # No attention mask: without position_ids, Qwen models number a full-length mask's tokens.
        turn = dict(input_ids=later["input_ids"], past_key_values=prompt.past_key_values, use_cache=True, **pixels)
        if get_state(model).method.prune_layer is not None:
            with pytest.raises(NotImplementedError, match=f"{method}.*prunes inside the language model"):
                model(**turn)
            return
        logits = model(**turn).logits[:, -1]
        kept_later = vs.last_selection(model)[0]
        visual = int(torch.isin(later["input_ids"], torch.tensor(family.placeholder_ids)).sum())
        if get_state(model).method.exact_budget:
            assert len(kept_later) == max(1, int(0.3 * visual))
        vs.detach(model)
        # The definition: the unpruned model's own inputs to its text model, restricted to the text
        # and the kept visual tokens of each turn, run on a cache of the kept tokens only.
        from transformers import DynamicCache

        full_prompt, full = _text_model_inputs(model, first)
        cache = DynamicCache(config=model.config)
        keep = _kept_tokens(first["input_ids"], family.placeholder_ids, kept_first)
        text_model = model.model.language_model
        text_model(**_restricted(full_prompt, keep), past_key_values=cache, use_cache=True,
                   attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long))
        full_turn, _ = _text_model_inputs(model, dict(input_ids=later["input_ids"],
                                                      past_key_values=full.past_key_values, **pixels))
        keep_turn = _kept_tokens(later["input_ids"], family.placeholder_ids, kept_later)
        if method == "pool":  # merges tokens: the definition is checked in test_methods
            return
        hidden = text_model(**_restricted(full_turn, keep_turn, first["input_ids"].shape[1]), past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(1, int(keep.sum() + keep_turn.sum()), dtype=torch.long))
        expected = model.lm_head(hidden.last_hidden_state[:, -1])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [pytest.param(f, id=n) for n, f in sorted(FAMILIES.items())])
def test_tokens_after_a_later_turn_that_brings_the_first_images_are_numbered_as_unpruned(family):
    # A text-only first turn leaves a cache with nothing pruned: the later turn's images are the
    # first ones pruned, and the tokens after that turn still count every token of both turns.
    from transformers import DynamicCache

    model = _model(family)
    _attach(model, "uniform", 0.3)
    first, later = family.batch([()]), family.batch([(0,)], seed=5)
    step = family.batch([()], seed=9)["input_ids"][:, -1:]
    pixels = {k: v for k, v in later.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        prompt = model(**first, use_cache=True)
        turn = model(input_ids=later["input_ids"], past_key_values=prompt.past_key_values, use_cache=True, **pixels)
        kept = vs.last_selection(model)[0]
        logits = model(input_ids=step, past_key_values=turn.past_key_values, use_cache=True).logits[:, -1]
        # The definition: the unpruned model's own inputs to its text model for the three calls,
        # restricted to the text and the kept visual tokens, run on a cache of those tokens only. The
        # same weights, freshly built: Qwen models keep rope deltas from their last call.
        reference = _model(family)
        full_prompt, full = _text_model_inputs(reference, first)
        full_turn, full = _text_model_inputs(reference, dict(input_ids=later["input_ids"],
                                                             past_key_values=full.past_key_values, **pixels))
        full_step, _ = _text_model_inputs(reference, dict(input_ids=step, past_key_values=full.past_key_values))
        first_length, later_length = first["input_ids"].shape[1], later["input_ids"].shape[1]
        keep_turn = _kept_tokens(later["input_ids"], family.placeholder_ids, kept)
        cached = first_length + int(keep_turn.sum())
        cache = DynamicCache(config=model.config)
        text_model = reference.model.language_model
        text_model(**_restricted(full_prompt, torch.ones(first_length, dtype=torch.bool)), past_key_values=cache,
                   use_cache=True, attention_mask=torch.ones(1, first_length, dtype=torch.long))
        text_model(**_restricted(full_turn, keep_turn, first_length), past_key_values=cache, use_cache=True,
                   attention_mask=torch.ones(1, cached, dtype=torch.long))
        hidden = text_model(**_restricted(full_step, torch.ones(1, dtype=torch.bool), first_length + later_length),
                            past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(1, cached + 1, dtype=torch.long))
        expected = reference.lm_head(hidden.last_hidden_state[:, -1])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def _merged_cases():
    from visionselector.adapters import ADAPTERS

    return [pytest.param(f, id=f"{n}-merge", marks=[pytest.mark.skip(reason="merging is refused on linear attention")]
                         if ADAPTERS[n].recurrent_state else []) for n, f in sorted(FAMILIES.items())]


@pytest.mark.parametrize("family", _merged_cases())
def test_a_merged_conversation_continues_as_its_tokens_fed_one_by_one(family):
    """Merged tokens keep their attention weights in every later step, whichever way the steps come."""
    model = _model(family)
    vs.attach(model, method="divprune", retention=0.3, merge=True)
    _check_continued_as_fed_one_by_one(family, model)


@pytest.mark.parametrize("options", [{"method": "uniform"}, {"method": "divprune", "merge": True}],
                         ids=["uniform", "merge"])
@pytest.mark.parametrize("family", [pytest.param(f, id=n) for n, f in sorted(FAMILIES.items())])
def test_a_batch_adding_images_in_a_later_turn_equals_each_conversation_alone(family, options):
    from visionselector.adapters import ADAPTERS
    from visionselector.adapters.positions import LinearPositions

    if options.get("merge") and ADAPTERS[family.name].recurrent_state:
        pytest.skip("merging is refused on linear attention")
    model = _model(family)
    vs.attach(model, retention=0.3, **options)
    first, later = family.batch([(1,), (1,)]), family.batch([(0,), (2,)], seed=5)
    pixels = {k: v for k, v in later.items() if k not in ("input_ids", "attention_mask")}
    mask = torch.cat([first["attention_mask"], later["attention_mask"]], 1)
    with torch.no_grad():
        prompt = model(**first, use_cache=True)
        turn = dict(input_ids=later["input_ids"], attention_mask=mask, past_key_values=prompt.past_key_values,
                    use_cache=True, **pixels)
        if isinstance(ADAPTERS[family.name].positions, LinearPositions):
            # Without position_ids a LLaVA text model counts from the cache length, padding or not.
            turn["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -later["input_ids"].shape[1]:]
        if ADAPTERS[family.name].recurrent_state:
            with pytest.raises(NotImplementedError, match="different numbers of their new visual tokens"):
                model(**turn)
            return
        both = model(**turn).logits[:, -1]
        for row in range(2):
            alone = family.single(later, [(0,), (2,)], row)
            own = model(**family.single(first, [(1,), (1,)], row), use_cache=True)
            logits = model(input_ids=alone["input_ids"], past_key_values=own.past_key_values, use_cache=True,
                           **{k: v for k, v in alone.items() if k not in ("input_ids", "attention_mask")}).logits
            torch.testing.assert_close(logits[0, -1], both[row], atol=1e-5, rtol=1e-4)
