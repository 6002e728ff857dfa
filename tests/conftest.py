import pytest
import torch

from visionselector.presets import build_qwen2_5_vl, tiny_qwen2_5_vl_config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_model(attn_implementation="sdpa", seed=0, **overrides):
    return build_qwen2_5_vl(tiny_qwen2_5_vl_config(attn_implementation=attn_implementation, **overrides), seed=seed)


def randomise_scorer(model, seed=1, std=0.5):
    """A scorer whose ranking is far from flat, so selections are meaningful."""
    import visionselector as vs

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vs.get_scorer(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_qwen2_5_vl_config()


def single_sample(batch, row, specs):
    """Sample ``row`` of a synthetic batch built from ``specs``, unpadded, with its own pixels."""
    keep = batch["attention_mask"][row].bool()
    single = {"input_ids": batch["input_ids"][row, keep][None],
              "mm_token_type_ids": batch["mm_token_type_ids"][row, keep][None]}
    single["attention_mask"] = torch.ones_like(single["input_ids"])
    for kind, pixels, grids in (("images", "pixel_values", "image_grid_thw"),
                                ("videos", "pixel_values_videos", "video_grid_thw")):
        counts = [len(getattr(spec, kind)) for spec in specs]
        if not counts[row]:
            continue
        sizes = [int(g.prod()) for g in batch[grids]]
        first = sum(counts[:row])
        start = sum(sizes[:first])
        stop = start + sum(sizes[first:first + counts[row]])
        single[pixels] = batch[pixels][start:stop]
        single[grids] = batch[grids][first:first + counts[row]]
        if kind == "videos":
            single["second_per_grid_ts"] = batch["second_per_grid_ts"][first:first + counts[row]]
    return single


def full_embeddings(model, batch):
    """The unpruned input of the text model: token embeddings with the visual features
    scattered in (images before videos within each sample), and the 3-D positions."""
    core = model.model
    ids = batch["input_ids"]
    embeds = core.get_input_embeddings()(ids)
    features = []
    if "pixel_values" in batch:
        features += list(core.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    if "pixel_values_videos" in batch:
        features += list(core.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output)
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    embeds[visual] = torch.cat(features)
    positions, _ = core.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), second_per_grid_ts=batch.get("second_per_grid_ts"),
        attention_mask=batch.get("attention_mask"),
    )
    return embeds, positions, visual
