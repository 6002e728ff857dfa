import pytest
import torch

import visionselector as vs
from visionselector.presets import SampleSpec, synthetic_batch
from visionselector.training import CurriculumSchedule, SelectorTrainingConfig, train_selector

from conftest import full_embeddings, make_model


def labelled_batch(model, seed=0):
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)], suffix=6), SampleSpec(images=[(4, 8)])],
                            seed=seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]  # the "answer": the last few text tokens
    batch["labels"] = labels
    return batch


def test_curriculum_schedule_is_linear_between_its_ends():
    schedule = CurriculumSchedule(0.1, 2.0, total_steps=11)
    assert schedule.weight(0) == pytest.approx(0.1)
    assert schedule.weight(5) == pytest.approx(1.05)
    assert schedule.weight(10) == pytest.approx(2.0)
    assert schedule.weight(50) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        CurriculumSchedule(0.1, 2.0, total_steps=0)
    with pytest.raises(ValueError):
        CurriculumSchedule(-1.0, 2.0, total_steps=3)


def test_training_changes_only_the_scorer_and_follows_the_schedule():
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = train_selector(model, [labelled_batch(model)], steps=5,
                             config=SelectorTrainingConfig(learning_rate=1e-3, progress=False))
    assert [round(h["lambda"], 6) for h in history] == [round(0.1 + 1.9 * i / 4, 6) for i in range(5)]
    changed = {name for name, p in model.named_parameters()
               if name not in before or not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith("visual_token_selector.scorer.") for name in changed)
    assert {"visual_token_selector.scorer.query.weight", "visual_token_selector.scorer.key.weight"} <= changed
    # Soft mode during training; hard selection afterwards.
    assert all(h["selection_loss"] == h["selection_loss"] for h in history)  # not NaN: soft mode ran
    assert not vs.get_method(model).training
    with torch.no_grad():
        model(**{k: v for k, v in labelled_batch(model).items() if k != "labels"})
    assert model._visionselector_state.last.mode == "hard"


def test_soft_mode_keeps_the_sequence_and_adds_the_weighted_selection_loss():
    model = make_model()
    vs.attach(model, retention=0.25, mode="soft", selection_loss_weight=0.7)
    batch = labelled_batch(model)
    out = model(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    losses = model._visionselector_state.last_losses
    torch.testing.assert_close(out.loss.detach(), losses["language"] + 0.7 * losses["selection"])
    record = model._visionselector_state.last
    torch.testing.assert_close(record.soft_mask.sum(1), torch.tensor([4.0, 2.0]), atol=1e-4, rtol=0)


def teacher_labels(model, batch, retention, direction):
    """Answer labels that the model predicts when only a target subset T of visual tokens is
    visible (the top-k by a fixed direction), the others scaled to zero: the language loss
    is lowest when the soft mask equals the indicator of T."""
    core = model.model
    ids = batch["input_ids"]
    embeds, positions, visual = full_embeddings(model, batch)
    target = torch.zeros_like(visual)
    for row in range(ids.shape[0]):
        where = torch.nonzero(visual[row]).flatten()
        k = vs.token_budget(retention, torch.tensor([len(where)])).item()
        target[row, where[(embeds[row, where] @ direction).topk(k).indices]] = True
    scaled = embeds * (~visual | target).unsqueeze(-1)
    hidden = core.language_model(inputs_embeds=scaled, position_ids=positions,
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    predictions = model.lm_head(hidden).argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = predictions[:, -5:-1]
    return labels, target


def test_language_loss_decreases_on_a_toy_objective():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaky logits make the answer depend on what is visible
        batch = labelled_batch(model, seed=3)
        batch["labels"], _ = teacher_labels(model, batch, 0.25, torch.randn(64, generator=torch.Generator().manual_seed(5)))
    config = SelectorTrainingConfig(learning_rate=3e-2, warmup_ratio=0.0, lambda_start=0.0, lambda_end=0.0,
                                    retention=0.25, progress=False)
    history = train_selector(model, [batch], steps=40, config=config)
    first = sum(h["language_loss"] for h in history[:3]) / 3
    last = sum(h["language_loss"] for h in history[-3:]) / 3
    assert last < 0.9 * first, (first, last)


def test_trainer_integration_sets_lambda_and_saves_only_the_selector(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from visionselector.training import SelectorTrainer

    model = make_model()
    vs.attach(model, retention=0.25)
    batch = labelled_batch(model)

    class OneBatch(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return batch

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SelectorTrainer(model=model, args=args, train_dataset=OneBatch(), data_collator=lambda items: items[0],
                              lambda_start=0.5, lambda_end=1.5)
    trainer.train()
    state = model._visionselector_state
    assert state.selection_loss_weight == pytest.approx(1.5)  # the last step's lambda
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith("visual_token_selector.") for name in changed)
    trainer.save_model(str(tmp_path / "saved"))
    fresh = make_model()
    vs.attach(fresh, selector=tmp_path / "saved")
    for name, tensor in vs.get_scorer(fresh).state_dict().items():
        torch.testing.assert_close(tensor, vs.get_scorer(model).state_dict()[name])
