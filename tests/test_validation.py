"""Bad values are refused where they enter, with the name of what is wrong and what is valid:
method options at attach, retentions, budgets, selector configs, loss weights, command-line
settings and conversation JSONL."""

import dataclasses
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import visionselector as vs
from visionselector.api import get_state
from visionselector.cli import main
from visionselector.methods import get_method_class, list_methods
from visionselector.methods.base import (
    SelectionMethod, check_options, method_options, option_help, register_method,
)
from visionselector.ops.topk import token_budget, validate_loss_weight, validate_retention
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def clean(model):
    """The shared tiny model, with nothing attached before or after the test."""
    if vs.is_attached(model):
        vs.detach(model)
    yield model
    if vs.is_attached(model):
        vs.detach(model)


# ---------------------------------------------------------------- 1. method options at attach

BAD_OPTIONS = [
    ("random", "seed", 2**64), ("random", "seed", 2**70), ("random", "seed", -1), ("random", "seed", 1.7),
    ("random", "seed", 2.0), ("random", "seed", True), ("random", "seed", "3"), ("random", "seed", None),
    ("random", "seed", np.float64(2.0)), ("random", "seed", torch.tensor(3)),
    ("fastv", "layer", -1), ("fastv", "layer", 1.0), ("fastv", "layer", False), ("fastv", "layer", 2**63),
    ("fastv", "layer", None), ("fastv", "layer", "0"),
    ("dart", "layer", -1), ("dart", "layer", 0.5), ("dart", "layer", True),
    ("dart", "num_pivots", 0), ("dart", "num_pivots", 2.5), ("dart", "num_pivots", True),
    ("dart", "num_pivots", -3), ("dart", "num_pivots", 2**63), ("dart", "num_pivots", np.float32(4)),
    ("visionzip", "contextual_ratio", 1.0), ("visionzip", "contextual_ratio", 1),
    ("visionzip", "contextual_ratio", -0.1),
    ("visionzip", "contextual_ratio", float("nan")), ("visionzip", "contextual_ratio", float("inf")),
    ("visionzip", "contextual_ratio", "0.2"), ("visionzip", "contextual_ratio", True),
    ("visionzip", "contextual_ratio", None), ("visionzip", "contextual_ratio", 10**400),
    ("visionselector", "hidden_dim", 0), ("visionselector", "hidden_dim", 8.0), ("visionselector", "hidden_dim", True),
    ("visionselector", "hidden_dim", "8"), ("visionselector", "hidden_dim", -2),
    ("visionselector", "init_std", 0.0), ("visionselector", "init_std", -1e-4),
    ("visionselector", "init_std", float("nan")), ("visionselector", "init_std", float("inf")),
    ("visionselector", "init_std", True), ("visionselector", "init_std", "0.1"), ("visionselector", "init_std", None),
    ("visionselector", "diversity", -0.1), ("visionselector", "diversity", 1.5), ("visionselector", "diversity", None),
    ("visionselector", "diversity", float("nan")), ("visionselector", "diversity", "0.5"),
    ("visionselector_q", "hidden_dim", 0), ("visionselector_q", "hidden_dim", 2.0),
    ("visionselector_q", "init_std", 0.0), ("visionselector_q", "init_std", float("inf")),
    ("visionselector_q", "image_score", 1), ("visionselector_q", "image_score", "false"),
    ("visionselector_q", "image_score", None),
    ("visionselector_q", "diversity", 1.01), ("visionselector_q", "diversity", -1e-9), ("visionselector_q", "diversity", True),
    ("visionselector", "focus", 0.0), ("visionselector", "focus", 1.5), ("visionselector", "focus", None),
    ("visionselector_q", "focus", -0.05), ("visionselector_q", "focus", float("inf")), ("visionselector_q", "focus", "0.05"),
    ("cdpruner", "theta", 1.0), ("cdpruner", "theta", -0.1), ("cdpruner", "theta", float("nan")),
    ("cdpruner", "theta", "0.5"),
    ("divprune", "merge", 1), ("divprune", "merge", "true"), ("cdpruner", "merge", None),
    ("visionselector", "merge", 0), ("visionselector_q", "merge", "yes"),
    ("visionselector", "context", "even"), ("visionselector", "context", 1), ("visionselector_q", "context", None),
    ("visionselector_q", "context", "Grid"),
]


@pytest.mark.parametrize("method, option, value", BAD_OPTIONS, ids=lambda v: repr(v)[:24])
def test_bad_option_values_fail_at_attach_naming_the_option(clean, method, option, value):
    with pytest.raises(ValueError, match=f"option '{option}' of method '{method}' must be "):
        vs.attach(clean, method=method, retention=0.5, **{option: value})
    assert not vs.is_attached(clean)


def test_every_option_of_every_method_is_covered_by_the_bad_value_matrix():
    covered = {(method, option) for method, option, _ in BAD_OPTIONS}
    declared = {(name, option) for name in list_methods() for option in method_options(get_method_class(name))}
    assert declared == covered


@pytest.mark.parametrize("method", ["uniform", "pool"])
def test_methods_without_options_refuse_any(clean, method):
    with pytest.raises(TypeError, match="unknown option.*'seed'.*accepted options: none"):
        vs.attach(clean, method=method, retention=0.5, seed=1)


@pytest.mark.parametrize("method, options, expected", [
    ("random", {"seed": np.int64(7)}, {"seed": 7}),
    ("random", {"seed": 2**64 - 1}, {"seed": 2**64 - 1}),
    ("random", {"seed": np.uint64(2**64 - 1)}, {"seed": 2**64 - 1}),
    ("fastv", {"layer": np.int32(0)}, {"layer": 0}),
    ("dart", {"layer": np.int64(0), "num_pivots": np.int16(3)}, {"layer": 0, "num_pivots": 3}),
    ("visionzip", {"contextual_ratio": 0}, {"contextual_ratio": 0.0}),
    ("visionzip", {"contextual_ratio": np.float32(0.25)}, {"contextual_ratio": 0.25}),
    ("visionselector", {"hidden_dim": np.int64(8), "init_std": 1}, {"hidden_dim": 8}),
])
def test_good_values_are_accepted_as_plain_python_numbers(clean, method, options, expected):
    vs.attach(clean, method=method, retention=0.5, **options)
    config = vs.get_method(clean).config_dict()
    assert config == expected
    assert all(type(value) is type(expected[name]) for name, value in config.items())
    json.dumps(config)  # saved selectors store it as JSON
    batch = synthetic_batch(clean.config, [SampleSpec(images=[(8, 8)])])  # 16 visual tokens
    with torch.no_grad():
        clean(**batch)  # and the first forward runs with them
    assert len(vs.last_selection(clean)[0]) == 8


def test_method_constructors_check_their_options_too():
    random_method = get_method_class("random")
    with pytest.raises(ValueError, match="option 'seed' of method 'random'"):
        random_method(8, seed=1.7)
    with pytest.raises(ValueError, match="option 'num_pivots' of method 'dart'"):
        get_method_class("dart")(8, num_pivots=2.5)
    with pytest.raises(ValueError, match="ImportanceScorer hidden_dim must be an integer"):
        vs.ImportanceScorer(8, 2.5)
    assert random_method(8, seed=np.int64(3)).seed == 3


def test_a_saved_selector_reloads_its_checked_options(clean, tmp_path):
    vs.attach(clean, retention=0.25, hidden_dim=np.int64(8))
    vs.save_selector(clean, tmp_path / "selector")
    vs.detach(clean)
    saved = json.loads((tmp_path / "selector" / "selector_config.json").read_text())
    assert saved["method_config"] == {"hidden_dim": 8}
    vs.attach(clean, retention=0.25, selector=tmp_path / "selector")
    assert vs.get_scorer(clean).hidden_dim == 8


def test_option_listing_keeps_defaults_and_gives_help_with_the_valid_range():
    assert method_options(get_method_class("dart")) == {"layer": 2, "num_pivots": 8}
    assert method_options(get_method_class("visionselector")) == {"hidden_dim": None, "init_std": 1e-4, "diversity": 0.0,
                                                                  "focus": 1.0, "context": "grid", "merge": False}
    assert method_options(get_method_class("visionselector_q")) == {
        "hidden_dim": None, "init_std": 1e-4, "image_score": True, "diversity": 0.0, "focus": 1.0, "context": "grid",
        "merge": False}
    assert method_options(get_method_class("divprune")) == {"merge": False}
    assert option_help(get_method_class("visionselector"))["diversity"].endswith("(a finite number in [0, 1])")
    assert option_help(get_method_class("visionselector_q"))["focus"].endswith("(a finite number in (0, 1])")
    assert method_options(get_method_class("uniform")) == {}
    assert option_help(get_method_class("random"))["seed"].endswith("(an integer in [0, 2**64))")
    assert option_help(get_method_class("visionzip"))["contextual_ratio"].endswith("(a finite number in [0, 1))")


def test_a_method_whose_constructor_and_options_disagree_is_not_registered():
    @dataclasses.dataclass
    class Options:
        width: int = dataclasses.field(default=3, metadata={"help": "a width", "at_least": 1})

    class Mismatched(SelectionMethod):
        name = "mismatched_options"
        description = "a test method"
        options_class = Options

        def __init__(self, hidden_size: int, width: int = 4) -> None:
            super().__init__(hidden_size)

    class Undeclared(SelectionMethod):
        name = "undeclared_options"
        description = "a test method"

        def __init__(self, hidden_size: int, width: int = 3) -> None:
            super().__init__(hidden_size)

    for cls in (Mismatched, Undeclared):
        with pytest.raises(TypeError, match="declare every option in both"):
            register_method(cls)
        assert cls.name not in list_methods()


def test_eval_method_options_are_checked_for_type_and_range():
    from visionselector.eval.quality import parse_method_options

    for item, option in [("random.seed=1.5", "seed"), ("random.seed=-1", "seed"), ("dart.num_pivots=0", "num_pivots"),
                         ("visionzip.contextual_ratio=1", "contextual_ratio"), ("fastv.layer=true", "layer"),
                         ("visionzip.contextual_ratio=nan", "contextual_ratio"), ("dart.layer=none", "layer")]:
        with pytest.raises(ValueError, match=f"option '{option}' of method '{item.split('.')[0]}' must be"):
            parse_method_options([item], ["random", "dart", "visionzip", "fastv"])
    assert parse_method_options(["visionselector.hidden_dim=none", "visionzip.contextual_ratio=0"],
                                ["visionselector", "visionzip"]) == {
        "visionselector": {"hidden_dim": None}, "visionzip": {"contextual_ratio": 0.0}}


def test_evaluate_methods_checks_options_before_the_full_token_run():
    from visionselector.eval.quality import evaluate_methods

    with pytest.raises(ValueError, match="option 'seed' of method 'random'"):
        evaluate_methods(None, None, [], methods=["random"], method_options={"random": {"seed": 0.5}})


def test_check_options_normalises_and_names_unknown_options():
    assert check_options(get_method_class("visionzip"), {"contextual_ratio": np.float64(0.5)}) == {
        "contextual_ratio": 0.5}
    with pytest.raises(TypeError, match="accepted options: layer, num_pivots"):
        check_options(get_method_class("dart"), {"pivots": 2})


# ---------------------------------------------------------------- 2. retention values

@pytest.mark.parametrize("value, expected", [
    (np.float32(0.3), 0.3), (np.float64(0.25), 0.25), (np.int64(1), 1.0), (torch.tensor(0.3), 0.3),
    (torch.tensor(0.29, dtype=torch.float16), 0.29), (torch.tensor(1), 1.0), (np.array(0.5), 0.5),
    (torch.tensor(0.125, dtype=torch.float64), 0.125),
])
def test_retention_accepts_numpy_scalars_and_0d_tensors(value, expected):
    assert validate_retention(value) == expected and type(validate_retention(value)) is float


@pytest.mark.parametrize("bad", [
    np.bool_(True), torch.tensor(True), torch.tensor([0.3]), torch.tensor([0.3, 0.5]), np.array([0.3]),
    torch.tensor(float("nan")), np.float64(1.5), np.float32(0.0), torch.tensor(-0.2), "0.3", b"0.3", [0.3],
    torch.tensor(0.3 + 0.1j), None, False,
])
def test_retention_rejects_what_is_not_one_number_in_range(bad):
    with pytest.raises(ValueError, match=r"retention must be (a number )?in \(0, 1\]"):
        validate_retention(bad)


def test_retention_of_numpy_and_tensor_types_reaches_attach_set_retention_and_the_budget(clean):
    vs.attach(clean, method="uniform", retention=np.float32(0.3))
    assert get_state(clean).retention == 0.3
    vs.set_retention(clean, torch.tensor(0.5))
    assert get_state(clean).retention == 0.5
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vs.set_retention(clean, torch.tensor([0.5]))
    # A float32 0.29 is 0.28999999165... as a double; it means 0.29 like the Python float.
    assert token_budget(np.float32(0.29), torch.tensor([100])).tolist() == [29]
    assert token_budget(torch.tensor(0.29), torch.tensor([100])).tolist() == [29]


# ---------------------------------------------------------------- 3. the budget formula

def _reference_budget(retention: float, count: int) -> int:
    if count == 0:
        return 0
    return max(1, math.floor(Fraction(repr(float(retention))) * count))


@pytest.mark.parametrize("retention, counts, expected", [
    (0.99999995, [10], [9]),  # floor(9.9999995) is 9, however close to 10
    (0.29, [100], [29]),  # the float product is 28.999999999999996
    (0.1, [30], [3]),  # the float product is 3.0000000000000004
    (0.3333333333333333, [3, 300, 0], [1, 99, 0]),  # 0.9999999999999999 -> 0 -> at least 1
    (1 / 3, [3000000], [999999]),
    (0.7, [10, 1000000], [7, 700000]),
    (1e-300, [5], [1]),
    (0.5, [2**62 + 1], [2**61]),
    (0.3, [2**62], [(3 * 2**62) // 10]),
    (0.1234567890123, [10**12], [123456789012]),
])
def test_token_budget_is_the_exact_floor_of_the_written_decimal(retention, counts, expected):
    assert token_budget(retention, torch.tensor(counts)).tolist() == expected


def test_token_budget_matches_exact_arithmetic_on_random_retentions_and_counts():
    generator = random.Random(0)
    retentions = [generator.random() for _ in range(300)]  # 16-17 digit decimals: the per-sample path
    retentions += [generator.randint(1, 10**d) / 10**d for d in (1, 2, 3, 4, 6, 8, 9) for _ in range(60)]
    retentions += [0.05, 0.1, 0.2, 0.29, 0.3, 0.57, 0.99999995, 1e-9, 1.0]
    for retention in retentions:
        if retention == 0:
            continue
        counts = [0, 1, 2, 3, 7, 10, 100] + [generator.randint(0, 10**6) for _ in range(8)]
        assert token_budget(retention, torch.tensor(counts)).tolist() == [
            _reference_budget(retention, n) for n in counts], retention


# ---------------------------------------------------------------- 4. selector configs

@pytest.fixture(scope="module")
def saved_selector(model, tmp_path_factory):
    if vs.is_attached(model):
        vs.detach(model)
    vs.attach(model, retention=0.25, hidden_dim=8)
    folder = tmp_path_factory.mktemp("selector") / "good"
    vs.save_selector(model, folder)
    vs.detach(model)
    return folder


def _with_config(saved_selector, tmp_path, **changes):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "selector.safetensors").write_bytes((saved_selector / "selector.safetensors").read_bytes())
    config = json.loads((saved_selector / "selector_config.json").read_text())
    for name, value in changes.items():
        if value is _ABSENT:
            config.pop(name)
        else:
            config[name] = value
    (folder / "selector_config.json").write_text(json.dumps(config))
    return folder


_ABSENT = object()


@pytest.mark.parametrize("field, value", [
    ("hidden_size", "64"), ("hidden_size", True), ("hidden_size", 64.0), ("hidden_size", 0), ("hidden_size", None),
    ("hidden_size", _ABSENT), ("method", 3), ("method", ""), ("method_config", [8]), ("method_config", "8"),
    ("model_family", 5), ("model_class", ["Qwen"]), ("training_retention", "0.2"), ("training_retention", 1.5),
    ("training_retention", True), ("training_retention", 0),
], ids=lambda v: repr(v)[:20])
def test_selector_config_fields_of_the_wrong_type_are_named(clean, saved_selector, tmp_path, field, value):
    from visionselector.selector_sources import load_selector

    folder = _with_config(saved_selector, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"'{field}'") as error:
        load_selector(folder)
    assert str(folder) in str(error.value)
    with pytest.raises(ValueError, match=f"'{field}'") as error:
        vs.attach(clean, retention=0.25, selector=folder)
    assert "saved for hidden size" not in str(error.value) and not vs.is_attached(clean)


def test_selector_options_of_the_wrong_type_name_the_selector_and_the_option(clean, saved_selector, tmp_path):
    folder = _with_config(saved_selector, tmp_path, method_config={"hidden_dim": "8"})
    with pytest.raises(ValueError, match=r"selector at .*bad: its method_config does not fit method 'visionselector': "
                                         r"option 'hidden_dim' of method 'visionselector' must be an integer"):
        vs.attach(clean, retention=0.25, selector=folder)


def test_a_good_selector_config_still_loads(clean, saved_selector, tmp_path):
    folder = _with_config(saved_selector, tmp_path, training_retention=1, model_class=None)
    vs.attach(clean, retention=0.25, selector=folder)
    assert vs.get_scorer(clean).hidden_dim == 8


# ---------------------------------------------------------------- 5. loss weight

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5, -1, True, False, "1", None,
                                 torch.tensor([1.0, 2.0]), np.array([0.5]), 10**400])
def test_selection_loss_weight_must_be_a_finite_number_at_least_zero(clean, bad):
    with pytest.raises(ValueError, match="selection_loss_weight must be a finite number >= 0"):
        validate_loss_weight(bad)
    vs.attach(clean, retention=0.5)
    with pytest.raises(ValueError, match="selection_loss_weight must be a finite number >= 0"):
        vs.set_selection_loss_weight(clean, bad)
    assert get_state(clean).selection_loss_weight == 1.0


@pytest.mark.parametrize("good, expected", [(0, 0.0), (2, 2.0), (0.25, 0.25), (np.float32(0.5), 0.5),
                                            (torch.tensor(0.75), 0.75), (np.int64(3), 3.0)])
def test_selection_loss_weight_accepts_numbers(clean, good, expected):
    vs.attach(clean, retention=0.5)
    vs.set_selection_loss_weight(clean, good)
    assert get_state(clean).selection_loss_weight == expected
    assert type(get_state(clean).selection_loss_weight) is float


# ---------------------------------------------------------------- 6. the command line

@pytest.fixture
def paths(tmp_path):
    """A JSONL file any command can read, a plain file to put outputs under, and a model path that
    does not exist (so that a check that is missing fails fast instead of loading a model)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
                    + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"data": str(data), "file": str(blocker), "under_file": str(blocker / "out"),
            "model": str(tmp_path / "no-model"), "dir": str(tmp_path)}


CLI_CASES = [
    # bench: every count, the device, threads and the output, before any model is built
    (["bench", "--batch-size", "0"], "batch_size"),
    (["bench", "--batch-size", "-3"], "batch_size"),
    (["bench", "--repeats", "0"], "repeats"),
    (["bench", "--warmup", "-1"], "warmup"),
    (["bench", "--new-tokens", "-1"], "new_tokens"),
    (["bench", "--image-size", "0"], "image_size"),
    (["bench", "--frames", "-2"], "frames"),
    (["bench", "--prompt-tokens", "-1"], "prompt_tokens"),
    (["bench", "--text-layers", "0"], "text_layers"),
    (["bench", "--vision-layers", "-1"], "vision_layers"),
    (["bench", "--seed", "-1"], "seed"),
    (["bench", "--threads", "0"], "threads"),
    (["bench", "--threads", "-2"], "threads"),
    (["bench", "--device", "gpu"], "device must be cpu, cuda, cuda:N"),
    (["bench", "--device", "cuda:x"], "device must be cpu, cuda, cuda:N"),
    (["bench", "--device", "mps"], "device must be cpu, cuda, cuda:N"),
    (["bench", "--device", "cuda:999"], "cuda:999"),
    (["bench", "--dtype", "float8"], "dtype must be one of"),
    (["bench", "--out", "{file}"], "is a file"),
    (["bench", "--out", "{under_file}"], "is a file"),
    (["bench", "--retentions", "0"], r"(0, 1]"),
    # eval: options, counts, threads and the output, before the examples or the model load
    (["eval", "--data", "{data}", "--methods", "random", "--method-options", "random.seed=1.5"], "option 'seed'"),
    (["eval", "--data", "{data}", "--methods", "dart", "--method-options", "dart.num_pivots=0"], "option 'num_pivots'"),
    (["eval", "--data", "{data}", "--methods", "visionzip", "--method-options", "visionzip.contextual_ratio=1"],
     "option 'contextual_ratio'"),
    (["eval", "--data", "{data}", "--methods", "fastv", "--method-options", "fastv.layer=-1"], "option 'layer'"),
    (["eval", "--data", "{data}", "--threads", "0"], "threads"),
    (["eval", "--data", "{data}", "--batch-size", "0"], "batch_size"),
    (["eval", "--data", "{data}", "--limit", "0"], "limit"),
    (["eval", "--data", "{data}", "--max-new-tokens", "0"], "max_new_tokens"),
    (["eval", "--data", "{data}", "--out", "{under_file}"], "is a file"),
    # show
    (["show", "--data", "{data}", "--method", "uniform", "--out", "{under_file}"], "is a file"),
    (["show", "--data", "{data}", "--method", "uniform", "--out", "{dir}"], "is a folder"),
    (["show", "--data", "{data}", "--method", "uniform", "--max-new-tokens", "0"], "max_new_tokens"),
    (["show", "--data", "{data}", "--method", "uniform", "--index", "-1"], "--index"),
    # demo: every count before minutes of data writing and training
    (["demo", "--threads", "0"], "threads"),
    (["demo", "--out", "{under_file}"], "is a file"),
    (["demo", "--train-samples", "0"], "train_samples"),
    (["demo", "--test-samples", "0"], "test_samples"),
    (["demo", "--batch-size", "0"], "batch_size"),
    (["demo", "--epochs", "0"], "epochs"),
    (["demo", "--learning-rate", "-1"], "learning_rate"),
    (["demo", "--learning-rate", "nan"], "learning_rate"),
    (["demo", "--show-examples", "-1"], "show_examples"),
    (["demo", "--show-examples", "999"], "show_examples"),
    (["demo", "--seed", "-1"], "seed"),
    # convert, train and train-reference: outputs and threads
    (["convert", "{dir}", "{under_file}"], "is a file"),
    (["train", "--data", "{data}", "--threads", "0"], "threads"),
    (["train", "--data", "{data}", "--out", "{under_file}"], "is a file"),
    (["train", "--data", "{data}", "--cache-dir", "{under_file}"], "feature cache folder"),
    (["train-reference", "--threads", "-1"], "threads"),
    (["train-reference", "--out", "{under_file}"], "is a file"),
]


@pytest.mark.parametrize("argv, expected", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_command_line_mistakes_exit_2_with_one_error_line(paths, capsys, argv, expected):
    argv = [part.format(**paths) for part in argv]
    if argv[0] in ("bench", "eval", "show", "demo", "train"):
        argv += ["--model", paths["model"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected in err


def test_parse_device_names_what_is_valid():
    from visionselector.commands.common import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:-1", "cpu:3", "", "meta", 0):
        with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N"):
            parse_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            parse_device("cuda:0")


# ---------------------------------------------------------------- 8. conversation JSONL values

GOOD_TURNS = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize("key, value, shown", [
    ("image", None, "got null"), ("image", 3, "got 3"), ("image", {"path": "a.png"}, 'got {"path": "a.png"}'),
    ("image", "", 'got ""'), ("image", [None], "got null as item 0"), ("image", ["a.png", 3], "got 3 as item 1"),
    ("image", True, "got true"), ("video", None, "got null"), ("video", 5, "got 5"),
    ("video", [""], 'got "" as item 0'),
])
def test_image_and_video_fields_must_be_paths(tmp_path, key, value, shown):
    from visionselector.data import read_conversations
    from visionselector.data.batches import load_examples

    path = tmp_path / "bad.jsonl"
    (tmp_path / "a.png").write_bytes(b"")
    good = {"image": "a.png", "conversations": GOOD_TURNS}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, key: value}) + "\n")
    for read in (read_conversations, load_examples):
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"{path}:2: '{key}' must be a path string or a list of path strings")
        assert shown in message


@pytest.mark.parametrize("record, shown", [
    ({"conversations": None}, "'conversations': null"),
    ({"conversations": "hello"}, "'conversations': \"hello\""),
    ({"conversations": []}, "'conversations': []"),
    ({"id": 1}, "no 'conversations' field"),
    (["not", "an", "object"], '["not", "an", "object"]'),
    ({"conversations": [1]}, "turn 1 of 'conversations'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "turn 2"),
    ({"conversations": [{"from": "human", "value": 3}]}, '"value": 3'),
    ({"conversations": [{"from": ["human"], "value": "q"}]}, "turn 1"),
])
def test_conversations_field_types_are_named(tmp_path, record, shown):
    from visionselector.data import read_conversations

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:1: ") as error:
        read_conversations(path)
    assert shown in str(error.value)


def test_non_utf8_files_name_the_file_and_line(tmp_path):
    from visionselector.data.batches import load_examples

    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    path.write_bytes(good.encode() + b"\n" + json.dumps({"conversations": [
        {"from": "human", "value": "caf\u00e9"}]}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8 text .*conversation files are UTF-8 JSONL"):
        load_examples(path)


def test_utf8_with_a_byte_order_mark_and_line_separators_inside_strings_read_as_one_record_per_line(tmp_path):
    from visionselector.data import read_conversations

    path = tmp_path / "data.jsonl"
    turns = [{"from": "human", "value": "one\u2028two\u0085three"}, {"from": "gpt", "value": "caf\u00e9"}]
    lines = [json.dumps({"id": "a", "conversations": turns}, ensure_ascii=False)] * 2
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    records = read_conversations(path)
    assert len(records) == 2 and records[0].turns[0][1] == "one\u2028two\u0085three"
    assert records[1].answer == "caf\u00e9"
    assert records[1].where.endswith(":2")


def test_load_examples_limit_must_be_a_positive_integer(tmp_path):
    from visionselector.data.batches import load_examples

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"conversations": GOOD_TURNS[1:]}) + "\n")
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="limit must be an integer of at least 1"):
            load_examples(path, bad)
    assert len(load_examples(path, 1)) == 1
