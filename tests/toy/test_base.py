import torch
from diffusers import StableDiffusionPipeline

from tuner.toy import base, batches


def test_fresh_pipeline_samples_saves_and_reloads(tmp_path):
    torch.set_num_threads(1)
    pipe = base.make_pipeline(*base.build_components(seed=0))
    assert pipe.vae.config.block_out_channels and base.LATENT_SIZE == 16
    images = base.sample_images(pipe, ["a red circle on a blue background"], steps=2)
    assert images[0].size == (64, 64)

    size = base.save_pipeline(pipe, tmp_path / "toy")
    assert size < 20_000_000
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "toy")
    assert {loaded.unet.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.float32}
    assert loaded.safety_checker is None
    ids = loaded.tokenizer("a red circle").input_ids
    assert len(ids) == 5  # bos, a, red, circle, eos
    again = base.sample_images(loaded, ["a red circle on a blue background"], steps=2)
    assert again[0].size == (64, 64)


def test_training_captions_mix_full_partial_and_empty():
    import numpy as np

    from tuner.toy import world

    rng = np.random.default_rng(0)
    spec = world.Spec("circle", "red", "blue")
    captions = {batches.training_caption(spec, rng) for _ in range(200)}
    assert captions == {
        "",
        "a red circle on a blue background",
        "a circle on a blue background",
        "a red circle",
        "a circle",
    }
