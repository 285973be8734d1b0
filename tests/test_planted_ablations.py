"""The planted-world ablation bench's building blocks (bench/planted_ablations.py): each
variant is the change it claims to be, and the per-head recorder leaves the model unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import planted_ablations as ablations  # noqa: E402
from biasmap.world import train  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return train.build_clip(text_width=16).eval()


def _ids(text: str):
    from biasmap.models import clip_tokenizer

    return clip_tokenizer()(text, padding="max_length", max_length=77, return_tensors="pt")


def test_first_layer_variant_conditions_on_the_trained_towers_first_layer(clip):
    tower, exported = ablations._text_variant(train, clip, "first-layer")
    ids = _ids("A photo of the face of a nurse and second gender").input_ids
    with torch.no_grad():
        states = clip.text_model(ids, output_hidden_states=True).hidden_states
        expected = clip.text_model.final_layer_norm(states[1])
        got = tower(ids)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(exported.text_model.encoder.layers) == 1
    assert len(clip.text_model.encoder.layers) == 3  # the trained CLIP is left whole


def test_embedding_variants_condition_on_each_words_own_embedding(clip):
    ids = _ids("A photo of the face of a nurse and second gender").input_ids
    embeddings = clip.text_model.embeddings
    norm = clip.text_model.final_layer_norm
    with torch.no_grad():
        positioned, _ = ablations._text_variant(train, clip, "embeddings")
        torch.testing.assert_close(
            positioned(ids)[0],
            norm(embeddings.token_embedding(ids) + embeddings.position_embedding.weight[:77]),
        )
        bare, exported = ablations._text_variant(train, clip, "embeddings-no-position")
        torch.testing.assert_close(bare(ids)[0], norm(embeddings.token_embedding(ids)))
        # The same word gives the same state wherever it stands.
        gender = _ids("gender and a nurse").input_ids
        torch.testing.assert_close(bare(gender)[0][0, 1], bare(ids)[0][0, 11])
    assert len(exported.text_model.encoder.layers) == 0
    assert len(clip.text_model.encoder.layers) == 3


def test_random_variant_replaces_the_tower_and_exports_what_the_unet_saw(clip):
    tower, exported = ablations._text_variant(train, clip, "random")
    ids = _ids("A photo of the face of a nurse").input_ids
    with torch.no_grad():
        trained = train.text_tower(clip)(ids)[0]
        conditioned = tower(ids)[0]
        shipped = train.text_tower(exported)(ids)[0]
    assert not torch.allclose(conditioned, trained)
    torch.testing.assert_close(shipped, conditioned)
    with pytest.raises(ValueError, match="unknown text variant"):
        ablations._text_variant(train, clip, "bigger")


def test_pixel_vae_latents_are_the_pooled_image_and_decode_upsamples():
    vae = ablations.pixel_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = vae.encode(x).latent_dist.sample()
    torch.testing.assert_close(latents, F.avg_pool2d(x, 2))
    decoded = vae.decode(latents).sample
    torch.testing.assert_close(decoded[:, :, ::2, ::2], latents)
    torch.testing.assert_close(decoded[:, :, 1::2, 1::2], latents)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2  # the pipeline's scale factor


def test_summary_reads_spearman_and_means_from_the_figures():
    from biasmap.world.spec import PROFESSIONS, SPEC

    def figures(axis, sign):
        return {
            p: {
                "miou": sign * SPEC[p]["entanglement"][axis] + 0.001 * i,
                "axis_contrast": 2.0,
                "axis_peak_in_region": 1.0,
                "profession_contrast": 1.0 + i,
                "profession_peak_in_item": 0.5,
            }
            for i, p in enumerate(PROFESSIONS)
        }

    rows = ablations._summary(
        {"figures": {"gender": figures("gender", 1), "race": figures("race", -1)}}
    )
    from scipy.stats import spearmanr

    expected = spearmanr(
        [figures("gender", 1)[p]["miou"] for p in PROFESSIONS],
        [SPEC[p]["entanglement"]["gender"] for p in PROFESSIONS],
    )[0]
    assert rows["gender"]["spearman"] == pytest.approx(expected)
    assert rows["gender"]["spearman"] > 0.9 and rows["race"]["spearman"] < -0.9
    assert rows["gender"]["axis_contrast"] == 2.0
    assert rows["gender"]["profession_contrast"] == pytest.approx(1.0 + np.mean(range(8)))


def test_cross_attention_recorder_leaves_the_unet_output_unchanged():
    torch.manual_seed(0)
    unet = train.build_unet((8, 16), 16).eval()
    sample, states = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 16)
    with torch.no_grad():
        before = unet(sample, 10, encoder_hidden_states=states).sample
        calls: list = []
        unet.set_attn_processor(
            {
                name: ablations._CrossAttentionRecorder("all", calls, processor)
                for name, processor in unet.attn_processors.items()
            }
        )
        after = unet(sample, 10, encoder_hidden_states=states).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert len(calls) == 7  # one per down block, the mid block, two per up block
    _, heads, probabilities = calls[0]
    assert probabilities.shape == (2 * heads, 256, 77)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2 * heads, 256))


def test_prototype_caption_variant_names_the_class_and_keeps_the_caption_set_shape():
    shipped = train.unet_caption_set()
    prototype = train.unet_caption_set(ablations.prototype_caption)
    assert len(prototype) == len(shipped) == len(set(prototype))
    assert "A photo of the face of a female nurse, gender female" in prototype
    assert "A photo of the face of a Asian chef, race Asian" in prototype
    assert "A photo of the face of a nurse and second gender" in shipped
    assert shipped[1] == prototype[1] == "A photo of the face of a firefighter"


def test_uniform_batch_draws_every_class_equally_and_renders_its_labels():
    from biasmap.world.detect import detect
    from biasmap.world.spec import AXES

    batch = ablations.uniform_batch(4000, np.random.default_rng(0))
    teachers = [i for i, p in enumerate(batch.professions) if p == "teacher"]
    # SPEC makes teachers 95% male and 85% white; here every class has its equal share.
    for axis, labels in (("gender", batch.genders), ("race", batch.races)):
        shares = [np.mean([labels[i] == c for i in teachers]) for c in AXES[axis]]
        assert shares == pytest.approx([1 / len(AXES[axis])] * len(AXES[axis]), abs=0.06)
    for i in range(8):
        found = detect(batch.images[i])
        assert (found.profession, found.gender, found.race) == (
            batch.professions[i],
            batch.genders[i],
            batch.races[i],
        )


def test_word_state_cosines_are_one_for_word_only_states_and_below_one_in_context(clip):
    from types import SimpleNamespace

    from biasmap.models import clip_tokenizer

    def cosines(kind):
        tower, _ = ablations._text_variant(train, clip, kind)
        return ablations.word_state_cosines(
            SimpleNamespace(tokenizer=clip_tokenizer(), text_encoder=tower)
        )

    word_only = cosines("embeddings-no-position")
    assert len(word_only) == len(ablations.WORD_STATE_PAIRS)
    labels = [label for label, *_ in ablations.WORD_STATE_PAIRS]
    assert word_only[labels[1]] == pytest.approx(1.0) and word_only[labels[2]] == pytest.approx(1.0)
    assert word_only[labels[0]] < 0.99  # two different words
    in_context = cosines(None)
    assert in_context[labels[2]] < 0.99  # the full tower mixes in the prefix
