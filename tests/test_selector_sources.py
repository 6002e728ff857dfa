"""Selector sources: our folders, VisionSelector releases and AngelSlim scorers, local or by hub id."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionselector as vs
from visionselector.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from visionselector.cli import main as cli_main
from visionselector.presets import SampleSpec, synthetic_batch
from visionselector.selector_sources import load_selector

from conftest import full_embeddings, make_model
from hub_cache import add_to_hub_cache, offline_hub

SCORER = "visual.importance_scorer."
INDEX = "model.safetensors.index.json"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
SCORER_SHARD = SHARDS[1]
SAMPLES = [SampleSpec(images=[(8, 8)], prefix=2), SampleSpec(images=[(4, 12)], prefix=5),
           SampleSpec(images=[(4, 4)], videos=[(2, 4, 8)])]
RETENTION = 0.3


def released_scorer(width=64, hidden_dim=32, seed=5):
    """``TransformerScorer`` tensors as a release stores them: bfloat16, under their release names."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (torch.randn(shape, generator=generator) * 0.5).to(torch.bfloat16)

    return {f"{SCORER}q_proj.weight": draw(hidden_dim, width), f"{SCORER}q_proj.bias": draw(hidden_dim),
            f"{SCORER}k_proj.weight": draw(hidden_dim, width), f"{SCORER}k_proj.bias": draw(hidden_dim)}


def names_of_transformers_4_50(state_dict):
    """The tiny model's tensors under the names transformers 4.50 saved Qwen2.5-VL with:
    ``visual.*``, ``model.*`` (the language model) and ``lm_head.weight``."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.visual."):
            name = "visual." + name[len("model.visual."):]
        elif name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        renamed[name] = tensor.contiguous()
    return renamed


def write_release(folder, model, scorer, *, sharded=True):
    """A VisionSelector release: config.json, three shards (the scorer in the middle one with
    the merger) and the index; or one ``model.safetensors``."""
    folder.mkdir(parents=True)
    tensors = names_of_transformers_4_50(model.state_dict())
    visual = [name for name in tensors if name.startswith("visual.")]
    language = [name for name in tensors if not name.startswith("visual.")]
    assert "model.embed_tokens.weight" in language and "lm_head.weight" in language
    width = model.config.text_config.hidden_size
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "transformers_version": "4.50.0", "torch_dtype": "bfloat16", "hidden_size": width,
              "vision_config": {"out_hidden_size": width, "spatial_merge_size": 2}}
    (folder / "config.json").write_text(json.dumps(config))
    if not sharded:
        save_file({**tensors, **scorer}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    half = len(visual) // 2
    groups = [{n: tensors[n] for n in visual[:half]}, {**{n: tensors[n] for n in visual[half:]}, **scorer},
              {n: tensors[n] for n in language}]
    weight_map = {}
    for shard, group in zip(SHARDS, groups):
        save_file(group, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for group in groups for t in group.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def papers_scores(features, scorer):
    """``s_i = mean_j <q_i, k_j> / sqrt(h)`` the slow way, in float64: the N x N matrix, then the mean."""
    weights = {name[len(SCORER):]: tensor.double() for name, tensor in scorer.items()}
    x = features.double()
    queries = x @ weights["q_proj.weight"].T + weights["q_proj.bias"]  # [N, h]
    keys = x @ weights["k_proj.weight"].T + weights["k_proj.bias"]  # [N, h]
    attention = queries @ keys.T / math.sqrt(queries.shape[1])  # [N, N]
    return attention.mean(dim=1)


def expected_selection(model, batch, scorer, retention):
    """Per sample: the top ``max(1, floor(retention * N))`` of the paper's scores (ties to the
    lower index), in their original order, over the visual features the method sees."""
    with torch.no_grad():
        embeds, _, visual = full_embeddings(model, batch)
    selections = []
    for row in range(embeds.shape[0]):
        scores = papers_scores(embeds[row][visual[row]], scorer).tolist()
        budget = int(vs.token_budget(retention, torch.tensor([len(scores)]))[0])
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        boundary = scores[ranked[budget - 1]] - scores[ranked[budget]]
        assert boundary > 1e-6, "the test needs a clear gap between kept and dropped scores"
        selections.append(sorted(ranked[:budget]))
    return selections


def selection_with(selector, model=None, retention=RETENTION):
    model = model if model is not None else make_model()
    batch = synthetic_batch(model.config, SAMPLES, seed=3)
    vs.attach(model, retention=retention, selector=selector)
    with torch.no_grad():
        model(**batch)
    selection = [s.tolist() for s in vs.last_selection(model)]
    vs.detach(model)
    return selection, model, batch


def test_release_folder_keeps_the_top_k_of_the_papers_formula(tmp_path):
    model = make_model()
    scorer = released_scorer()
    release = write_release(tmp_path / "VisionSelector-Qwen2.5-VL-tiny", model, scorer)
    selection, model, batch = selection_with(release, model)
    assert selection == expected_selection(model, batch, scorer, RETENTION)
    assert [len(s) for s in selection] == [4, 3, 6]  # floor(0.3 * N) of 16, 12 and 4 + 16 tokens

    config, state_dict = load_selector(release)
    assert config["method"] == "visionselector" and config["method_config"] == {"hidden_dim": 32}
    assert config["hidden_size"] == 64 and config["model_family"] == "qwen2_5_vl"
    assert config["training_retention"] is None and SCORER_SHARD in config["source"]
    assert sorted(state_dict) == ["scorer.key.bias", "scorer.key.weight", "scorer.query.bias", "scorer.query.weight"]
    assert torch.equal(state_dict["scorer.query.weight"], scorer[f"{SCORER}q_proj.weight"])
    assert torch.equal(state_dict["scorer.key.bias"], scorer[f"{SCORER}k_proj.bias"])


def test_single_file_release_selects_the_same(tmp_path):
    model = make_model()
    scorer = released_scorer()
    sharded = write_release(tmp_path / "sharded", model, scorer)
    single = write_release(tmp_path / "single", model, scorer, sharded=False)
    assert selection_with(single)[0] == selection_with(sharded)[0]


def test_release_hub_id_needs_only_the_index_and_the_scorers_shard(tmp_path, monkeypatch):
    model = make_model()
    scorer = released_scorer()
    release = write_release(tmp_path / "release", model, scorer)
    published = tmp_path / "published"
    published.mkdir()
    for name in (INDEX, SCORER_SHARD):  # no config.json, no other shard
        (published / name).write_bytes((release / name).read_bytes())
    add_to_hub_cache(tmp_path / "cache", "JulietChoo/VisionSelector-Qwen2.5-VL-tiny", published)
    offline_hub(monkeypatch, tmp_path / "cache")

    selection, model, batch = selection_with("JulietChoo/VisionSelector-Qwen2.5-VL-tiny", model)
    assert selection == expected_selection(model, batch, scorer, RETENTION)
    assert selection == selection_with(release)[0]
    config, _ = load_selector("JulietChoo/VisionSelector-Qwen2.5-VL-tiny")
    assert config["model_family"] is None  # config.json was not in the cache


def test_hub_id_of_our_own_format(tmp_path, monkeypatch):
    model = make_model()
    vs.attach(model, retention=RETENTION, hidden_dim=16)
    with torch.no_grad():
        for parameter in vs.get_scorer(model).parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.5)
    vs.save_selector(model, tmp_path / "ours")
    vs.detach(model)
    add_to_hub_cache(tmp_path / "cache", "someone/tiny-selector", tmp_path / "ours")
    offline_hub(monkeypatch, tmp_path / "cache")
    assert selection_with("someone/tiny-selector")[0] == selection_with(tmp_path / "ours")[0]
    assert load_selector("someone/tiny-selector")[0] == load_selector(tmp_path / "ours")[0]


def test_hub_id_not_in_the_cache_is_named(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    offline_hub(monkeypatch, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="'JulietChoo/VisionSelector-Qwen2.5-VL-7B'.*hub cache"):
        vs.attach(make_model(), selector="JulietChoo/VisionSelector-Qwen2.5-VL-7B")


def test_release_for_another_width_names_both_widths(tmp_path):
    release = write_release(tmp_path / "release", make_model(), released_scorer(width=64))
    wider = make_model(hidden_size=96)
    with pytest.raises(ValueError, match="saved for hidden size 64, but this model's language model has hidden size 96"):
        vs.attach(wider, selector=release)
    assert not vs.is_attached(wider)


def test_folder_of_no_known_kind_lists_what_a_selector_can_be(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a selector")
    with pytest.raises(FileNotFoundError, match="none of the files of a selector.*save_selector.*"
                                                "VisionSelector release.*AngelSlim.*hub id"):
        vs.attach(make_model(), selector=tmp_path / "notes")
    with pytest.raises(ValueError, match="is a file; give the folder"):
        load_selector(tmp_path / "notes" / "README.md")


def test_release_without_a_scorer_or_with_bad_shapes(tmp_path):
    model = make_model()
    plain = write_release(tmp_path / "plain", model, {})
    with pytest.raises(ValueError, match=r"no VisionSelector scorer: no tensor named \*importance_scorer.q_proj"):
        load_selector(plain)

    bad_bias = released_scorer()
    bad_bias[f"{SCORER}k_proj.bias"] = torch.zeros(31, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"visual.importance_scorer.k_proj.bias \[31\] does not fit "
                                         r"visual.importance_scorer.k_proj.weight \[32, 64\]; expected \[h\] = \[32\]"):
        load_selector(write_release(tmp_path / "bias", model, bad_bias))

    disagree = released_scorer()
    disagree[f"{SCORER}k_proj.weight"] = torch.zeros(16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"query and key disagree: visual.importance_scorer.q_proj.weight \[32, 64\] "
                                         r"but visual.importance_scorer.k_proj.weight \[16, 64\]"):
        load_selector(write_release(tmp_path / "disagree", model, disagree))

    incomplete = released_scorer()
    del incomplete[f"{SCORER}q_proj.bias"]
    with pytest.raises(ValueError, match="but not visual.importance_scorer.q_proj.bias"):
        load_selector(write_release(tmp_path / "incomplete", model, incomplete))


def test_missing_scorer_shard_is_named(tmp_path):
    release = write_release(tmp_path / "release", make_model(), released_scorer())
    (release / SCORER_SHARD).unlink()
    (release / SHARDS[0]).unlink()  # other shards are never needed
    with pytest.raises(FileNotFoundError, match=f"in shard '{SCORER_SHARD}'.*does not hold that file"):
        load_selector(release)


def test_convert_command_writes_our_format_with_the_same_selection(tmp_path, capsys):
    model = make_model()
    scorer = released_scorer()
    release = write_release(tmp_path / "release", model, scorer)
    assert cli_main(["convert", str(release), str(tmp_path / "converted")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((tmp_path / "converted" / CONFIG_NAME).read_text())
    assert config["method"] == "visionselector" and config["hidden_size"] == 64
    assert config["method_config"] == {"hidden_dim": 32} and config["model_family"] == "qwen2_5_vl"
    assert "VisionSelector release" in config["source"]
    weights = load_file(str(tmp_path / "converted" / WEIGHTS_NAME))
    assert torch.equal(weights["scorer.query.weight"], scorer[f"{SCORER}q_proj.weight"])
    assert selection_with(tmp_path / "converted")[0] == selection_with(release)[0]

    assert cli_main(["convert", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "selector not found" in capsys.readouterr().err


def write_angelslim(folder, scorer, *, config=None, prefix=""):
    """A scorer folder as AngelSlim's token compressor reads it: config.json (class name and
    constructor arguments), the class's source file and one safetensors file."""
    folder.mkdir(parents=True)
    hidden_dim, width = scorer[f"{SCORER}q_proj.weight"].shape
    config = config if config is not None else {"architecture": "TransformerScorer", "in_features": width,
                                                "hidden_dim": hidden_dim}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "selector_scorer.py").write_text("raise RuntimeError('never run')\n")
    tensors = {prefix + name[len(SCORER):]: tensor for name, tensor in scorer.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("prefix", ["", "visual.importance_scorer.", "module."])
def test_angelslim_scorer_folder_selects_like_the_release(tmp_path, prefix):
    scorer = released_scorer()
    angelslim = write_angelslim(tmp_path / "angelslim", scorer, prefix=prefix)
    release = write_release(tmp_path / "release", make_model(), scorer)
    config, _ = load_selector(angelslim)
    assert config["hidden_size"] == 64 and config["method_config"] == {"hidden_dim": 32}
    assert selection_with(angelslim)[0] == selection_with(release)[0]


def test_angelslim_hub_id(tmp_path, monkeypatch):
    scorer = released_scorer()
    add_to_hub_cache(tmp_path / "cache", "AngelSlim/Tiny-Selector", write_angelslim(tmp_path / "angelslim", scorer))
    release = write_release(tmp_path / "release", make_model(), scorer)
    offline_hub(monkeypatch, tmp_path / "cache")
    assert selection_with("AngelSlim/Tiny-Selector")[0] == selection_with(release)[0]


def test_angelslim_folders_that_are_not_visionselectors_scorer(tmp_path):
    scorer = released_scorer()
    with pytest.raises(ValueError, match="'TextConditionedScorer' scorer; only TransformerScorer"):
        load_selector(write_angelslim(tmp_path / "v2", scorer, config={"architecture": "TextConditionedScorer"}))
    extra = {**scorer, f"{SCORER}text_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match="holds exactly"):
        load_selector(write_angelslim(tmp_path / "extra", extra))
    with pytest.raises(ValueError, match="says in_features=128, but the weights .* have in_features=64"):
        load_selector(write_angelslim(tmp_path / "width", scorer, config={"architecture": "TransformerScorer",
                                                                           "in_features": 128}))


def test_damaged_index_and_shard_are_named(tmp_path):
    release = write_release(tmp_path / "release", make_model(), released_scorer())
    shard = release / SCORER_SHARD
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"corrupt safetensors file .*{SCORER_SHARD}"):
        load_selector(release)
    (release / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=f"corrupt JSON file .*{INDEX}"):
        load_selector(release)
