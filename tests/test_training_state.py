"""What training leaves behind: whole checkpoints after a kill, resumes that refuse other settings,
output folders that are not silently reused, and the caller's model state put back."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import visionselector as vs
from visionselector import training
from visionselector.api import get_state
from visionselector.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_selector, write_selector
from visionselector.training import SelectorTrainingConfig, recover_checkpoint, train_selector

from conftest import make_model
from test_training import labelled_batch


def fast_config(**changes):
    return SelectorTrainingConfig(**{"learning_rate": 1e-2, "progress": False, "retention": 0.25, **changes})


def scorer_weights(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in vs.get_method(model).state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ---------------------------------------------------------------------------------------------
# Kills during a save


class Crash(BaseException):
    """A kill: nothing catches it, and nothing the dead process would do afterwards happens."""


class Killer:
    """Counts the file-system steps of a save and kills the process before the ``at``-th one.

    A kill during ``torch.save`` or ``save_file`` leaves the file half-written, as a real
    one would. Once dead, every later step fails too (cleanup code in ``finally`` or
    ``except`` blocks cannot touch the disk).
    """

    WRITERS = ("torch.save", "save_file")

    def __init__(self, monkeypatch, at: int | None = None):
        self.at, self.calls, self.armed, self.dead = at, 0, False, False
        import safetensors.torch

        for owner, name, label, path_argument in ((torch, "save", "torch.save", 1),
                                                  (safetensors.torch, "save_file", "save_file", 1),
                                                  (os, "replace", "os.replace", 0), (os, "rename", "os.rename", 0),
                                                  (os, "unlink", "os.unlink", 0), (os, "rmdir", "os.rmdir", 0),
                                                  (os, "mkdir", "os.mkdir", 0), (os, "fsync", "os.fsync", None)):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), label, path_argument))

    def _wrap(self, original, label, path_argument):
        def step(*args, **kwargs):
            if not self.armed:
                return original(*args, **kwargs)
            if self.dead:
                raise Crash(f"dead before {label}")
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                self.dead = True
                if label in self.WRITERS:
                    original(*args, **kwargs)
                    path = Path(args[path_argument])
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                    raise Crash(f"killed while writing {path.name}")
                raise Crash(f"killed before {label}")
            return original(*args, **kwargs)

        return step


def kill_in_save(monkeypatch, killer: Killer, step: int):
    """Arm ``killer`` during the checkpoint save after optimizer step ``step`` only."""
    original = training._save_checkpoint

    def save(*args, **kwargs):
        killer.armed = args[4] == step
        try:
            return original(*args, **kwargs)
        finally:
            killer.armed = False

    monkeypatch.setattr(training, "_save_checkpoint", save)


def record_checkpoints(monkeypatch) -> dict:
    """step -> the scorer's weights at each checkpoint save of the run."""
    saved, original = {}, training._save_checkpoint

    def save(directory, model, *args, **kwargs):
        saved[args[2]] = scorer_weights(model)
        return original(directory, model, *args, **kwargs)

    monkeypatch.setattr(training, "_save_checkpoint", save)
    return saved


def checkpoint_run(folder, resume=False):
    model = make_model()
    batches = [labelled_batch(model, seed=0), labelled_batch(model, seed=1)]
    history = train_selector(model, batches, steps=3, config=fast_config(), checkpoint_dir=str(folder), save_every=1,
                             resume=resume)
    return model, history


def test_a_checkpoint_save_killed_at_any_point_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        snapshots = record_checkpoints(patch)
        straight, straight_history = checkpoint_run(tmp_path / "straight")
    final = scorer_weights(straight)
    with monkeypatch.context() as patch:
        counter = Killer(patch)
        kill_in_save(patch, counter, step=2)
        checkpoint_run(tmp_path / "counted")
    assert counter.calls >= 4, counter.calls

    reached = set()
    for at in range(1, counter.calls + 1):
        folder = tmp_path / f"killed{at}"
        with monkeypatch.context() as patch:
            killer = Killer(patch, at=at)
            kill_in_save(patch, killer, step=2)
            with pytest.raises(Crash):
                checkpoint_run(folder)
        # What a resumed run finds: the weights, optimizer state and step of one and the same save.
        found = recover_checkpoint(folder)
        assert found is not None, at
        step = torch.load(found / "trainer_state.pt", weights_only=True)["step"]
        assert step in (1, 2), (at, step)
        reached.add(step)
        assert same_weights(read_selector(found)[1], snapshots[step]), (at, step)
        resumed, history = checkpoint_run(folder, resume=True)
        assert same_weights(scorer_weights(resumed), final), (at, step)
        assert [h["loss"] for h in history] == [h["loss"] for h in straight_history], at
    assert reached == {1, 2}  # kills before the swap keep the old checkpoint, after it the new one


def test_write_selector_killed_at_any_point_leaves_the_old_or_the_new_selector(tmp_path, monkeypatch):
    config = {"method": "visionselector", "method_config": {"hidden_dim": 4}, "hidden_size": 8}
    old = {"scorer.key.weight": torch.zeros(4, 8), "scorer.key.bias": torch.zeros(4)}
    new = {"scorer.key.weight": torch.ones(4, 8), "scorer.key.bias": torch.ones(4)}
    write_selector(tmp_path / "counted", config, old)
    with monkeypatch.context() as patch:
        counter = Killer(patch)
        counter.armed = True
        write_selector(tmp_path / "counted", config, new)
    for at in range(1, counter.calls + 1):
        folder = tmp_path / f"killed{at}"
        write_selector(folder, config, old)
        with monkeypatch.context() as patch:
            killer = Killer(patch, at=at)
            killer.armed = True
            with pytest.raises(Crash):
                write_selector(folder, config, new)
        loaded_config, weights = read_selector(folder)
        assert loaded_config["method_config"] == {"hidden_dim": 4}
        assert same_weights(weights, old) or same_weights(weights, new), at
    write_selector(tmp_path / "clean", config, new)
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_a_checkpoint_whose_files_do_not_belong_together_is_refused(tmp_path):
    checkpoint_run(tmp_path / "run")
    other = make_model()
    vs.attach(other, retention=0.25)
    with torch.no_grad():
        for parameter in vs.get_method(other).parameters():
            parameter.add_(1.0)
    vs.save_selector(other, tmp_path / "run")  # weights of another run over this checkpoint's
    with pytest.raises(ValueError, match="not the ones its trainer state was saved with"):
        checkpoint_run(tmp_path / "run", resume=True)


# ---------------------------------------------------------------------------------------------
# Resuming with other settings


def short_run(folder, resume=False, attach_options=None, run_settings=None, **changes):
    model = make_model()
    if attach_options is not None:
        vs.attach(model, retention=0.25, **attach_options)
    return train_selector(model, [labelled_batch(model)], steps=changes.pop("steps", 2),
                          config=fast_config(**changes), checkpoint_dir=str(folder), resume=resume,
                          run_settings=run_settings)


def test_resume_names_every_setting_that_differs_from_the_checkpoint(tmp_path):
    short_run(tmp_path / "run", run_settings={"batch_size": 2, "data": "a.jsonl"})
    with pytest.raises(ValueError) as error:
        short_run(tmp_path / "run", resume=True, retention=0.5, learning_rate=2e-2, lambda_end=3.0, steps=3,
                  run_settings={"batch_size": 4, "data": "a.jsonl"})
    message = str(error.value)
    for line in ("retention: 0.25 -> 0.5", "learning_rate: 0.01 -> 0.02", "lambda_end: 2.0 -> 3.0",
                 "steps: 2 -> 3", "batch_size: 2 -> 4"):
        assert line in message, (line, message)
    assert "data:" not in message and "weight_decay" not in message
    assert "start a fresh run" in message and "--overwrite" in message


def test_resume_refuses_another_scorer_width_but_not_another_progress_setting(tmp_path):
    short_run(tmp_path / "run", attach_options={"hidden_dim": 8})
    with pytest.raises(ValueError, match=r"method_config: \{'hidden_dim': 8\} -> \{'hidden_dim': 16\}"):
        short_run(tmp_path / "run", resume=True, attach_options={"hidden_dim": 16})
    with pytest.raises(ValueError) as error:
        short_run(tmp_path / "run", resume=True, attach_options={"hidden_dim": 8}, weight_decay=0.1, max_grad_norm=0.5)
    assert "weight_decay: 0.0 -> 0.1" in str(error.value) and "max_grad_norm: 1.0 -> 0.5" in str(error.value)
    # hidden_dim given or left to its default: the same scorer, the same run. progress changes nothing.
    history = short_run(tmp_path / "run", resume=True, hidden_dim=8, progress=True)
    assert [h["step"] for h in history] == [1, 2]


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train_selector(model, [labelled_batch(model)], steps=2, config=fast_config(),
                       checkpoint_dir=str(tmp_path / "empty"), resume=True)
    assert not vs.is_attached(model)  # nothing was trained, so nothing stays attached
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        train_selector(model, [labelled_batch(model)], steps=2, config=fast_config(), resume=True)


def test_a_checkpoint_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    model = make_model()
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        train_selector(model, [labelled_batch(model)], steps=1, config=fast_config(),
                       checkpoint_dir=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# The caller's model state


def user_state(model) -> dict:
    state = get_state(model) if vs.is_attached(model) else None
    return {
        "grad": {name: p.requires_grad for name, p in model.named_parameters()
                 if not name.startswith("visual_token_selector.")},
        "modes": {name: m.training for name, m in model.named_modules()},
        "attached": None if state is None else (state.retention, state.training_retention,
                                                state.selection_loss_weight),
    }


def unusual_state(model) -> None:
    """Modes and trainable flags nobody would guess: each must come back as it was."""
    model.train()
    model.model.visual.eval()
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 3 != 0)


def test_training_an_attached_model_puts_its_state_back(tmp_path):
    model = make_model()
    vs.attach(model, retention=0.5, selection_loss_weight=0.3)
    unusual_state(model)
    before, weights = user_state(model), scorer_weights(model)
    train_selector(model, [labelled_batch(model)], steps=3, config=fast_config(retention=0.25))
    assert user_state(model) == before
    assert vs.get_method(model).training  # it was in train mode with the model: it is again
    assert not same_weights(scorer_weights(model), weights)  # what was learned stays
    vs.detach(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before["grad"]


def test_a_failing_batch_still_puts_the_state_back():
    model = make_model()
    vs.attach(model, retention=0.5, selection_loss_weight=0.3)
    unusual_state(model)
    before = user_state(model)
    broken = {k: v for k, v in labelled_batch(model).items() if k != "labels"}
    with pytest.raises(ValueError, match="need 'labels'"):
        train_selector(model, [labelled_batch(model), broken], steps=3, config=fast_config(retention=0.25))
    assert user_state(model) == before


def test_training_an_unattached_model_attaches_and_restores_the_rest():
    model = make_model()
    unusual_state(model)
    before = user_state(model)
    train_selector(model, [labelled_batch(model)], steps=2, config=fast_config())
    after = user_state(model)
    assert after["grad"] == before["grad"]
    assert {k: v for k, v in after["modes"].items() if not k.startswith("visual_token_selector")} == before["modes"]
    state = get_state(model)
    assert not state.method.training and (state.retention, state.training_retention) == (0.25, 0.25)


@pytest.mark.parametrize("field, value, message", [
    ("retention", 1.5, "retention must be in"),
    ("retention", 0.0, "retention must be in"),
    ("learning_rate", 0.0, "learning_rate must be a finite number > 0"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("warmup_ratio", 1.5, r"warmup_ratio must be a number in \[0, 1\]"),
    ("lambda_start", float("inf"), "lambda_start must be a finite number >= 0"),
    ("lambda_end", -1.0, "lambda_end must be a finite number >= 0"),
    ("max_grad_norm", -1.0, "max_grad_norm must be a finite number >= 0"),
    ("hidden_dim", 0, "hidden_dim must be None .* or an integer of at least 1"),
    ("hidden_dim", 2.5, "hidden_dim must be None .* or an integer of at least 1"),
])
def test_invalid_settings_are_refused_before_anything_changes(field, value, message):
    model = make_model()
    vs.attach(model, retention=0.5)
    before = user_state(model)
    with pytest.raises(ValueError, match=message):
        train_selector(model, [labelled_batch(model)], steps=1, config=fast_config(**{field: value}))
    assert user_state(model) == before
    fresh = make_model()
    with pytest.raises(ValueError, match=message):
        train_selector(fresh, [labelled_batch(fresh)], steps=1, config=fast_config(**{field: value}))
    assert not vs.is_attached(fresh)


# ---------------------------------------------------------------------------------------------
# The train command


@pytest.fixture(scope="module")
def reference():
    """The shipped reference model and its processor, with images resized to a 4 x 4 token grid."""
    from transformers import Qwen2VLImageProcessorPil

    from visionselector.models import load_model

    model, processor = load_model("reference")
    small = type(processor)(image_processor=Qwen2VLImageProcessorPil(min_pixels=112 * 112, max_pixels=112 * 112),
                            tokenizer=processor.tokenizer, chat_template=processor.chat_template)
    return model, small


@pytest.fixture
def train_command(reference, tmp_path, monkeypatch):
    """``run(out, **settings)`` runs ``visionselector train`` on six small examples; returns its result."""
    import numpy as np

    from visionselector.commands.train import TrainConfig, run_train
    from visionselector.data import batches as batches_module

    def pixels(path, where=""):  # images from their bytes, so the test needs no image library
        seed = int.from_bytes(hashlib.sha256(Path(path).read_bytes()).digest()[:4], "little")
        return np.random.RandomState(seed).randint(0, 256, (112, 112, 3), dtype=np.uint8)

    monkeypatch.setattr(batches_module, "load_image", pixels)
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for index in range(6):
        (data / f"image{index}.png").write_bytes(bytes([index]) * 64)
        lines.append(json.dumps({"image": f"image{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat digit is in the red box ?"},
            {"from": "gpt", "value": str(index)}]}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    model, processor = reference

    def run(out, **settings):
        settings = {"data": str(data / "train.jsonl"), "steps": 4, "batch_size": 2, "save_every": 2,
                    "learning_rate": 1e-2, "retention": 0.25, "progress": False, **settings}
        return run_train(TrainConfig(out=str(tmp_path / out), **settings), model=model, processor=processor,
                         print_fn=lambda *_: None)

    run.data = data / "train.jsonl"
    run.root = tmp_path
    return run


def selector_file(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / WEIGHTS_NAME)


def test_train_command_resume_needs_a_checkpoint(train_command):
    with pytest.raises(ValueError, match=r"--resume given but .*out[/\\]checkpoint holds no checkpoint"):
        train_command("out", resume=True)
    assert not (train_command.root / "out" / WEIGHTS_NAME).exists()


def test_train_command_refuses_to_resume_with_other_settings(train_command):
    stop = {"after": 2}
    original = training.set_selection_loss_weight

    def interrupt(model, weight):
        stop["after"] -= 1
        if stop["after"] < 0:
            raise KeyboardInterrupt
        return original(model, weight)

    training.set_selection_loss_weight = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train_command("out")
    finally:
        training.set_selection_loss_weight = original
    with pytest.raises(ValueError) as error:
        train_command("out", resume=True, batch_size=3, seed=1, learning_rate=2e-2, limit=5, cache_features=False)
    message = str(error.value)
    for line in ("batch_size: 2 -> 3", "seed: 0 -> 1", "learning_rate: 0.01 -> 0.02", "limit: None -> 5",
                 "cache_features: True -> False"):
        assert line in message, (line, message)
    # The settings known before the model loads are checked before it loads.
    from visionselector.commands.train import TrainConfig, run_train

    with pytest.raises(ValueError, match="batch_size: 2 -> 3"):
        run_train(TrainConfig(data=str(train_command.data), out=str(train_command.root / "out"), resume=True,
                              batch_size=3, model=str(train_command.root / "no-model-here"), progress=False),
                  print_fn=lambda *_: None)
    train_command.data.write_text(train_command.data.read_text().replace('"value": "1"', '"value": "7"'))
    with pytest.raises(ValueError, match="data_sha256: '"):
        train_command("out", resume=True)
    train_command.data.write_text(train_command.data.read_text().replace('"value": "7"', '"value": "1"'))
    # Settings that change nothing in the result may differ.
    resumed = train_command("out", resume=True, save_every=1, progress=True,
                            cache_dir=str(train_command.root / "elsewhere"))
    straight = train_command("straight")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert same_weights(selector_file(train_command.root / "out"), selector_file(train_command.root / "straight"))


def test_train_command_refuses_an_earlier_run_without_overwrite(train_command):
    out = train_command.root / "out"
    train_command("out")
    with pytest.raises(ValueError, match=r"already holds a checkpoint .* and a selector .*--resume.*--overwrite"):
        train_command("out")
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        train_command("out", resume=True, overwrite=True)

    # --overwrite removes the earlier run before training: a new run stopped at its first step leaves nothing old.
    original = training.set_selection_loss_weight

    def interrupt(model, weight):
        raise KeyboardInterrupt

    training.set_selection_loss_weight = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train_command("out", overwrite=True)
    finally:
        training.set_selection_loss_weight = original
    assert not (out / "checkpoint").exists() and not (out / WEIGHTS_NAME).exists()
    assert not (out / "training_log.json").exists() and (out / "cache").is_dir()  # the feature cache stays

    # A folder holding only a selector is refused too.
    model = make_model()
    vs.attach(model, retention=0.25)
    vs.save_selector(model, out)
    with pytest.raises(ValueError, match=r"already holds a selector"):
        train_command("out")
    assert train_command("out", overwrite=True)["history"][-1]["step"] == 4


def test_train_command_is_deterministic_and_leaves_the_model_as_it_was(train_command, reference):
    model = reference[0]
    before = user_state(model)
    first = train_command("first")
    assert user_state(model) == before and not vs.is_attached(model)
    second = train_command("second")
    assert [h["loss"] for h in first["history"]] == [h["loss"] for h in second["history"]]
    assert same_weights(selector_file(train_command.root / "first"), selector_file(train_command.root / "second"))
    third = train_command("third", cache_features=False)
    assert same_weights(selector_file(train_command.root / "first"), selector_file(train_command.root / "third"))
    assert [h["loss"] for h in third["history"]] == [h["loss"] for h in first["history"]]
