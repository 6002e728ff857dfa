"""Every command and the data path on a Qwen2.5-VL checkpoint laid out like a hub download."""

import importlib.util
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

import visionselector as vs  # noqa: E402
from visionselector.cli import main  # noqa: E402
from visionselector.data.batches import ExampleBatches, FeatureCache, load_examples, load_image  # noqa: E402
from visionselector.data.encoding import encode_conversation  # noqa: E402
from visionselector.models import load_model  # noqa: E402

from hub_cache import add_to_hub_cache, offline_hub  # noqa: E402
from real_checkpoint import build_qwen2_5_vl_checkpoint  # noqa: E402

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("qwen") / "ckpt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Conversations with one image, two images and several turns, over images of different sizes."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.RandomState(0)
    for index, (height, width) in enumerate([(84, 84), (56, 112), (112, 84), (84, 56), (70, 98)]):
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    records = [
        {"id": "one", "image": "0.png", "type": "what", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red box."}]},
        {"id": "two", "image": ["1.png", "2.png"], "type": "compare", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nAre they the same?"}, {"from": "gpt", "value": "No."},
            {"from": "human", "value": "Which one is brighter?"}, {"from": "gpt", "value": "The first one."}]},
        {"id": "three", "image": "3.png", "type": "what", "conversations": [
            {"from": "human", "value": "Look at <image> and count the cats."}, {"from": "gpt", "value": "3"}]},
        {"id": "four", "image": "4.png", "answers": ["blue", "dark blue"], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _plain_greedy(model, processor, example, max_new_tokens):
    """The unpatched model's greedy answer: the chat template, the processor, plain generate."""
    text = processor.apply_chat_template(example.prompt_messages(), add_generation_prompt=True, tokenize=False)
    batch = processor(images=[load_image(p) for p in example.images], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_loads_through_the_auto_classes_with_an_image_only_processor_without_torchvision(checkpoint):
    model, processor = load_model(checkpoint)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and not model.training
    assert processor.image_token_id == model.config.image_token_id
    if HAS_TORCHVISION:
        pytest.skip("torchvision is installed: AutoProcessor builds the full processor")
    assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    with pytest.raises(RuntimeError, match="video needs torchvision"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 56, 56, 3), np.uint8)])


def test_labels_cover_every_assistant_turn_and_nothing_else(checkpoint, data):
    _, processor = load_model(checkpoint)
    example = load_examples(data)[1]
    images = [load_image(p) for p in example.images]
    sample = encode_conversation(processor, example.messages(), images=images)
    tokenizer = processor.tokenizer
    labelled = sample["labels"] != -100
    assert torch.equal(sample["labels"][labelled], sample["input_ids"][labelled])
    spans, current = [], []
    for token, on in zip(sample["input_ids"].tolist(), labelled.tolist()):
        if on:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["No.<|im_end|>\n", "The first one.<|im_end|>\n"]
    # The same ids the processor gives for the rendered conversation, image tokens expanded.
    text = processor.apply_chat_template(example.messages(), tokenize=False)
    assert torch.equal(sample["input_ids"], processor(images=images, text=[text], return_tensors="pt")["input_ids"][0])
    image_tokens = sample["input_ids"] == processor.image_token_id
    assert torch.equal(sample["mm_token_type_ids"].bool(), image_tokens)
    assert int(image_tokens.sum()) == int(sum(g.prod() for g in sample["image_grid_thw"]) // 4)
    # Cached features stand in for pixels: the same ids from the token counts alone.
    counts = [int(g.prod()) // 4 for g in sample["image_grid_thw"]]
    cached = encode_conversation(processor, example.messages(), visual_counts=counts)
    assert torch.equal(cached["input_ids"], sample["input_ids"]) and torch.equal(cached["labels"], sample["labels"])
    prompt = encode_conversation(processor, example.prompt_messages(), images=images, generation_prompt=True)
    assert tokenizer.decode(prompt["input_ids"]).endswith("Which one is brighter?<|im_end|>\n<|im_start|>assistant\n")
    assert (prompt["labels"] == -100).all()


def test_cached_batches_equal_pixel_batches_left_padded(checkpoint, data):
    model, processor = load_model(checkpoint)
    examples = load_examples(data)
    cache = FeatureCache(model, processor, examples, progress=False)
    cached = ExampleBatches(examples, processor, batch_size=4, cache=cache).batch([0, 1, 2, 3])
    pixels = ExampleBatches(examples, processor, batch_size=4).batch([0, 1, 2, 3])
    assert "mm_encoder_outputs" in cached and "pixel_values" in pixels
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(cached[name], pixels[name]), name
    assert (pixels["attention_mask"][:, -1] == 1).all() and (pixels["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        a = model.generate(**cached, max_new_tokens=3, do_sample=False)
        b = model.generate(**pixels, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)


def test_every_method_at_retention_one_predicts_what_plain_generate_does(checkpoint, data):
    from visionselector.eval.quality import evaluate_methods

    model, processor = load_model(checkpoint)
    examples = load_examples(data)
    methods = ["random", "uniform", "divprune", "fastv"]
    predictions = []
    records = evaluate_methods(model, processor, examples, methods=methods, retentions=(1.0, 0.5), batch_size=3,
                               max_new_tokens=4, metric="anls", progress=False, predictions=predictions,
                               method_options={"fastv": {"layer": 0}})  # the checkpoint has 2 decoder layers
    assert len(records) == 8 and len(predictions) == 8 * len(examples)
    assert set(predictions[0]) == {"id", "method", "retention", "prediction", "answer", "correct"}
    plain = {e.id: _plain_greedy(model, processor, e, 4) for e in examples}
    full = [p for p in predictions if p["retention"] == 1.0]
    assert sorted(p["method"] for p in full) == sorted(methods * len(examples))
    for p in full:
        assert p["prediction"] == plain[p["id"]], p
    # And each method's pruned run is the same as attaching it by hand and generating one example at a time.
    for method, options in (("divprune", {}), ("fastv", {"layer": 0})):
        with vs.attached(model, method=method, retention=0.5, **options):
            by_hand = {e.id: _plain_greedy(model, processor, e, 4) for e in examples}
        assert {p["id"]: p["prediction"] for p in predictions
                if p["method"] == method and p["retention"] == 0.5} == by_hand


def test_cli_train_eval_show_bench_on_the_checkpoint_and_from_an_offline_hub_cache(
        checkpoint, data, tmp_path, monkeypatch, capsys):
    model = str(checkpoint)
    selector = tmp_path / "selector"
    assert main(["train", "--model", model, "--data", str(data), "--out", str(selector), "--steps", "2",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert (selector / "selector.safetensors").is_file()
    assert main(["eval", "--model", model, "--data", str(data), "--selector", str(selector), "--methods",
                 "visionselector", "random", "--retentions", "0.5", "1.0", "--metric", "contains",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "results"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "results" / "results.json").read_text())
    assert {(r["method"], r["retention"], r["metric"]) for r in rows} == {
        (m, r, "contains") for m in ("visionselector", "random") for r in (0.5, 1.0)}
    lines = (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 4 and json.loads(lines[0])["id"] == "one"
    assert main(["show", "--model", model, "--data", str(data), "--index", "2", "--method", "visionselector",
                 "--selector", str(selector), "--retention", "0.5", "--out", str(tmp_path / "show.png")]) == 0
    assert (tmp_path / "show.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--model", model, "--methods", "random", "--retentions", "1.0", "0.5", "--image-size", "56",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(tmp_path / "bench")]) == 0
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())
    # The same checkpoint by hub id, from the cache alone.
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tiny-org/Tiny-Qwen2.5-VL", checkpoint)
    offline_hub(monkeypatch, cache)
    assert main(["eval", "--model", "tiny-org/Tiny-Qwen2.5-VL", "--data", str(data), "--methods", "random",
                 "--retentions", "1.0", "--max-new-tokens", "3", "--out", str(tmp_path / "hub-results"),
                 "--no-progress"]) == 0
    by_folder = [json.loads(line) for line in lines if json.loads(line)["retention"] == 1.0
                 and json.loads(line)["method"] == "random"]
    by_id = [json.loads(line) for line in (tmp_path / "hub-results" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in by_id] == [p["prediction"] for p in by_folder]
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-org/Missing", "--data", str(data), "--methods", "random"]) == 2
    error = capsys.readouterr().err
    assert "'tiny-org/Missing'" in error and "HF_HUB_OFFLINE is set" in error


def test_bad_input_names_the_problem(checkpoint, data, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    missing.write_text(data.read_text().replace('"3.png"', '"nowhere.png"'))
    (tmp_path / "0.png").write_bytes((data.parent / "0.png").read_bytes())
    for number in (1, 2):
        (tmp_path / f"{number}.png").write_bytes((data.parent / f"{number}.png").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl:3: image file not found: .*nowhere.png"):
        load_examples(missing)
    tags = tmp_path / "tags.jsonl"
    tags.write_text(json.dumps({"image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"tags.jsonl:1: 2 image\(s\) but 1 '<image>' tag"):
        load_examples(tags)
    video = tmp_path / "video.jsonl"
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    video.write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}) + "\n")
    _, processor = load_model(checkpoint)
    if not HAS_TORCHVISION:
        with pytest.raises(ValueError, match=r"video.jsonl:1: this sample holds a video, and video needs torchvision"):
            ExampleBatches(load_examples(video), processor, batch_size=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "idefics3",
                                                   "architectures": ["Idefics3ForConditionalGeneration"]}))
    with pytest.raises(TypeError, match="idefics3.*supported classes: .*Qwen2_5_VLForConditionalGeneration.*"
                                        "LlavaOnevisionForConditionalGeneration"):
        load_model(other)
    (tmp_path / "file").write_text("")
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--methods", "random",
                 "--out", str(tmp_path / "file" / "results")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--metric", "bleu"]) == 2
    assert "unknown metric 'bleu'; metrics: exact, contains, anls" in capsys.readouterr().err
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err


def test_answer_metrics_on_known_cases():
    from visionselector.eval.metrics import anls, levenshtein, normalise_answer, score

    assert normalise_answer("  Yes. ") == "yes" and levenshtein("kitten", "sitting") == 3
    assert score("exact", "Blue!", ["red", "blue"]) == 1.0 and score("exact", "dark blue", "blue") == 0.0
    assert score("contains", "It is dark blue.", "Blue") == 1.0 and score("contains", "red", "blue") == 0.0
    assert anls("Invoice 1234", "invoice 1234") == 1.0
    assert anls("invoice 1235", "invoice 1234") == pytest.approx(1 - 1 / 12)
    assert anls("abc", "xyz") == 0.0 and score("anls", "abd", ["xyz", "abc"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        score("f1", "a", "a")
