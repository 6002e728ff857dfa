import subprocess
import sys

import pytest
import torch

import visionselector as vs
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model, randomise_scorer


def test_import_is_cheap_and_loads_nothing_heavy():
    code = "import sys, visionselector; print(sorted(m for m in ('torch', 'transformers', 'flash_attn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_imports_flash_attn():
    code = ("import sys, visionselector as vs; from visionselector.presets import build_qwen2_5_vl; "
            "m = build_qwen2_5_vl(); vs.attach(m); import visionselector.training; "
            "print('flash_attn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_list_methods_describes_each_method():
    methods = vs.list_methods()
    assert "visionselector" in methods and "random" in methods
    assert all(isinstance(d, str) and d for d in methods.values())


def test_registration_validates_names():
    from visionselector.methods import SelectionMethod, register_method

    class Bad(SelectionMethod):
        name = "Bad Name"
        description = "x"

    with pytest.raises(ValueError, match="lower-case"):
        register_method(Bad)

    class Clash(SelectionMethod):
        name = "random"
        description = "another random"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)


def test_random_method_is_seeded_and_independent_of_the_batch():
    model = make_model()
    vs.attach(model, method="random", retention=0.25, seed=3)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(8, 8)], prefix=5)])
    with torch.no_grad():
        model(**batch)
        first = [s.tolist() for s in vs.last_selection(model)]
        model(**batch)
    assert first == [s.tolist() for s in vs.last_selection(model)]
    assert first[0] == first[1] and len(first[0]) == 4
    with pytest.raises(ValueError, match="training-free"):
        vs.attach(make_model(), method="random", mode="soft")


def test_bfloat16_model_prunes_and_generates():
    model = make_model().to(torch.bfloat16)
    vs.attach(model, retention=0.3)
    randomise_scorer(model)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)])])
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        out = model(**batch)
        ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert [len(s) for s in vs.last_selection(model)] == [4, 2]
    assert ids.shape == (2, batch["input_ids"].shape[1] + 3)


def test_cli_lists_methods():
    out = subprocess.run([sys.executable, "-m", "visionselector", "methods"], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert names == sorted(vs.list_methods())
