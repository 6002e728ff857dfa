import json

import pytest
import torch

import visionselector as vs
from visionselector.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model, randomise_scorer


def test_save_and_load_round_trip_reproduces_the_selection(tmp_path):
    model = make_model()
    vs.attach(model, retention=0.25, hidden_dim=16)
    randomise_scorer(model, seed=9)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)])])
    with torch.no_grad():
        expected = model(**batch).logits
    selection = vs.last_selection(model)
    vs.save_selector(model, tmp_path / "sel")

    files = sorted(p.name for p in (tmp_path / "sel").iterdir())
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((tmp_path / "sel" / CONFIG_NAME).read_text())
    assert config["method"] == "visionselector" and config["hidden_size"] == 64
    assert config["method_config"] == {"hidden_dim": 16}
    assert config["training_retention"] == 0.25 and config["model_family"] == "qwen2_5_vl"
    # Only the scorer is written, never the MLLM.
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "sel" / WEIGHTS_NAME))
    assert sum(t.numel() for t in weights.values()) == 2 * (64 * 16 + 16)

    fresh = make_model()
    vs.attach(fresh, retention=0.25, selector=tmp_path / "sel")
    assert vs.get_scorer(fresh).hidden_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected)
    assert [s.tolist() for s in vs.last_selection(fresh)] == [s.tolist() for s in selection]


def test_selector_for_another_hidden_size_names_both_widths(tmp_path):
    model = make_model()
    vs.attach(model)
    vs.save_selector(model, tmp_path / "sel")
    wider = make_model(hidden_size=96)
    with pytest.raises(ValueError, match="hidden size 64.*hidden size 96"):
        vs.attach(wider, selector=tmp_path / "sel")


def test_missing_and_corrupt_selector_files(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match="not found"):
        vs.attach(model, selector=tmp_path / "absent")
    vs.attach(model)
    vs.save_selector(model, tmp_path / "sel")
    vs.detach(model)

    weights = tmp_path / "sel" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt selector weights"):
        vs.attach(model, selector=tmp_path / "sel")
    assert not vs.is_attached(model)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        vs.attach(model, selector=tmp_path / "sel")

    vs.attach(model)
    vs.save_selector(model, tmp_path / "sel")
    vs.detach(model)
    (tmp_path / "sel" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt selector config"):
        vs.attach(model, selector=tmp_path / "sel")
    (tmp_path / "sel" / CONFIG_NAME).write_text('{"method": "visionselector", "format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        vs.attach(model, selector=tmp_path / "sel")


def test_selector_weights_that_do_not_fit_are_rejected(tmp_path):
    model = make_model()
    vs.attach(model, hidden_dim=8)
    vs.save_selector(model, tmp_path / "sel")
    config_path = tmp_path / "sel" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["method_config"]["hidden_dim"] = 12
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        vs.attach(make_model(), selector=tmp_path / "sel")
    config["method"] = "random"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved for method 'random'"):
        vs.attach(make_model(), selector=tmp_path / "sel")


def test_from_pretrained_checkpoint_attaches_like_the_in_memory_model(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = make_model()
    model.save_pretrained(tmp_path / "mllm")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "mllm", dtype=torch.float32).eval()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)])])
    outputs = []
    for candidate in (model, loaded):
        vs.attach(candidate, retention=0.3)
        randomise_scorer(candidate, seed=2)
        with torch.no_grad():
            outputs.append((candidate(**batch).logits,
                            candidate.generate(**batch, max_new_tokens=4, do_sample=False),
                            [s.tolist() for s in vs.last_selection(candidate)]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
    assert outputs[0][2] == outputs[1][2]
