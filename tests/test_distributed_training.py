"""Data-parallel selector training: `visionselector train` under torchrun with 2 processes (gloo)
equals one process on the same batches, every process ends with the same weights, and a run
stopped mid-way resumes, on 2 processes or on 1, to where the uninterrupted run ends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import visionselector as vs  # noqa: E402
from visionselector.commands.train import TrainConfig, run_train  # noqa: E402
from visionselector.data.batches import ExampleBatches, FeatureCache, load_examples  # noqa: E402
from visionselector.models import load_model  # noqa: E402
from visionselector.training import SelectorTrainingConfig, train_selector  # noqa: E402
from visionselector.training.distributed import ProcessGroup, share  # noqa: E402

from real_checkpoint import build_qwen2_5_vl_checkpoint  # noqa: E402
from test_training import labelled_batch  # noqa: E402
from conftest import make_model  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
# Batches of 3 over 4 examples: shares of 2 and 1, then a last batch of 1 that leaves the second
# process nothing; answers, images and turns differ in length, so the counts of tokens differ.
SETTINGS = dict(steps=4, batch_size=3, save_every=1, learning_rate=5e-2, seed=2, progress=False, retention=0.25)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    checkpoint = build_qwen2_5_vl_checkpoint(root / "ckpt")
    rng = np.random.RandomState(0)
    for index, (height, width) in enumerate([(84, 84), (56, 112), (112, 84), (84, 56), (70, 98)]):
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"{index}.png")
    records = [
        {"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                             {"from": "gpt", "value": "A red box on a wooden table."}]},
        {"image": ["1.png", "2.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nAre they the same?"}, {"from": "gpt", "value": "No."},
            {"from": "human", "value": "Which one is brighter?"}, {"from": "gpt", "value": "The first one."}]},
        {"image": "3.png", "conversations": [{"from": "human", "value": "Look at <image> and count the cats."},
                                             {"from": "gpt", "value": "3"}]},
        {"image": "4.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                             {"from": "gpt", "value": "blue"}]},
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "checkpoint": checkpoint, "data": data}


def command_arguments(workspace, out, **changes) -> list[str]:
    settings = {**SETTINGS, **changes}
    arguments = ["train", "--model", str(workspace["checkpoint"]), "--data", str(workspace["data"]), "--out", str(out),
                 "--threads", "1"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + flag[2:])
        else:
            arguments += [flag, str(value)]
    return arguments


def torchrun(arguments: list[str], processes: int = 2, stop_at_step: int = 0, module: bool = False):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "VS_TEST_STOP_AT_STEP": str(stop_at_step), "PYTHONPATH": str(WORKER.parent)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    target = ["-m", "visionselector.cli"] if module else [str(WORKER)]
    return subprocess.run(launcher + target + arguments, env=environment, capture_output=True, text=True,
                          timeout=300)


def single_process(workspace, out, **changes):
    settings = {**SETTINGS, **changes}
    torch.set_num_threads(1)
    try:
        return run_train(TrainConfig(data=str(workspace["data"]), model=str(workspace["checkpoint"]), out=str(out),
                                     **settings), print_fn=lambda *_: None)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def selector_weights(folder: Path) -> dict:
    return load_file(folder / "selector.safetensors")


def assert_close_weights(a: dict, b: dict, tolerance=1e-5):
    """Equal within float tolerance; the query bias only stays small in both.

    The query bias adds the same amount to every token's score, and the soft top-k does not
    change under a shift of all scores: its gradient is zero in exact arithmetic, so what moves
    it is rounding noise, which Adam rescales. Different summation orders move it differently.
    """
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("query.bias"):
            assert max(float(a[name].abs().max()), float(b[name].abs().max())) < 1e-3, name
            continue
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.fixture(scope="module")
def runs(workspace):
    """One process; two processes; two processes killed before step 3 and resumed on two."""
    root = workspace["root"]
    single = single_process(workspace, root / "single")
    double = torchrun(command_arguments(workspace, root / "double"))
    assert double.returncode == 0, double.stderr[-3000:]
    stopped = torchrun(command_arguments(workspace, root / "stopped"), stop_at_step=3)
    assert stopped.returncode != 0 and "SIGKILL" in stopped.stderr, stopped.stderr[-3000:]
    assert torch.load(root / "stopped" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    resumed = torchrun(command_arguments(workspace, root / "stopped", resume=True), module=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"single": single, "double": double, "resumed": resumed}


def test_two_processes_end_with_identical_weights_equal_to_one_process(workspace, runs):
    root = workspace["root"]
    ranks = [load_file(root / "double" / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    saved = selector_weights(root / "double")
    # The ranks' files list the parameters unnamed: each saved tensor is one of them, exactly.
    assert len(saved) == len(ranks[0])
    assert all(any(torch.equal(tensor, mine) for mine in ranks[0].values()) for tensor in saved.values())
    single = selector_weights(root / "single")
    assert_close_weights(single, saved)
    # The scorer starts almost flat (weights of about 1e-4): training moved it far beyond the tolerance.
    assert max(float(single[n].abs().max()) for n in single) > 1e-2
    log = json.loads((root / "double" / "training_log.json").read_text())
    assert log["processes"] == 2
    single_losses = [h["loss"] for h in runs["single"]["history"]]
    np.testing.assert_allclose([h["loss"] for h in log["history"]], single_losses, rtol=1e-5)
    np.testing.assert_allclose([h["language_loss"] for h in log["history"]],
                               [h["language_loss"] for h in runs["single"]["history"]], rtol=1e-5)


def test_the_feature_cache_is_encoded_once_across_processes_and_equals_one_process(workspace, runs):
    root = workspace["root"]
    (single_file,) = (root / "single" / "cache").glob("features-*.pt")
    (double_file,) = (root / "double" / "cache").glob("features-*.pt")
    assert single_file.name == double_file.name
    assert not list((root / "double" / "cache").glob("*.part*"))  # the per-process parts are gone
    a, b = (torch.load(path, weights_only=True) for path in (single_file, double_file))
    assert len(a["features"]) == len(b["features"]) == 4
    for one, two in zip(a["features"], b["features"]):
        assert len(one) == len(two) and all(torch.equal(x, y) for x, y in zip(one, two))
    for one, two in zip(a["side_inputs"], b["side_inputs"]):
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_killed_run_resumed_under_torchrun_ends_where_the_uninterrupted_one_does(workspace, runs):
    root = workspace["root"]
    resumed, straight = selector_weights(root / "stopped"), selector_weights(root / "double")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    history = json.loads((root / "stopped" / "training_log.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]


def test_a_checkpoint_of_two_processes_resumes_on_one(workspace, runs, tmp_path):
    import shutil

    root = workspace["root"]
    stopped = tmp_path / "stopped"
    result = torchrun(command_arguments(workspace, stopped), stop_at_step=3)
    assert result.returncode != 0
    assert torch.load(stopped / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    shutil.rmtree(stopped / "cache")  # the single process encodes its own
    resumed = single_process(workspace, stopped, resume=True)
    assert_close_weights(selector_weights(stopped), selector_weights(root / "single"))
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]


def test_a_model_sharded_over_two_processes_trains_as_one_process_does(workspace, runs, tmp_path):
    out = tmp_path / "sharded"
    # Micro-batches of 1: the first process runs two passes a step, the second one and a filler
    # (and, in the last batch of each epoch, only a filler).
    result = torchrun(command_arguments(workspace, out, shard_model=True, micro_batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 reports what it holds: half of the sharded weights (FSDP pads odd sizes up).
    line = next(line for line in result.stdout.splitlines() if "sharded over 2 processes" in line)
    held, total = (int(n.replace(",", "")) for n in line.split("holds ")[1].split(" sharded")[0].split(" of its "))
    assert total > 0 and abs(held - total / 2) <= total * 0.02
    ranks = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert_close_weights(selector_weights(out), selector_weights(workspace["root"] / "single"))


def test_deepspeed_zero3_partitions_the_model_and_trains_as_one_process_does(workspace, runs, tmp_path):
    pytest.importorskip("deepspeed", reason="the [deepspeed] extra is not installed")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto", "overlap_comm": False}}))
    out = tmp_path / "zero3"
    result = torchrun(command_arguments(workspace, out, deepspeed=str(config)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer section is not used" in result.stdout
    line = next(line for line in result.stdout.splitlines() if "DeepSpeed ZeRO-3 over 2 processes" in line)
    held, total = (int(n.replace(",", "")) for n in line.split("holds ")[1].split(" weights")[0].split(
        " of the model's "))
    assert total > 0 and abs(held - total / 2) <= total * 0.02
    ranks = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert_close_weights(selector_weights(out), selector_weights(workspace["root"] / "single"))


def test_deepspeed_configs_that_disagree_with_the_command_are_refused(workspace, tmp_path):
    def refused(settings: dict, match: str, **changes):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(settings))
        with pytest.raises(ValueError, match=match):
            single_process(workspace, tmp_path / "out", deepspeed=str(path), **changes)

    refused({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3")
    refused({"bf16": {"enabled": True}}, "enables bfloat16 but --dtype is float16", dtype="float16")
    refused({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16")
    refused({"train_micro_batch_size_per_gpu": 2}, "--micro-batch-size is 1", micro_batch_size=1)
    refused({"train_batch_size": 8}, "--batch-size .* is 3")
    refused({"gradient_clipping": 0.5}, "--max-grad-norm is 1")
    refused({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "cannot resolve \"auto\"")
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        single_process(workspace, tmp_path / "out", deepspeed=str(tmp_path / "bad.json"))


def test_accelerate_launch_with_fsdp_shards_the_model_and_trains_as_one_process_does(workspace, runs, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "accelerate"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    result = subprocess.run(launcher + [str(WORKER)] + command_arguments(workspace, out), env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "language model sharded over 2 processes" in result.stdout
    ranks = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert_close_weights(selector_weights(out), selector_weights(workspace["root"] / "single"))


def test_micro_batches_add_up_to_the_whole_batch():
    model = make_model()
    whole = [labelled_batch(model, seed=0), labelled_batch(model, seed=1)]
    config = SelectorTrainingConfig(learning_rate=1e-2, progress=False, retention=0.25)

    def halves(batch):
        rows = [{k: v[i:i + 1] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels",
                                                                   "mm_token_type_ids")} for i in (0, 1)]
        # Each row's own pixels: the synthetic batch's images follow its rows.
        sizes = [int(g.prod()) for g in batch["image_grid_thw"]]
        rows[0].update(pixel_values=batch["pixel_values"][:sizes[0]], image_grid_thw=batch["image_grid_thw"][:1])
        rows[1].update(pixel_values=batch["pixel_values"][sizes[0]:], image_grid_thw=batch["image_grid_thw"][1:])
        return rows

    # Trim each row's padding so the halves are what a collator makes of one sample.
    def unpadded(row):
        keep = row["attention_mask"][0].bool()
        return {k: (v[:, keep] if k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids") else v)
                for k, v in row.items()}

    in_parts = [[unpadded(r) for r in halves(batch)] for batch in whole] + [[]]
    vs.attach(model, method="visionselector", retention=0.25)
    start = {k: v.clone() for k, v in vs.get_method(model).state_dict().items()}
    whole_history = train_selector(model, whole, steps=2, config=config)
    after_whole = {k: v.clone() for k, v in vs.get_method(model).state_dict().items()}
    vs.get_method(model).load_state_dict(start)
    parts_history = train_selector(model, in_parts[:2], steps=2, config=config)
    after_parts = vs.get_method(model).state_dict()
    assert_close_weights(after_whole, after_parts)
    assert any(not torch.equal(start[k], after_parts[k]) for k in start)
    np.testing.assert_allclose([h["loss"] for h in parts_history], [h["loss"] for h in whole_history], rtol=1e-5)
    np.testing.assert_allclose([h["selection_loss"] for h in parts_history],
                               [h["selection_loss"] for h in whole_history], rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_training_and_is_undone():
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = make_model()
    batch = labelled_batch(model)
    config = SelectorTrainingConfig(learning_rate=1e-2, progress=False, retention=0.25)
    vs.attach(model, method="visionselector", retention=0.25)
    start = {k: v.clone() for k, v in vs.get_method(model).state_dict().items()}
    plain = train_selector(model, [batch], steps=2, config=config)
    after_plain = {k: v.clone() for k, v in vs.get_method(model).state_dict().items()}
    vs.get_method(model).load_state_dict(start)
    layers = [m for m in model.model.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = []
    hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    try:
        checkpointed = train_selector(model, [batch], steps=2, config=SelectorTrainingConfig(
            learning_rate=1e-2, progress=False, retention=0.25, gradient_checkpointing=True))
        assert len(calls) == 2 * 2 * len(layers)  # every layer ran twice a step: once more in the backward
        checkpointed_weights = {k: v.clone() for k, v in vs.get_method(model).state_dict().items()}
        calls.clear()
        train_selector(model, [batch], steps=1, config=config)
        assert len(calls) == len(layers)  # and once after the run: checkpointing is off again
    finally:
        for hook in hooks:
            hook.remove()
    # (the check above trained one more step: compare with what the checkpointed run left)
    assert_close_weights(after_plain, checkpointed_weights, tolerance=1e-6)
    assert [h["loss"] for h in plain] == pytest.approx([h["loss"] for h in checkpointed], rel=1e-6)
    assert not any(layer.gradient_checkpointing or layer.training for layer in layers)


def test_shares_of_a_batch_cover_it_in_order_whatever_the_number_of_processes(workspace):
    for size in (1, 2, 3, 5):
        for count in (0, 1, 4, 7):
            items = list(range(count))
            parts = [share(items, ProcessGroup(rank, size)) for rank in range(size)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    model, processor = load_model(workspace["checkpoint"])
    examples = load_examples(workspace["data"])
    cache = FeatureCache(model, processor, examples, progress=False)
    whole = ExampleBatches(examples, processor, batch_size=3, cache=cache, with_answers=True, shuffle_seed=2)
    for size in (1, 2, 3):
        for step in range(3):
            parts = [ExampleBatches(examples, processor, batch_size=3, cache=cache, with_answers=True, shuffle_seed=2,
                                    group=ProcessGroup(rank, size), micro_batch_size=1).parts(step)
                     for rank in range(size)]
            rows = [row for process in parts for part in process for row in part["input_ids"]]
            expected = whole.batch(whole.indices(step))
            assert len(rows) == expected["input_ids"].shape[0]
            for row, full in zip(rows, expected["input_ids"]):
                assert torch.equal(row, full[-len(row):]) and (full[:-len(row)] == full[0]).all()


def test_bad_process_settings_are_refused(workspace, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="micro_batch_size"):
        ExampleBatches([], None, batch_size=2, micro_batch_size=0)
    with pytest.raises(ValueError, match="--shard-model splits the model over several processes"):
        single_process(workspace, tmp_path / "c", shard_model=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        single_process(workspace, tmp_path / "a", dtype="fp8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK is not set"):
        single_process(workspace, tmp_path / "b")


def test_max_pixels_caps_the_images_of_qwen_processors_and_is_refused_elsewhere(workspace, tmp_path):
    from visionselector.models import cap_image_pixels

    _, processor = load_model(workspace["checkpoint"])
    image = Image.fromarray(np.zeros((448, 448, 3), dtype=np.uint8))
    full = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    patch = processor.image_processor.patch_size
    cap_image_pixels(processor, 3136)
    capped = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    # The tiny checkpoint's own cap is 112 x 112 (8 x 8 patches of 14); the new one 56 x 56.
    assert full.tolist() == [[1, 8, 8]] and capped.tolist() == [[1, 4, 4]] and 16 * patch * patch <= 3136

    class FixedSize:  # a processor that resizes to a fixed edge, as CLIP's does
        image_processor = type("CLIPImageProcessor", (), {"size": {"shortest_edge": 336}})()

    with pytest.raises(ValueError, match="does not size images by their number of pixels"):
        cap_image_pixels(FixedSize(), 50176)
    with pytest.raises(ValueError, match="positive integer"):
        cap_image_pixels(processor, 0)
    result = single_process(workspace, tmp_path / "capped", steps=1, max_pixels=3136)
    log = json.loads((tmp_path / "capped" / "training_log.json").read_text())
    assert log["config"]["max_pixels"] == 3136 and len(result["history"]) == 1
