"""biasmap.trace against an independent, naive OVAM-style implementation written here.

The naive recorder stores every attn2 input of every step (what OVAM does), then
recomputes: q = to_q(h), K' = to_k(text_encoder(P')) from the raw text encoder, a full
per-head softmax [B, H, N, 77], the concept columns, a per-(layer, step) bilinear
resize to S, and sums. It shares no code with biasmap.discovery. Tiny pipelines, few
steps: the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import biasmap  # noqa: E402
from biasmap.discovery import ConceptNotFoundError  # noqa: E402
from biasmap.models import tiny_sd, tiny_sdxl  # noqa: E402

PROMPT = "A photo of the face of a firefighter"
ATTRIBUTION = "A photo of the face of a firefighter and gender"
# Read off by hand from the CLIP tokenizer:
# <sot> a photo of the face of a firefighter and gender <eot>
ATTRIBUTION_POSITIONS = {"firefighter": [8], "gender": [10], "firefighter and gender": [8, 9, 10]}
ATTRIBUTION_REAL_TOKENS = 12
STEPS = 3


@pytest.fixture(scope="module")
def sd():
    return tiny_sd(0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(0)


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=STEPS, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=generators if len(generators) > 1 else generators[0],
        output_type="pt",
        **kwargs,
    ).images


class NaiveRecorder:
    """Stores every attn2 input (hidden states) of every UNet call: the OVAM way."""

    def __init__(self, unet):
        self.unet = unet
        # (step, module name, attn module, hidden states [B_cfg, N, C], encoder states)
        self.calls = []
        self.step = -1
        self.handles = []

    def __enter__(self):
        def on_unet(module, args, kwargs):
            self.step += 1

        self.handles.append(self.unet.register_forward_pre_hook(on_unet, with_kwargs=True))
        for name, module in self.unet.named_modules():
            if name.endswith("attn2"):

                def on_attn(module, args, kwargs, name=name):
                    hidden = args[0]
                    encoder = kwargs.get(
                        "encoder_hidden_states", args[1] if len(args) > 1 else None
                    )
                    self.calls.append(
                        (self.step, name, module, hidden.detach().clone(), encoder.detach().clone())
                    )

                self.handles.append(module.register_forward_pre_hook(on_attn, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def block_name(module_name: str, num_queries: int, aspect: float = 1.0) -> str:
    """down_blocks.1.attentions.0...attn2 with N = h*w queries -> 'down-h' (square latents)."""
    stage = module_name.split(".")[0].split("_")[0]
    side = int(round(math.sqrt(num_queries / aspect)))
    return f"{stage}-{side}"


def naive_maps(
    calls,
    text_states,
    positions,
    *,
    cfg_half,
    softmax_over,
    size,
    num_real,
    steps=None,
    include_mid=False,
):
    """Per-block maps {name: [B, C, S, S]} recomputed from stored attn2 inputs."""
    blocks = {}
    for step, name, attn, hidden, _ in calls:
        if steps is not None and step not in steps:
            continue
        if name.startswith("mid") and not include_mid:
            continue
        batch = hidden.shape[0] // 2 if cfg_half is not None else hidden.shape[0]
        rows = {"cond": slice(batch, None), "uncond": slice(0, batch), None: slice(None)}[cfg_half]
        q = attn.to_q(hidden[rows])  # [B, N, H*d]
        k = attn.to_k(text_states)  # [1, 77, H*d]
        heads = attn.heads
        d = q.shape[-1] // heads
        qh = q.view(q.shape[0], q.shape[1], heads, d).permute(0, 2, 1, 3)
        kh = k.view(1, k.shape[1], heads, d).permute(0, 2, 1, 3)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # [B, H, N, 77]
        if softmax_over == "prompt":
            scores = scores[..., :num_real]
        probs = scores.softmax(-1)
        per_concept = torch.stack(
            [probs[..., p].mean(-1) for p in positions], dim=1
        )  # [B, C, H, N]
        per_concept = per_concept.sum(2)  # over heads: [B, C, N]
        side = int(math.isqrt(per_concept.shape[-1]))
        spatial = per_concept.view(*per_concept.shape[:2], side, side)
        resized = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        key = block_name(name, per_concept.shape[-1])
        blocks[key] = blocks.get(key, 0) + resized
    return blocks


def sd_text_states(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def assert_maps_match(maps, reference):
    assert list(maps.blocks) == list(reference), (list(maps.blocks), list(reference))
    for name, expected in reference.items():
        torch.testing.assert_close(maps.blocks[name], expected, atol=1e-5, rtol=1e-5, msg=name)
    total = sum(reference.values())
    torch.testing.assert_close(maps.aggregate, total, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_half", ["cond", "uncond"])
@pytest.mark.parametrize("softmax_over", ["prompt", "padded"])
def test_maps_equal_naive_recomputation(sd, cfg_half, softmax_over):
    concepts = ["gender", "firefighter", "firefighter and gender"]
    with torch.no_grad(), NaiveRecorder(sd.unet) as recorder:
        with biasmap.trace(
            sd, ATTRIBUTION, concepts, cfg_half=cfg_half, softmax_over=softmax_over
        ) as tr:
            generate(sd, [PROMPT, "A photo of the face of a nurse"])
        maps = tr.maps()
        reference = naive_maps(
            recorder.calls,
            sd_text_states(sd, ATTRIBUTION),
            [ATTRIBUTION_POSITIONS[c] for c in concepts],
            cfg_half=cfg_half,
            softmax_over=softmax_over,
            size=(16, 16),
            num_real=ATTRIBUTION_REAL_TOKENS,
        )
    assert maps.aggregate.shape == (2, 3, 16, 16)
    assert maps.concepts == concepts
    assert_maps_match(maps, reference)
    # Capture memory: running sums at each block's own resolution, never more than blocks x C x S^2.
    assert tr.captured_bytes <= len(maps.blocks) * 3 * 16 * 16 * 4 * 2


def test_padded_maps_equal_layer_attention_probabilities(sd):
    """P' = P and all 77 positions: the cond-half maps are the layer's own cross-attention."""
    concepts = ["firefighter", "photo"]
    positions = [[8], [2]]
    with torch.no_grad(), NaiveRecorder(sd.unet) as recorder:
        with biasmap.trace(sd, PROMPT, concepts, softmax_over="padded", blocks="all") as tr:
            generate(sd)
        maps = tr.maps()
        expected = {}
        for _, name, attn, hidden, encoder in recorder.calls:
            # diffusers' own attention probabilities, fed the pipeline's own encoder states.
            query = attn.head_to_batch_dim(attn.to_q(hidden))
            key = attn.head_to_batch_dim(attn.to_k(encoder))
            probs = attn.get_attention_scores(query, key)  # [B_cfg * H, N, 77]
            probs = probs.view(-1, attn.heads, *probs.shape[1:])[1:]  # cond half of a batch of 1
            columns = probs[..., [p[0] for p in positions]].sum(1).transpose(1, 2)  # [1, C, N]
            side = int(math.isqrt(columns.shape[-1]))
            resized = F.interpolate(columns.view(1, 2, side, side), size=(16, 16), mode="bilinear")
            key_name = block_name(name, columns.shape[-1])
            expected[key_name] = expected.get(key_name, 0) + resized
    assert_maps_match(maps, expected)
    assert "mid-2" in maps.blocks


def test_images_bit_identical_with_and_without_trace(sd):
    plain = generate(sd, guidance_scale=7.5)
    with biasmap.trace(sd, ATTRIBUTION, ["gender", "firefighter"]) as tr:
        traced = generate(sd, guidance_scale=7.5)
    assert torch.equal(plain, traced)
    assert tr.maps().aggregate.abs().sum() > 0


def _attn2_modules(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


def test_processors_and_hooks_restored_after_exit_and_exception(sd):
    before = {n: p for n, p in sd.unet.attn_processors.items()}
    modules = _attn2_modules(sd.unet)

    def assert_restored():
        after = sd.unet.attn_processors
        assert all(after[n] is p for n, p in before.items())
        assert all(not m.to_q._forward_hooks for m in modules)
        assert not sd.unet._forward_pre_hooks

    with biasmap.trace(sd, ATTRIBUTION, ["gender"]):
        assert all(type(m.processor).__name__.startswith("Capturing") for m in modules)
    assert_restored()

    class Boom(Exception):
        pass

    def explode(pipe, step, timestep, callback_kwargs):
        raise Boom

    with pytest.raises(Boom):
        with biasmap.trace(sd, ATTRIBUTION, ["gender"]):
            generate(sd, callback_on_step_end=explode)
    assert_restored()


def test_absent_concept_lists_prompt_tokens(sd):
    with pytest.raises(ConceptNotFoundError) as error:
        biasmap.trace(sd, ATTRIBUTION, ["gender", "race"])
    message = str(error.value)
    assert "'race'" in message and "firefighter" in message and "gender" in message


def test_concept_beyond_the_token_limit_says_the_prompt_was_truncated(sd):
    long_prompt = PROMPT + " and a" * 40 + " gender"  # "gender" lands past token 77
    with pytest.raises(ConceptNotFoundError, match="truncated to the text encoder's 77"):
        biasmap.trace(sd, long_prompt, ["gender"])
    # A concept absent from the whole prompt keeps the ordinary message.
    with pytest.raises(ConceptNotFoundError, match="is not in the attribution prompt"):
        biasmap.trace(sd, long_prompt, ["race"])


def test_batch_entries_are_independent(sd):
    """Two prompts x two images each: every entry equals its own single-image generation."""
    prompts = [PROMPT, "A photo of the face of a nurse"]
    seeds = [0, 1, 2, 3]
    with biasmap.trace(sd, ATTRIBUTION, ["gender", "firefighter"]) as tr:
        generate(sd, prompts, seeds=seeds, num_images_per_prompt=2)
    batched = tr.maps()
    assert batched.aggregate.shape[0] == 4
    for entry, (prompt, seed) in enumerate(
        zip([prompts[0]] * 2 + [prompts[1]] * 2, seeds, strict=True)
    ):
        with biasmap.trace(sd, ATTRIBUTION, ["gender", "firefighter"]) as tr:
            generate(sd, prompt, seeds=(seed,))
        torch.testing.assert_close(
            batched.aggregate[entry], tr.maps().aggregate[0], atol=1e-4, rtol=1e-4
        )
    assert not torch.allclose(batched.aggregate[0], batched.aggregate[1])


def test_no_cfg_and_timestep_selection(sd):
    with torch.no_grad(), NaiveRecorder(sd.unet) as recorder:
        with biasmap.trace(sd, ATTRIBUTION, ["gender"], timesteps=0.5) as tr:
            generate(sd, steps=4, guidance_scale=1.0)
        maps = tr.maps()
        reference = naive_maps(
            recorder.calls,
            sd_text_states(sd, ATTRIBUTION),
            [[10]],
            cfg_half=None,
            softmax_over="prompt",
            size=(16, 16),
            num_real=ATTRIBUTION_REAL_TOKENS,
            steps={0, 1},
        )
    assert maps.meta["steps"] == [0, 1] and maps.meta["steps_captured"] == 2
    assert_maps_match(maps, reference)
    with pytest.raises(ValueError, match="uncond"):
        with biasmap.trace(sd, ATTRIBUTION, ["gender"], cfg_half="uncond"):
            generate(sd, guidance_scale=1.0)


def test_other_schedulers_non_square_and_block_choice(sd):
    from diffusers import EulerAncestralDiscreteScheduler, HeunDiscreteScheduler

    original = sd.scheduler
    try:
        for scheduler_class in (EulerAncestralDiscreteScheduler, HeunDiscreteScheduler):
            sd.scheduler = scheduler_class.from_config(original.config)
            with biasmap.trace(sd, ATTRIBUTION, ["gender"], timesteps=slice(0, None, 2)) as tr:
                generate(sd, steps=2)
            maps = tr.maps()
            unet_calls = len(sd.scheduler.timesteps)  # Heun: 2 UNet calls per step but the last
            assert maps.meta["num_steps"] == unet_calls
            assert maps.meta["steps"] == list(range(0, unet_calls, 2))
    finally:
        sd.scheduler = original
    with biasmap.trace(
        sd, ATTRIBUTION, ["gender", "firefighter"], blocks=["down-16x24", "up-16x24"]
    ) as tr:
        generate(sd, height=128, width=192)
    maps = tr.maps()
    assert list(maps.blocks) == ["down-16x24", "up-16x24"]
    assert maps.aggregate.shape == (1, 2, 16, 24)
    assert maps.resize(32).aggregate.shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="down-16"):
        with biasmap.trace(sd, ATTRIBUTION, ["gender"], blocks=["down-64"]):
            generate(sd)


def test_tiny_sdxl_matches_naive(sdxl):
    with torch.no_grad(), NaiveRecorder(sdxl.unet) as recorder:
        with biasmap.trace(sdxl, ATTRIBUTION, ["gender", "firefighter"]) as tr:
            generate(sdxl)
        maps = tr.maps()
        # SDXL conditions on both encoders' penultimate hidden states, concatenated.
        states = []
        for tokenizer, encoder in (
            (sdxl.tokenizer, sdxl.text_encoder),
            (sdxl.tokenizer_2, sdxl.text_encoder_2),
        ):
            ids = tokenizer(
                ATTRIBUTION, padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
            states.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        reference = naive_maps(
            recorder.calls,
            torch.cat(states, dim=-1),
            [[10], [8]],
            cfg_half="cond",
            softmax_over="prompt",
            size=(8, 8),
            num_real=ATTRIBUTION_REAL_TOKENS,
        )
    assert list(maps.blocks) == ["down-8", "down-4", "up-4", "up-8"]
    assert_maps_match(maps, reference)


def test_tiny_sd2_variant_works():
    pipe = tiny_sd(0, variant="sd2")
    assert pipe.tokenizer.pad_token == "!"
    with biasmap.trace(pipe, ATTRIBUTION, ["gender", "firefighter"]) as tr:
        generate(pipe, steps=2)
    assert tr.maps().aggregate.shape == (1, 2, 16, 16)


class LinearQueryProcessor:
    """A processor that never calls the attn.to_q module (F.linear on its weight instead), so the
    trace cannot read the query from its hook and must recompute it."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        query = F.linear(hidden_states, attn.to_q.weight, attn.to_q.bias)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        def split(t):
            return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, query.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def test_query_recomputed_when_processor_bypasses_to_q_and_memory_is_flat(sd):
    with biasmap.trace(sd, ATTRIBUTION, ["gender"]) as tr:
        generate(sd)
    expected = tr.maps()
    modules = _attn2_modules(sd.unet)
    originals = [m.processor for m in modules]
    try:
        for module in modules:
            module.set_processor(LinearQueryProcessor())
        with biasmap.trace(sd, ATTRIBUTION, ["gender"]) as tr:
            generate(sd)
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.set_processor(original)
    torch.testing.assert_close(tr.maps().aggregate, expected.aggregate, atol=1e-4, rtol=1e-4)

    # The running sums do not grow with the number of steps.
    sizes = []
    for steps in (1, 4):
        with biasmap.trace(sd, ATTRIBUTION, ["gender", "firefighter"]) as tr:
            generate(sd, steps=steps)
        sizes.append(tr.captured_bytes)
    assert sizes[0] == sizes[1] == 2 * 4 * (16 * 16 + 8 * 8 + 4 * 4) * 2  # 2 concepts, 6 blocks
