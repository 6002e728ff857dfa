"""The quality harness as a fair benchmark: method variants as rows, several learned methods in one run,
prefill FLOPs per record (checked against torch's FLOP counter) and the accuracy-vs-FLOPs plot."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

import visionselector as vs  # noqa: E402
from visionselector.data.batches import ExampleBatches, load_examples  # noqa: E402
from visionselector.eval.flops import decoder_flops, layer_flops, layer_lengths, sample_prefill_flops  # noqa: E402
from visionselector.eval.quality import (MethodVariant, evaluate_methods, parse_method_options,  # noqa: E402
                                         parse_method_spec, parse_method_specs, resolve_rows, selectors_by_method,
                                         write_results)
from visionselector.methods import base as methods_base  # noqa: E402
from visionselector.methods.visionselector import VisionSelectorMethod  # noqa: E402
from visionselector.models import load_model  # noqa: E402
from visionselector.ops.topk import token_budget  # noqa: E402
from visionselector.reference.task import write_split  # noqa: E402

from conftest import make_model  # noqa: E402

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    # torch counts the CUDA SDPA kernels; the CPU one gets the same formula (full L x L, QK^T and AV).
    return sdpa_flop_count(query, key, value)


def _mv_flops(matrix, vector, *args, out_shape=None, **kwargs):
    return 2 * matrix[0] * matrix[1]


def _counter():
    return FlopCounterMode(display=False, depth=None, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops, aten.mv: _mv_flops})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The shipped reference model, three DigitsVQA test examples and their per-example token counts."""
    model, processor = load_model("reference")
    examples = load_examples(write_split(tmp_path_factory.mktemp("harness"), "test", 3, progress=False))
    single = ExampleBatches(examples, processor, batch_size=1)
    counts = []
    for index in range(len(examples)):
        batch = single.batch([index])
        visual = int((batch["input_ids"] == model.config.image_token_id).sum())
        counts.append((int(batch["attention_mask"].sum()) - visual, visual))
    return model, processor, examples, counts


class TwinSelectorMethod(VisionSelectorMethod):
    """A second trainable method (the same scorer under another name)."""

    name = "twin_selector"
    description = "a second learned scorer, for tests"


@pytest.fixture
def twin(monkeypatch):
    """``twin_selector`` registered for one test only."""
    monkeypatch.setitem(methods_base._REGISTRY, TwinSelectorMethod.name, TwinSelectorMethod)
    return TwinSelectorMethod.name


def _save_selector(model, method, folder, seed):
    vs.attach(model, method=method, retention=0.2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vs.get_scorer(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    vs.save_selector(model, folder)
    vs.detach(model)
    return folder


# ---------------------------------------------------------------- rows and variants

def test_variant_specs_parse_to_a_method_and_its_checked_options():
    assert parse_method_spec("fastv") == MethodVariant("fastv", "fastv", {})
    assert parse_method_spec("fastv@layer=0") == MethodVariant("fastv@layer=0", "fastv", {"layer": 0})
    assert parse_method_spec("dart@layer=0,num_pivots=4") == MethodVariant(
        "dart@layer=0,num_pivots=4", "dart", {"layer": 0, "num_pivots": 4})
    assert parse_method_spec("visionzip@contextual_ratio=0.25").options == {"contextual_ratio": 0.25}
    rows = parse_method_specs(["fastv", "fastv@layer=0", "dart@num_pivots=2"], {"fastv": {"layer": 1}, "dart": {
        "layer": 0}})
    assert [(r.label, r.method, r.options) for r in rows] == [
        ("fastv", "fastv", {"layer": 1}), ("fastv@layer=0", "fastv", {"layer": 0}),
        ("dart@num_pivots=2", "dart", {"layer": 0, "num_pivots": 2})]
    # --method-options name the method of a variant row
    assert parse_method_options(["fastv.layer=1"], ["fastv@layer=0"]) == {"fastv": {"layer": 1}}


@pytest.mark.parametrize("spec, message", [
    ("nope@layer=0", r"unknown method 'nope' \(in 'nope@layer=0'\); known methods: .*fastv"),
    ("nope", "unknown method 'nope'; known methods: .*dart"),
    ("fastv@depth=0", r"method 'fastv' has no option 'depth' \(in 'fastv@depth=0'\); its options: layer"),
    ("uniform@seed=1", "method 'uniform' has no option 'seed'.*its options: none"),
    ("fastv@layer=-1", r"method row 'fastv@layer=-1': option 'layer' of method 'fastv' must be an integer in \[0, "),
    ("random@seed=1.5", "option 'seed' of method 'random' must be an integer"),
    ("fastv@layer", "'layer' is not OPTION=VALUE; a row is NAME@OPTION=VALUE"),
    ("fastv@", "'' is not OPTION=VALUE"),
    ("fastv@layer=0,", "'' is not OPTION=VALUE"),
    ("fastv@layer=0,layer=1", "sets option 'layer' twice"),
    ("", "a method row must be NAME or NAME@OPTION=VALUE"),
])
def test_bad_variant_specs_name_the_problem_and_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method_spec(spec)


def test_rows_given_twice_or_options_for_no_row_are_refused():
    with pytest.raises(ValueError, match="'fastv@layer=0' given more than once"):
        parse_method_specs(["fastv@layer=0", "dart", "fastv@layer=0"])
    with pytest.raises(ValueError, match="options given for 'dart', which is not evaluated; evaluated methods: fastv"):
        parse_method_specs(["fastv@layer=0"], {"dart": {"layer": 0}})
    with pytest.raises(ValueError, match="option 'seed' of method 'random'"):  # checked before any model is read
        evaluate_methods(None, None, [], methods=["random@seed=-3"])


def test_cli_checks_variants_before_loading_anything(tmp_path, capsys):
    from visionselector.cli import main

    assert main(["eval", "--data", str(tmp_path / "absent.jsonl"), "--methods", "fastv", "fastv@depth=0"]) == 2
    assert "no option 'depth'" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "absent.jsonl"), "--methods", "fastv@layer=x"]) == 2
    assert "option 'layer' of method 'fastv' must be an integer" in capsys.readouterr().err


# ---------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("which", ["reference", "tiny_gqa_eager", "tiny_gqa_sdpa"])
def test_analytic_prefill_flops_equal_torch_flop_counter(which, reference):
    """Text-only prefill (LM head on the last position, as generate's) at two lengths: the analytic
    count is exactly what FlopCounterMode counts for the whole forward."""
    model = {"reference": lambda: reference[0], "tiny_gqa_eager": lambda: make_model("eager"),
             "tiny_gqa_sdpa": lambda: make_model("sdpa")}[which]()
    text_config = model.config.get_text_config()
    if which != "reference":
        assert text_config.num_key_value_heads < text_config.num_attention_heads  # grouped-query attention
    for length in (9, 150):
        ids = torch.randint(3, 40, (1, length))
        with torch.no_grad(), _counter() as counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        layers = text_config.num_hidden_layers
        assert decoder_flops(text_config, [length] * layers) == counter.get_total_flops(), (which, length)
    # attention grows with the square of the length, projections and MLP linearly
    h, d = text_config.num_attention_heads, text_config.hidden_size // text_config.num_attention_heads
    assert layer_flops(text_config, 20) - 2 * layer_flops(text_config, 10) == 4 * h * d * (400 - 2 * 100)


def test_layer_lengths_follow_where_a_method_prunes():
    assert layer_lengths(4, 300, 80) == [80, 80, 80, 80]
    assert layer_lengths(4, 300, 80, prune_layer=0) == [300, 80, 80, 80]
    assert layer_lengths(4, 300, 80, prune_layer=2) == [300, 300, 300, 80]
    with pytest.raises(ValueError, match="has 3 entries; the language model has 2 decoder layers, one length each"):
        decoder_flops(make_model().config.get_text_config(), [10, 10, 10])


@pytest.mark.parametrize("spec", ["fastv@layer=1", "dart@layer=0", "divprune"])
def test_prefill_flops_of_a_pruned_forward_equal_the_counter(spec, reference):
    """One example's pruned prefill, counted by FlopCounterMode (without the vision encoder), equals the
    language model at the lengths its layers ran plus the method's selection_flops."""
    model, processor, examples, counts = reference
    row = parse_method_spec(spec)
    batch = ExampleBatches(examples, processor, batch_size=1).batch([1])
    text, visual = counts[1]
    with vs.attached(model, method=row.method, retention=0.2, **row.options), torch.no_grad():
        with _counter() as counter:
            model(**batch, logits_to_keep=1)
        kept = len(vs.last_selection(model)[0])
        method = vs.get_method(model)
        budget = int(token_budget(0.2, torch.tensor([visual]))[0])
        own = method.selection_flops(visual=visual, hidden=model.config.get_text_config().hidden_size,
                                     budget=budget, prompt=text)
    counted = counter.get_flop_counts()
    vision = sum(counted[f"{type(model).__name__}.model.visual"].values())
    expected = sample_prefill_flops(model.config.get_text_config(), text=text, visual=visual, kept=kept,
                                    prune_layer=method.prune_layer) + own
    assert kept == budget < visual and own > 0
    assert counter.get_total_flops() - vision == expected


def test_records_carry_variants_and_flops_relative_to_the_full_run(reference):
    model, processor, examples, counts = reference
    examples, counts = examples[:2], counts[:2]
    predictions = []
    records = evaluate_methods(model, processor, examples, methods=["fastv", "fastv@layer=0", "uniform"],
                               retentions=(1.0, 0.3), batch_size=2, progress=False, predictions=predictions)
    cells = {(r.method, r.retention): r for r in records}
    assert list(cells) == [(m, r) for m in ("fastv", "fastv@layer=0", "uniform") for r in (0.3, 1.0)]
    assert {r.base_method for r in records if r.method.startswith("fastv")} == {"fastv"}
    assert cells["fastv", 0.3].options == {} and cells["fastv@layer=0", 0.3].options == {"layer": 0}
    assert {p["method"] for p in predictions} == {"fastv", "fastv@layer=0", "uniform"}
    text_config = model.config.get_text_config()
    full = sum(sample_prefill_flops(text_config, text=t, visual=v, kept=v) for t, v in counts) / len(counts)
    for method in ("fastv", "fastv@layer=0", "uniform"):
        assert cells[method, 1.0].flops_ratio == 1.0 and cells[method, 1.0].selection_flops == 0
        assert cells[method, 1.0].prefill_flops == full
        assert cells[method, 0.3].flops_ratio < 1 and cells[method, 0.3].tokens_kept == 76
    # Pruning after layer 0 runs two fewer layers on every visual token than after layer 2 (the default).
    assert cells["fastv@layer=0", 0.3].flops_ratio < cells["fastv", 0.3].flops_ratio
    assert cells["fastv@layer=0", 0.3].prefill_flops != cells["fastv", 0.3].prefill_flops
    # Each record's mean is the per-example count, from each example's own unpadded token counts.
    method = methods_base.get_method_class("fastv")(text_config.hidden_size, layer=0)
    expected = sum(sample_prefill_flops(text_config, text=t, visual=v, kept=76, prune_layer=0)
                   + method.selection_flops(visual=v, hidden=text_config.hidden_size, budget=76, prompt=t)
                   for t, v in counts) / len(counts)
    assert cells["fastv@layer=0", 0.3].prefill_flops == pytest.approx(expected, rel=1e-12)
    assert cells["fastv@layer=0", 0.3].flops_ratio == pytest.approx(expected / full, rel=1e-12)
    # uniform prunes before the language model and selects for free: its FLOPs are the shorter sequence's
    assert cells["uniform", 0.3].selection_flops == 0
    assert cells["uniform", 0.3].prefill_flops == pytest.approx(sum(
        sample_prefill_flops(text_config, text=t, visual=v, kept=76) for t, v in counts) / len(counts))


# ---------------------------------------------------------------- several learned methods

def test_selectors_map_to_the_method_their_config_names(reference, twin, tmp_path, monkeypatch):
    from visionselector.commands.evaluate import _method_list

    model, processor, examples, _ = reference
    first = _save_selector(model, "visionselector", tmp_path / "a", seed=1)
    second = _save_selector(model, twin, tmp_path / "b", seed=2)
    other = _save_selector(model, "visionselector", tmp_path / "c", seed=3)
    assert selectors_by_method(first) == {"visionselector": first}  # one path, as before
    assert selectors_by_method([second, first]) == {twin: second, "visionselector": first}
    with pytest.raises(ValueError, match="selectors .*a and .*c are both for method 'visionselector'"):
        selectors_by_method([first, other])
    with pytest.raises(ValueError, match="is for method 'uniform', which is training-free"):
        selectors_by_method({"uniform": first})
    with pytest.raises(ValueError, match=f"method '{twin}' needs a trained selector.*selectors given are for "
                                         "visionselector"):
        resolve_rows(["visionselector", twin, "uniform"], selector=[first])
    with pytest.raises(ValueError, match="method 'visionselector' needs a trained selector"):
        resolve_rows(["uniform", "visionselector"])

    rows = _method_list(["all"], selectors_by_method([second, first]))
    free = [m for m in vs.list_methods() if not methods_base.get_method_class(m).trainable]
    assert rows == [twin, "visionselector"] + free
    assert _method_list(["all"], {}) == free and _method_list(["all", "fastv@layer=0", "fastv"], {}) == free + [
        "fastv@layer=0"]

    # In one run, every row of a learned method attaches that method's selector.
    attached = []
    original = vs.attached

    def spy(model, method="visionselector", retention=0.2, selector=None, **options):
        attached.append((method, selector, options))
        return original(model, method, retention, selector, **options)

    monkeypatch.setattr(vs, "attached", spy)
    records = evaluate_methods(model, processor, examples[:2], methods=[twin, "visionselector", "random@seed=3"],
                               retentions=(0.1,), selector=[first, second], batch_size=2, progress=False)
    assert attached == [(twin, second, {}), ("visionselector", first, {}), ("random", None, {"seed": 3})]
    assert [(r.method, r.base_method) for r in records] == [(twin, twin), ("visionselector", "visionselector"),
                                                            ("random@seed=3", "random")]
    assert all(0 < r.flops_ratio < 1 for r in records)


def test_cli_runs_variants_and_two_selectors_and_writes_the_flops_plot(reference, twin, tmp_path, capsys):
    from visionselector.cli import main

    model, _, _, _ = reference
    first = _save_selector(model, "visionselector", tmp_path / "a", seed=1)
    second = _save_selector(model, twin, tmp_path / "b", seed=2)
    data = write_split(tmp_path / "data", "test", 2, progress=False)
    out = tmp_path / "results"
    assert main(["eval", "--data", str(data), "--selector", str(first), str(second), "--methods", "visionselector",
                 twin, "dart@layer=0", "dart", "--method-options", "dart.num_pivots=2", "--retentions", "0.2", "1.0",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["base_method"], r["retention"]) for r in rows] == [
        (m, b, r) for m, b in (("visionselector", "visionselector"), (twin, twin), ("dart@layer=0", "dart"),
                               ("dart", "dart")) for r in (0.2, 1.0)]
    by = {(r["method"], r["retention"]): r for r in rows}
    assert by["dart@layer=0", 0.2]["options"] == {"layer": 0, "num_pivots": 2}
    assert by["dart", 0.2]["options"] == {"num_pivots": 2}
    assert by["dart@layer=0", 0.2]["flops_ratio"] < by["dart", 0.2]["flops_ratio"] < 1
    assert all(r["flops_ratio"] == 1.0 for r in rows if r["retention"] == 1.0)
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy_vs_flops.png" in printed and "% of the full-token run" in printed
    table = (out / "results.md").read_text()
    assert "# Prefill FLOPs per sample" in table and "| dart@layer=0 |" in table


def test_write_results_draws_the_pareto_view_and_tables_flops(tmp_path):
    from visionselector.eval.quality import QualityRecord, format_table

    records = [QualityRecord("fastv@layer=0", r, a, 25.0, 256.0, 1.0, 4, prefill_flops=f * 1e9, selection_flops=0.0,
                             flops_ratio=f) for r, a, f in ((0.1, 0.5, 0.3), (1.0, 0.9, 1.0))]
    records.append(QualityRecord("uncounted", 0.1, 0.4, 25.0, 256.0, 1.0, 4))  # NaN FLOPs: left out, shown n/a
    paths = write_results(records, tmp_path)
    assert paths["flops_plot"] == tmp_path / "accuracy_vs_flops.png"
    assert paths["flops_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert records[0].base_method == "fastv" and records[2].base_method == "uncounted"
    assert format_table(records, "flops_ratio").splitlines()[2:] == ["| fastv@layer=0 | 30.0 | 100.0 |",
                                                                    "| uncounted | n/a |  |"]
    assert json.loads(paths["json"].read_text())[2]["flops_ratio"] is None
