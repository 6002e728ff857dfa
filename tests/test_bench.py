"""The efficiency benchmark: its report, FLOP accounting and files (no timing is asserted)."""

import json

import pytest

from visionselector.eval.bench import BenchConfig, run_bench

from conftest import make_model


class _RecordingBar:
    """Stands in for the tqdm bar: what it was told."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.count, self.labels, self.closed = total, enabled, 0, [], False

    def set_postfix_str(self, text, refresh=True):
        self.labels.append(text)

    def update(self, count):
        self.count += count

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import visionselector.eval.bench as bench

    folder = tmp_path_factory.mktemp("bench")
    make_model(text_layers=4).save_pretrained(folder / "model")
    config = BenchConfig(model=str(folder / "model"), methods=("visionselector", "fastv"), retentions=(1.0, 0.5, 0.25),
                         image_size=64, repeats=1, warmup=1, new_tokens=2, out=str(folder / "out"))
    lines, bars = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "_progress_bar", lambda total, enabled: bars.append(_RecordingBar(total, enabled))
                      or bars[-1])
        result = run_bench(config, print_fn=lines.append)
    return result, lines, folder / "out", bars


def records_of(report, method):
    return {r["retention"]: r for r in report["records"] if r["method"] == method}


def test_report_has_every_variant_and_writes_files(report):
    result, lines, out, _ = report
    assert len(result["records"]) == 6
    assert json.loads((out / "bench.json").read_text())["records"] == result["records"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert any("of limit" in line for line in lines)
    assert result["visual_tokens_per_sample"] == 64


def test_flops_follow_the_kept_tokens(report):
    result, _, _, _ = report
    base = result["baseline"]["flops"]
    learned = records_of(result, "visionselector")
    assert learned[1.0]["flops"]["total"] == base["total"]  # retention 1 is a no-op: no scorer, same sequence
    for flops in [base] + [r["flops"] for r in result["records"]]:
        assert flops["vision_encoder"] + flops["scorer"] + flops["language_model"] == flops["total"]
    assert [learned[r]["tokens_kept"] for r in (1.0, 0.5, 0.25)] == [64, 32, 16]
    for retention in (0.5, 0.25):
        flops = learned[retention]["flops"]
        assert flops["vision_encoder"] == base["vision_encoder"]  # the encoder always sees the whole image
        assert 0 < flops["scorer"] and flops["language_model"] < base["language_model"]
        # The method's FLOPs exceed the limit's only by the scorer's.
        limit_total = base["total"] / learned[retention]["flop_limit_speedup"]
        assert flops["total"] - flops["scorer"] == pytest.approx(limit_total, rel=0.02)
    assert learned[0.25]["kv_cache_mib"] < learned[0.5]["kv_cache_mib"] < learned[1.0]["kv_cache_mib"]


def test_methods_pruning_inside_the_llm_have_no_pre_llm_limit(report):
    result, _, _, _ = report
    fastv = records_of(result, "fastv")
    assert fastv[0.5]["of_limit"] is None and records_of(result, "visionselector")[0.5]["of_limit"] is not None
    assert fastv[0.25]["flops"]["language_model"] < fastv[1.0]["flops"]["language_model"]


def test_progress_counts_every_variant_of_every_round_and_the_flop_pass(report):
    _, _, _, bars = report
    (bar,) = bars
    # Per round: the unpatched model, 3 limits (64, 32 and 16 tokens) and 2 methods x 3 retentions.
    per_round = 1 + 3 + 2 * 3
    assert bar.enabled and bar.total == (1 + 1 + 1) * per_round and bar.count == bar.total and bar.closed
    assert bar.labels[0] == "round 1/2 (warm-up): none" and "round 2/2: fastv r=0.25" in bar.labels
    assert "round 2/2: limit 16 tokens" in bar.labels and bar.labels[-1] == "FLOPs: fastv r=0.25"


def test_progress_can_be_turned_off_and_shows_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from visionselector.cli import build_parser
    from visionselector.eval.bench import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert build_parser().parse_args(["bench", "--no-progress"]).progress is False
    assert build_parser().parse_args(["bench"]).progress is True
    for stream, enabled, shown in ((Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = _progress_bar(4, enabled)
        bar.update(1)
        bar.close()
        assert ("benchmark" in stream.getvalue()) is shown


def test_bad_settings_fail_before_timing(tmp_path):
    with pytest.raises(ValueError, match="known methods"):
        run_bench(BenchConfig(model="qwen2.5-vl-7b", methods=("nope",)))
    with pytest.raises(ValueError, match="architecture preset"):
        run_bench(BenchConfig(model=str(tmp_path / "missing")))


def test_synthetic_prompts_use_only_the_models_own_ordinary_token_ids(tmp_path):
    """The shipped reference model has a 52-word vocabulary with its image id at 4: synthetic text
    must stay inside it and never hit a special id."""
    from visionselector.models import load_model
    from visionselector.presets import SampleSpec, synthetic_batch

    model, _ = load_model("reference", processor=False)
    config = model.config
    batch = synthetic_batch(config, [SampleSpec(images=[(4, 4)], prefix=40, suffix=40)] * 2, seed=1)
    ids = batch["input_ids"][batch["attention_mask"].bool()]
    text = ids[(ids != config.image_token_id) & (ids != config.vision_start_token_id)
               & (ids != config.vision_end_token_id)]
    special = {config.video_token_id, config.text_config.pad_token_id, config.text_config.bos_token_id,
               config.text_config.eos_token_id}
    assert int(text.max()) < config.text_config.vocab_size and not special & set(text.tolist())
    assert int((ids == config.image_token_id).sum()) == 2 * 4
    result = run_bench(BenchConfig(model="reference", methods=("random",), retentions=(1.0, 0.5), image_size=56,
                                   repeats=1, warmup=0, new_tokens=2, out=str(tmp_path / "out")),
                       print_fn=lambda *_: None)
    assert {r["retention"] for r in result["records"] if r["method"] == "random"} == {1.0, 0.5}


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3.5-27b"])
def test_presets_carry_the_published_widths_of_their_family(name):
    from visionselector.adapters import ADAPTERS
    from visionselector.presets import ARCHITECTURES, architecture_config

    spec = ARCHITECTURES[name]
    config = architecture_config(name, text_layers=2, vision_layers=2)
    assert config.model_type == spec["family"] and spec["family"] in ADAPTERS
    text = config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size,
            text.vocab_size, text.num_hidden_layers) == (spec["hidden_size"], spec["heads"], spec["kv_heads"],
                                                         spec["intermediate_size"], spec["vocab_size"], 2)
    assert config.vision_config.depth == 2 and config.vision_config.out_hidden_size == spec["hidden_size"]
    with pytest.raises(ValueError, match=f"{name} has {spec['text_layers']} decoder layers"):
        architecture_config(name, text_layers=spec["text_layers"] + 1)


def test_variants_with_options_are_timed_and_merging_costs_its_similarity(tmp_path):
    folder = tmp_path
    model = make_model(text_layers=2)
    model.save_pretrained(folder / "model")
    config = BenchConfig(model=str(folder / "model"), methods=("divprune", "divprune@merge=true"), retentions=(0.25,),
                         image_size=64, repeats=1, warmup=0, new_tokens=0, progress=False)
    result = run_bench(config, print_fn=lambda *_: None)
    plain, merged = records_of(result, "divprune")[0.25], records_of(result, "divprune@merge=true")[0.25]
    assert plain["tokens_kept"] == merged["tokens_kept"] == 16
    # The only extra products: each of the 64 tokens against the 16 kept ones, at the model's width.
    width = model.config.text_config.hidden_size
    assert merged["flops"]["total"] - plain["flops"]["total"] == 2 * 64 * 16 * width
    with pytest.raises(ValueError, match="no option 'merg'"):
        run_bench(BenchConfig(model=str(folder / "model"), methods=("divprune@merg=true",)))
