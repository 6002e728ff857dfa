import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from visionselector.data import read_conversations  # noqa: E402
from visionselector.reference.task import (  # noqa: E402
    QUESTION_TYPES, SPLITS, digit_images, _scene_for, make_sample, vocabulary, write_split,
)


def test_samples_are_deterministic_and_sized_for_256_tokens():
    a = make_sample("train", 7)
    b = make_sample("train", 7)
    assert a[1:] == b[1:] and a[0].tobytes() == b[0].tobytes()
    assert a[0].size == (448, 448)  # 32 x 32 patches of 14 -> 16 x 16 = 256 merged tokens
    assert make_sample("test", 7)[0].tobytes() != a[0].tobytes()


def test_answers_are_unique_by_construction():
    import random

    images, targets = digit_images()
    for seed in range(300):
        rng = random.Random(seed)
        kind = QUESTION_TYPES[seed % len(QUESTION_TYPES)]
        scene, question, answer = _scene_for(rng, kind, range(0, 1300), targets)
        cells = [c for c, *_ in scene.digits] + [c for c, *_ in scene.shapes]
        assert len(cells) == len(set(cells))  # one object per cell
        words = question.split()
        if kind == "read_digit":
            boxed = [d for d in scene.digits if d[2] == words[5]]
            assert len(boxed) == 1 and str(int(targets[boxed[0][1]])) == answer
        elif kind == "colour":
            assert [s[2] for s in scene.shapes if s[1] == words[4]] == [answer]
        elif kind == "shape":
            assert [s[1] for s in scene.shapes if s[2] == words[4]] == [answer]
        elif kind == "count":
            assert sum(s[1] + "s" == words[2] for s in scene.shapes) == int(answer)
        elif kind == "presence":
            present = any((s[2], s[1]) == (words[3], words[4]) for s in scene.shapes)
            assert answer == ("yes" if present else "no")
        else:
            (cell,) = [c for c, shape, colour in scene.shapes if (colour, shape) == (words[2], words[3])]
            assert answer == ("left" if cell % 4 < 2 else "right")


def test_scenes_can_always_be_built():
    import random

    _, targets = digit_images()
    for seed in range(20000):  # includes scenes where the asked half of the canvas starts full
        kind = QUESTION_TYPES[seed % len(QUESTION_TYPES)]
        scene, _, _ = _scene_for(random.Random(seed), kind, range(0, 1300), targets)
        assert len(scene.digits) + len(scene.shapes) <= 16


def test_every_question_type_and_answer_is_in_the_vocabulary():
    words = set(vocabulary())
    seen_types, answers = set(), {}
    for index in range(120):
        _, question, answer, kind = make_sample("validation", index)
        assert set(question.split()) <= words and answer in words
        seen_types.add(kind)
        answers.setdefault(kind, set()).add(answer)
    assert seen_types == set(QUESTION_TYPES)
    assert answers["presence"] == {"yes", "no"} and answers["position"] == {"left", "right"}


def test_test_split_uses_digit_images_training_never_sees():
    assert set(SPLITS["test"][1]).isdisjoint(SPLITS["train"][1])


def test_written_split_reads_back_as_conversations(tmp_path):
    path = write_split(tmp_path, "test", 4, progress=False)
    records = read_conversations(path)
    assert len(records) == 4 and all(r.images[0].is_file() for r in records)
    assert records[0].turns[0][0] == "user" and records[0].turns[0][1].startswith("<image>\n")
    assert records[0].extra["type"] == QUESTION_TYPES[0]


def test_conversation_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    (tmp_path / "a.png").write_bytes(b"")  # images must exist; the files are not opened here
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_conversations(path)
    path.write_text(json.dumps({**good, "image": ["a.png", "b.png"]}) + "\n")
    with pytest.raises(ValueError, match=r":1: 2 image\(s\) but 1 '<image>' tag\(s\)"):
        read_conversations(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"bad.jsonl:2: image file not found: .*missing.png"):
        read_conversations(path)
    assert len(read_conversations(path, check_files=False)) == 2
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="'from'"):
        read_conversations(path)


def test_reference_tokenizer_round_trip_errors_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from visionselector.reference.model import CHAT_TEMPLATE, SPECIAL_TOKENS, reference_tokenizer
    from visionselector.reference.training import question_messages, reference_processor

    words = vocabulary()
    tokenizer = reference_tokenizer()
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.convert_tokens_to_ids(words) == list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(words)))
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(words)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        SPECIAL_TOKENS.index("<pad>"), SPECIAL_TOKENS.index("<bos>"), SPECIAL_TOKENS.index("<eos>"),
        SPECIAL_TOKENS.index("<unk>")) == (0, 1, 2, 3)
    text = "what digit is in the red box ?"
    ids = tokenizer(text)["input_ids"]  # words only: no special tokens added
    assert ids == [len(SPECIAL_TOKENS) + words.index(w) for w in text.split()]
    assert tokenizer.decode(ids) == text  # words joined with single spaces
    assert tokenizer("What  DIGIT is in the RED box ?")["input_ids"] == ids  # lower-cased, split on whitespace
    assert tokenizer("zebra")["input_ids"] == [tokenizer.unk_token_id] == [SPECIAL_TOKENS.index("<unk>")]
    assert tokenizer("what zebra ?")["input_ids"] == [ids[0], tokenizer.unk_token_id, ids[-1]]
    assert tokenizer.decode([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded("What zebra ?")["input_ids"] == [ids[0], 3, ids[-1]]
    with pytest.raises(ValueError, match="repeats a word"):
        reference_tokenizer(["a", "a"])
    with pytest.raises(ValueError, match="repeats a word or a special token"):
        reference_tokenizer(["<pad>"])

    processor = reference_processor()
    assert processor.chat_template == CHAT_TEMPLATE
    prompt = processor.apply_chat_template(question_messages([(text, "7")], answered=False), tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<bos><vision_start><image><vision_end> what digit is in the red box ?<answer>"
    conversation = processor.apply_chat_template(
        question_messages([("is there a red circle ?", "no"), ("how many squares are there ?", "2")]), tokenize=False)
    assert conversation == ("<bos><vision_start><image><vision_end> is there a red circle ?<answer> no<eos>"
                            " how many squares are there ?<answer> 2<eos>")


def _small_processor(pixels: int = 112 * 112):
    """The reference processor with an image processor that resizes to ``pixels`` (a cheap grid)."""
    from transformers import Qwen2VLImageProcessorPil

    from visionselector.reference.training import reference_processor

    reference = reference_processor()
    return type(reference)(image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels),
                           tokenizer=reference.tokenizer, chat_template=reference.chat_template)


def test_encoded_digits_vqa_samples_are_the_reference_prompt_and_answer():
    import torch

    from visionselector.data.encoding import encode_conversation
    from visionselector.reference.model import SPECIAL_TOKENS
    from visionselector.reference.training import question_messages, reference_processor

    processor = reference_processor()
    special = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    words = {word: len(SPECIAL_TOKENS) + index for index, word in enumerate(vocabulary())}
    images, targets = digit_images()
    for index in range(4):
        image, question, answer, _ = make_sample("test", index, images, targets)
        # <bos> <vision_start> <image> x 256 <vision_end> question-words <answer>, then answer-words <eos>
        prompt = ([special["<bos>"], special["<vision_start>"]] + [special["<image>"]] * 256 + [special["<vision_end>"]]
                  + [words[w] for w in question.split()] + [special["<answer>"]])
        reply = [words[w] for w in answer.split()] + [special["<eos>"]]
        encoded = encode_conversation(processor, question_messages([(question, answer)]), images=[image])
        assert encoded["input_ids"].tolist() == prompt + reply, (index, question, answer)
        assert encoded["labels"].tolist() == [-100] * len(prompt) + reply
        assert encoded["mm_token_type_ids"].tolist() == [int(t == special["<image>"]) for t in prompt + reply]
        assert encoded["image_grid_thw"].tolist() == [[1, 32, 32]] and encoded["pixel_values"].shape[0] == 1024
        asked = encode_conversation(processor, question_messages([(question, answer)], answered=False),
                                    images=[image], generation_prompt=True)
        assert asked["input_ids"].tolist() == prompt and (asked["labels"] == -100).all()
        assert torch.equal(asked["pixel_values"], encoded["pixel_values"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_processor_batches_run_through_a_qwen2_5_vl_with_a_selector(padding_side):
    import torch

    import visionselector as vs
    from visionselector.data.encoding import collate, encode_conversation
    from visionselector.presets import qwen2_5_vl_config
    from visionselector.reference.training import question_messages
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = _small_processor(112 * 112)
    tokenizer = processor.tokenizer
    samples = [make_sample("train", i) for i in (0, 3)]
    batch = collate([encode_conversation(processor, question_messages([s[1:3]]), images=[s[0]]) for s in samples],
                    tokenizer.pad_token_id, padding_side=padding_side)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [16, 16]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    edge = -1 if padding_side == "left" else 0  # padding on the other side
    assert batch["attention_mask"][:, edge].all() and not batch["attention_mask"].all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    answers = [tokenizer.decode(row[row != -100], skip_special_tokens=True) for row in batch["labels"]]
    assert answers == [s[2] for s in samples]
    for row, sample in zip(batch["labels"], samples):  # labels exactly on the answer words and <eos>
        assert row[row != -100].tolist() == tokenizer(sample[2])["input_ids"] + [tokenizer.eos_token_id]
    assert ((batch["labels"] == tokenizer.eos_token_id).sum(1) == 1).all()

    config = qwen2_5_vl_config(hidden_size=64, text_layers=2, heads=4, kv_heads=2, intermediate_size=128,
                               vocab_size=len(tokenizer), vision_depth=2, vision_hidden=32, vision_heads=2,
                               patch_size=14, window_size=112)
    for name in ("image", "video", "vision_start", "vision_end"):
        setattr(config, f"{name}_token_id", tokenizer.convert_tokens_to_ids(f"<{name}>"))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    vs.attach(model, retention=0.25)
    prompt = collate([encode_conversation(processor, question_messages([s[1:3]], answered=False), images=[s[0]],
                                          generation_prompt=True) for s in samples], tokenizer.pad_token_id)
    assert (prompt.pop("labels") == -100).all()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, prompt["input_ids"].shape[1] + 2)
    assert [len(s) for s in vs.last_selection(model)] == [4, 4]


def test_reference_training_runs_both_stages_evaluates_and_saves(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from visionselector.reference.training import ReferenceConfig, evaluate_accuracy, train_reference

    config = ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, text_layers=1, token_loss_layer=1,
                             vision_hidden=32, vision_depth=1, vision_steps=3, steps=2,
                             batch_size=2, warmup_steps=1, eval_samples=6, eval_every=0, scenes=3, quarter_scenes=1,
                             quarter_steps=2, quarters_between=2, shape_loss=0.5)
    lines = []
    model, processor, log = train_reference(config, tmp_path / "ref", print_fn=lines.append, progress=False)
    stage1 = [e for e in log if e["stage"] == 1 and "step" in e]
    stage2 = [e for e in log if e["stage"] == 2]
    assert len(stage1) == 3
    assert [e["images"] for e in stage2] == ["quarters", "quarters", "scenes", "scenes", "quarters"]
    assert all(0.0 <= e["side_accuracy"] <= 1.0 and 0.0 <= e["shape_accuracy"] <= 1.0 for e in stage2)
    assert all(e["loss"] == e["loss"] for e in stage1 + stage2)
    assert "validation_token_accuracy" in log[len(stage1)]
    accuracy = stage2[-1]["validation"]
    assert set(accuracy) == set(QUESTION_TYPES) | {"all"} and 0.0 <= accuracy["all"] <= 1.0
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ref").eval()
    assert evaluate_accuracy(loaded, processor, "validation", 6) == accuracy


def test_stage_two_schedule_puts_quarters_first_then_between_scenes():
    from visionselector.reference.training import stage_two_schedule

    assert stage_two_schedule(2, 3, 2) == [("quarters", 0), ("quarters", 1), ("scenes", 0), ("scenes", 1),
                                           ("quarters", 2), ("scenes", 2)]
    assert stage_two_schedule(0, 2, 1) == [("scenes", 0), ("quarters", 0), ("scenes", 1), ("quarters", 1)]
    assert stage_two_schedule(1, 2, 0) == [("quarters", 0), ("scenes", 0), ("scenes", 1)]
    with pytest.raises(ValueError, match="0 or more"):
        stage_two_schedule(0, 2, -1)


def test_token_sides_follow_the_merged_grid_in_raster_order():
    import torch

    from visionselector.reference.training import token_sides

    # a 2 x 4 token image (4 x 8 patches), then a 1 x 2 one (2 x 4 patches)
    sides = token_sides(torch.tensor([[1, 4, 8], [1, 2, 4]]))
    assert sides.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]


def test_shape_classes_join_shape_and_colour_into_one_class():
    import torch

    from visionselector.reference.task import COLOURS, LABEL_HEADS, SHAPES, token_labels
    from visionselector.reference.training import shape_classes

    labels = torch.zeros(3, len(LABEL_HEADS), dtype=torch.long)
    labels[1, 2], labels[1, 3] = 1, 1  # circle, red
    labels[2, 2], labels[2, 3] = 3, 6  # triangle, orange
    assert shape_classes(labels).tolist() == [0, 1, 1 + 2 * 6 + 5]
    assert list(COLOURS)[5] == "orange" and SHAPES[2] == "triangle"
    layout: list = []
    make_sample("train", 5, layout=layout)
    full = token_labels(layout, digit_images()[1])
    classes = shape_classes(full)
    on_shapes = full[:, 2] > 0
    assert torch.equal(classes > 0, on_shapes)
    expected = 1 + (full[on_shapes, 2] - 1) * len(COLOURS) + full[on_shapes, 3] - 1
    assert torch.equal(classes[on_shapes], expected) and int(classes.max()) <= len(SHAPES) * len(COLOURS)


def test_token_losses_read_a_decoder_layer_and_reject_others():
    from visionselector.reference.training import ReferenceConfig, train_reference

    config = ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, text_layers=2, vision_hidden=32,
                             vision_depth=1, vision_steps=0, steps=1, batch_size=2, warmup_steps=1, eval_samples=2,
                             eval_every=0, scenes=2, quarters_between=0, token_loss_layer=3)
    with pytest.raises(ValueError, match="token_loss_layer must be a decoder layer, 1 to 2, got 3"):
        train_reference(config, print_fn=lambda _: None, progress=False)


def test_token_losses_compute_only_the_losses_asked_for():
    import torch

    from visionselector.reference.training import TokenLosses, token_sides

    torch.manual_seed(0)
    image_id, width = 7, 8
    grid = torch.tensor([[1, 4, 4]])  # 2 x 2 merged tokens
    input_ids = torch.tensor([[1, image_id, image_id, image_id, image_id, 3]])
    hidden = (torch.randn(1, 6, width), torch.randn(1, 6, width))
    batch = {"input_ids": input_ids, "image_grid_thw": grid}
    losses = TokenLosses(width, image_id, layer=1)
    shapes = torch.tensor([[0, 1, 2, 0]])
    assert set(losses(hidden, batch)) == {"side"}
    assert set(losses(hidden, batch, shapes, sides=False)) == {"shape"}
    both = losses(hidden, batch, shapes)
    visual = hidden[1][0, 1:5]
    expected = torch.nn.functional.cross_entropy(losses.side(visual), token_sides(grid))
    assert torch.allclose(both["side"][0], expected)
    assert torch.allclose(both["shape"][0], torch.nn.functional.cross_entropy(losses.shape(visual), shapes[0]))


def test_stage_two_trains_the_language_model_and_leaves_the_encoder_alone():
    import torch

    from visionselector.reference.training import ReferenceConfig, build_reference_model, train_reference

    config = ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, text_layers=1, token_loss_layer=1,
                             vision_hidden=32, vision_depth=1, vision_steps=0, steps=2,
                             batch_size=2, warmup_steps=1, eval_samples=2, eval_every=0, scenes=3, quarter_scenes=1,
                             quarter_steps=1)
    initial = build_reference_model(config)  # same seed: the weights training starts from
    model, _, _ = train_reference(config, print_fn=lambda _: None, progress=False)
    for (name, before), after in zip(initial.state_dict().items(), model.state_dict().values()):
        if name.startswith("model.visual."):
            assert torch.equal(before, after), name
    assert not torch.equal(initial.lm_head.weight, model.lm_head.weight)
    assert all(p.requires_grad for p in model.parameters())


def test_token_labels_mark_exactly_the_tokens_an_object_covers():
    from visionselector.reference.task import LABEL_HEADS, token_labels

    targets = [7]  # digit image 0 shows a 7
    layout = [
        # columns 1-3, rows 0-2; row 2 and column 3 are covered 8 px deep (29% of a token), their corner 8 x 8 (8%)
        (28, 0, 92, 64, {"digit": 0, "box": "green"}),
        (420, 420, 448, 448, {"shape": "triangle", "colour": "orange"}),  # exactly the last token
        (0, 420, 5, 448, {"shape": "circle", "colour": "red"}),  # 5 x 28 px: under a fifth of a token
    ]
    labels = token_labels(layout, targets).reshape(16, 16, len(LABEL_HEADS))
    digit_tokens = {(r, c) for r in range(3) for c in range(1, 4)} - {(2, 3)}
    for row in range(16):
        for column in range(16):
            expected = [0, 0, 0, 0]
            if (row, column) in digit_tokens:
                expected = [8, 2, 0, 0]
            if (row, column) == (15, 15):
                expected = [0, 0, 3, 6]
            anchor = int((row, column) in {(1, 2), (15, 15), (15, 0)})  # the tokens under the three centres
            assert labels[row, column].tolist() == expected + [anchor, 1 + (column >= 8)], (row, column)


def test_object_tokens_and_asked_objects_on_known_layouts():
    from visionselector.reference.task import digit_images, asked_objects, make_sample, object_tokens, token_labels

    layout = [
        (28, 0, 92, 64, {"digit": 0, "box": "green"}),
        (420, 420, 448, 448, {"shape": "triangle", "colour": "orange"}),
        (0, 420, 5, 448, {"shape": "circle", "colour": "red"}),  # under a fifth of any token
        (0, 0, 28, 28, {"digit": 1, "box": None}),
        (224, 224, 252, 252, {"shape": "triangle", "colour": "green"}),
    ]
    assert object_tokens(layout) == [[1, 2, 3, 17, 18, 19, 33, 34], [255], [], [0], [8 * 16 + 8]]
    assert asked_objects("what digit is in the green box ?", "read_digit", layout) == [0]
    assert asked_objects("what colour is the circle ?", "colour", layout) == [2]
    assert asked_objects("what shape is the green object ?", "shape", layout) == [4]  # not the green box
    assert asked_objects("how many triangles are there ?", "count", layout) == [1, 4]
    assert asked_objects("is there a orange triangle ?", "presence", layout) == [1]
    assert asked_objects("is there a red triangle ?", "presence", layout) == []
    assert asked_objects("is the green triangle on the left or the right ?", "position", layout) == [4]
    with pytest.raises(ValueError, match="unknown question type 'size'; known: read_digit"):
        asked_objects("how big ?", "size", layout)

    images, targets = digit_images()
    for index in range(12):  # on generated samples: the union is what token_labels marks; one asked object
        layout = []
        _, question, answer, kind = make_sample("test", index, images, targets, layout=layout)
        covered = (token_labels(layout, targets)[:, :4] > 0).any(1).nonzero().flatten().tolist()
        assert sorted(t for tokens in object_tokens(layout) for t in tokens) == covered
        asked = asked_objects(question, kind, layout)
        expected = int(answer) if kind == "count" else 0 if answer == "no" else 1
        assert len(asked) == expected, (index, question, answer)


def test_object_coverage_counts_what_the_kept_tokens_cover():
    import visionselector as vs
    from visionselector.reference.task import digit_images, asked_objects, make_sample, object_tokens
    from visionselector.reference.training import ReferenceConfig, build_reference_model, reference_processor
    from visionselector.eval.coverage import kept_object_coverage

    processor = reference_processor()
    config = ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, text_layers=2, vision_hidden=32,
                             vision_depth=2, seed=1)
    model = build_reference_model(config)
    result = kept_object_coverage(model, processor, method="uniform", retention=0.25, samples=6)
    # uniform keeps the centre of every 2 x 2 block: tokens (2i + 1, 2j + 1), whatever the image
    kept = {r * 16 + c for r in range(1, 16, 2) for c in range(1, 16, 2)}
    images, targets = digit_images()
    seen = objects = asked_seen = asked_count = on_objects = asked_kept = asked_tokens = 0
    for index in range(6):
        layout = []
        _, question, _, kind = make_sample("test", index, images, targets, layout=layout)
        tokens = [set(t) for t in object_tokens(layout)]
        seen += sum(bool(t & kept) for t in tokens)
        objects += len(tokens)
        asked = [tokens[i] for i in asked_objects(question, kind, layout)]
        asked_seen += sum(bool(t & kept) for t in asked)
        asked_count += len(asked)
        on_objects += len(kept & set().union(*tokens))
        asked_kept += len(kept & set().union(*asked))
        asked_tokens += len(set().union(*asked))
    assert result.samples == 6 and len(result.by_type) == 6
    assert result.objects_seen == pytest.approx(seen / objects)
    assert result.asked_objects_seen == pytest.approx(asked_seen / asked_count)
    assert result.kept_on_objects == pytest.approx(on_objects / (6 * 64))
    assert result.asked_tokens_kept == pytest.approx(asked_kept / asked_tokens)
    assert not vs.is_attached(model)
    with pytest.raises(ValueError, match="coverage is measured below 1.0"):
        kept_object_coverage(model, processor, method="uniform", retention=1.0, samples=1)
    with pytest.raises(ValueError, match="needs a trained selector"):
        kept_object_coverage(model, processor, method="visionselector", retention=0.1, samples=1)


def test_layout_capture_does_not_change_the_sample():
    images, targets = digit_images()
    layout = []
    with_layout = make_sample("test", 5, images, targets, layout=layout)
    plain = make_sample("test", 5, images, targets)
    assert with_layout[0].tobytes() == plain[0].tobytes() and with_layout[1:] == plain[1:]
    assert len(layout) >= 5 and all(0 <= l < r <= 448 and 0 <= t < b <= 448 for l, t, r, b, _ in layout)


def test_fast_pixel_path_equals_the_image_processor():
    import torch
    from transformers import Qwen2VLImageProcessorPil

    from visionselector.reference.training import fast_pixels, reference_processor

    calls = []

    class Counting(Qwen2VLImageProcessorPil):
        def __call__(self, *args, **kwargs):
            calls.append(len(kwargs.get("images", args[0] if args else ())))
            return super().__call__(*args, **kwargs)

    counting = Counting(min_pixels=448 * 448, max_pixels=448 * 448)
    reference = Qwen2VLImageProcessorPil(min_pixels=448 * 448, max_pixels=448 * 448)
    images = [make_sample("validation", i)[0] for i in range(3)]
    slow = reference(images=images, return_tensors="pt")
    assert slow["image_grid_thw"].tolist() == [[1, 32, 32]] * 3
    for image_processor in (counting, reference_processor().image_processor):
        fast = fast_pixels(image_processor, images)
        assert torch.equal(fast["image_grid_thw"], slow["image_grid_thw"])
        assert fast["pixel_values"].shape == slow["pixel_values"].shape
        assert torch.allclose(fast["pixel_values"], slow["pixel_values"], atol=1e-6, rtol=0)
    assert calls == []  # 448 x 448 images took the fast path

    # sizes the processor would change go through it: 224 x 224 images are scaled up to its 448 x 448
    small = [image.resize((224, 224)) for image in images[:2]]
    for pictures in (small, [images[0], small[0]]):
        fallback = fast_pixels(counting, pictures)
        expected = reference(images=pictures, return_tensors="pt")
        assert fallback["image_grid_thw"].tolist() == [[1, 32, 32]] * len(pictures)
        assert torch.equal(fallback["pixel_values"], expected["pixel_values"])
    assert calls == [2, 2]


def test_dense_pretraining_scenes_are_crowded_deterministic_and_use_training_digits_only():
    from visionselector.reference.task import make_dense_scene

    images, targets = digit_images()
    for index in range(20):
        layout = []
        image = make_dense_scene(index, images, targets, layout=layout)
        digits = [a["digit"] for *_, a in layout if "digit" in a]
        assert 6 <= len(digits) <= 12 and all(i in SPLITS["train"][1] for i in digits)
        assert image.size == (448, 448)
    assert make_dense_scene(3, images, targets).tobytes() == make_dense_scene(3, images, targets).tobytes()


def test_scene_questions_agree_with_the_generated_question_and_are_unique():
    import random

    from visionselector.reference.task import scene_questions

    images, targets = digit_images()
    kinds = set()
    for index in range(120):
        layout = []
        _, question, answer, _ = make_sample("train", index, images, targets, layout=layout)
        found = scene_questions(layout, targets, random.Random(index))
        asked = {q: a for q, a, _ in found}
        assert len(asked) == len(found)  # no question twice
        if question in asked:
            assert asked[question] == answer, (index, question)
        kinds |= {k for *_, k in found}
    assert kinds == set(QUESTION_TYPES)


def test_follow_up_turns_are_labelled_like_the_first():
    from visionselector.data.encoding import collate, encode_conversation
    from visionselector.reference.training import question_messages

    processor = _small_processor(112 * 112)
    tokenizer = processor.tokenizer
    image = make_sample("train", 0)[0]
    turns = [("is there a red circle ?", "no"), ("how many squares are there ?", "2"),
             ("what colour is the triangle ?", "blue")]
    batch = collate([encode_conversation(processor, question_messages(turns), images=[image])],
                    tokenizer.pad_token_id, padding_side="right")
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != -100], skip_special_tokens=True) == "no 2 blue"
    assert int((labels == tokenizer.eos_token_id).sum()) == 3
    answer, eos = tokenizer.convert_tokens_to_ids(["<answer>", "<eos>"])
    ids = batch["input_ids"][0]
    # every answer is labelled from the token after its <answer> through its <eos>, and nothing else
    starts = (ids == answer).nonzero().flatten().tolist()
    ends = (ids == eos).nonzero().flatten().tolist()
    assert len(starts) == len(ends) == 3
    labelled = [i for a, e in zip(starts, ends) for i in range(a + 1, e + 1)]
    assert (labels != -100).nonzero().flatten().tolist() == labelled
    assert labels[labelled].tolist() == ids[labelled].tolist()
    words = tokenizer.decode(ids, skip_special_tokens=True)
    assert words.endswith("is there a red circle ? no how many squares are there ? 2 what colour is the triangle ? blue")


def test_quarters_hold_whole_objects_in_their_own_coordinates_and_the_same_pixels():
    import random

    import numpy as np

    from visionselector.reference.task import crop_quarter, scene_questions, token_labels

    images, targets = digit_images()
    for index in range(40):
        layout = []
        image = make_sample("train", index, images, targets, layout=layout)[0]
        kept = 0
        for quarter in range(4):
            picture, inside = crop_quarter(image, layout, quarter)
            left, top = (quarter % 2) * 224, (quarter // 2) * 224
            assert picture.size == (224, 224)
            assert np.array_equal(np.asarray(picture), np.asarray(image)[top:top + 224, left:left + 224])
            for l, t, r, b, attributes in inside:
                assert 0 <= l < r <= 224 and 0 <= t < b <= 224
                assert (l + left, t + top, r + left, b + top, attributes) in layout
            kept += len(inside)
            assert token_labels(inside, targets, size=224).shape == (64, 6)
            for question, answer, kind in scene_questions(inside, targets, random.Random(0), width=224):
                if kind == "position":  # the side of the quarter, not of the scene
                    colour, shape = question.split()[2:4]
                    (l, _, r, _, _), = [o for o in inside if o[4].get("shape") == shape and o[4]["colour"] == colour]
                    assert answer == ("left" if l + r < 224 else "right")
        assert kept == len(layout)  # every object lies in exactly one quarter
    with pytest.raises(ValueError, match="quarter must be"):
        crop_quarter(image, layout, 4)


def test_encoded_samples_visit_every_sample_once_per_epoch_with_its_own_question_first():
    import torch

    from visionselector.reference.training import EncodedSamples, reference_processor

    processor = reference_processor()
    tokenizer = processor.tokenizer
    questions = [[("how many squares are there ?", str(i))] + [("is there a red circle ?", "no")] * 3
                 for i in range(6)]
    features = torch.arange(6, dtype=torch.float16)[:, None, None].expand(6, 4, 8).clone()
    samples = EncodedSamples(processor, features, [1, 4, 4], questions)
    seen = []
    for step in range(3):  # 3 steps of 4 = two epochs of 6
        batch = samples.batch(step, 4, 2, seed=5)
        assert torch.equal(batch["input_ids"], samples.batch(step, 4, 2, seed=5)["input_ids"])
        visual = [int(f[0, 0]) for f in batch["mm_encoder_outputs"]["image"].pooler_output]
        labels = batch["labels"]
        answers = [tokenizer.decode(row[row != -100], skip_special_tokens=True).split() for row in labels]
        assert [a[0] for a in answers] == [str(v) for v in visual]  # each image with its own first answer
        assert all(len(a) == 3 for a in answers)  # 1 + 2 follow-ups
        assert ((labels == tokenizer.eos_token_id).sum(1) == 3).all()
        assert ((batch["input_ids"] == processor.image_token_id).sum(1) == 4).all()
        seen += visual
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
    assert seen[:6] != seen[6:]  # a new order every epoch


def test_reference_widths_and_rotary_split_are_checked():
    from visionselector.reference.training import ReferenceConfig, build_reference_model

    model = build_reference_model(ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, text_layers=1,
                                                  vision_hidden=32, vision_depth=1))
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 6, 24]
    with pytest.raises(ValueError, match="summing to half the head width \\(32\\)"):
        build_reference_model(ReferenceConfig(hidden_size=64, text_heads=1, text_kv_heads=1, mrope_section=(8, 12, 16)))
    with pytest.raises(ValueError, match="must divide into text_heads"):
        build_reference_model(ReferenceConfig(hidden_size=64, text_heads=3))
