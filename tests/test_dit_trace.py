"""biasmap.trace on MM-DiTs (tiny SD3 and Flux) against naive recorders written here.

In-prompt reference: store every joint attention's inputs (the modulated image and text
tokens, the rotary table) of every step, then recompute q/k from the module weights with
plain torch (linear, RMS norm, rotary by hand), a full per-head softmax over the text keys,
the concept columns. Side-stream reference: store every block's inputs, then replay P''s
text through each real diffusers block as its text stream next to the recorded image
tokens (there the text attends to the image and itself; the replayed image output is
thrown away), recording the replayed attention inputs and recomputing as above. Shares no
code with biasmap.discovery.dit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import biasmap  # noqa: E402
from biasmap import models  # noqa: E402
from biasmap.discovery import ConceptNotFoundError  # noqa: E402

PROMPT = "a photo of the face of a firefighter"
ATTRIBUTION = "a photo of the face of a firefighter and gender"
STEPS = 2
TEXT_LENGTH = 16  # max_sequence_length of the T5 stream
TOL = 1e-5


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, sd3, flux):
    return {"sd3": sd3, "flux": flux}[request.param]


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=STEPS, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=generators if len(generators) > 1 else generators[0],
        output_type="pt",
        max_sequence_length=TEXT_LENGTH,
        **kwargs,
    ).images


def is_flux(pipe):
    return type(pipe).__name__ == "FluxPipeline"


def named_blocks(pipe):
    transformer = pipe.transformer
    blocks = [(f"joint-{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    if is_flux(pipe):
        blocks += [(f"single-{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    return blocks


def grid(pipe):
    return (4, 4)  # 64 px, VAE factor 8, patch 2 (SD3's patch embed / Flux's 2x2 packing)


IMAGE_TOKENS = 16


def cond_rows(pipe, batch):
    # SD3 runs CFG as one batch [uncond, cond]; Flux has no CFG batch.
    return slice(batch // 2, batch) if not is_flux(pipe) else slice(None)


# --------------------------------------------------------------------------- naive maths


def rms_norm(x, norm):
    if norm is None:
        return x
    x32 = x.double()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (out * norm.weight.double()).to(x.dtype)


def rotate(x, rotary, rows):
    """Rotary embedding by hand: pairs (x_2i, x_2i+1) turned by the recorded angles."""
    if rotary is None:
        return x
    cos, sin = (t[rows].to(x.dtype)[None, :, None, :] for t in rotary)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos[..., 0::2] - odd * sin[..., 0::2]
    out[..., 1::2] = odd * cos[..., 1::2] + even * sin[..., 1::2]
    return out


def project(linear, x, heads):
    y = x @ linear.weight.T + linear.bias
    return y.reshape(*y.shape[:2], heads, -1)


def naive_block_map(attn, image, text, rotary, positions, domain, single):
    """[R, C, N] concept columns of one joint attention from its recorded inputs.

    image [R, N, D], text [R, L, D]: the attention's (modulated) input tokens.
    positions: per concept, key positions in the text; domain: bool [L] ("prompt"),
    None ("padded") or "joint".
    """
    heads, length = attn.heads, text.shape[1]
    image_rows = slice(length, length + image.shape[1])
    text_rows = slice(0, length)
    q = rotate(rms_norm(project(attn.to_q, image, heads), attn.norm_q), rotary, image_rows)
    if single:
        k_text = rotate(rms_norm(project(attn.to_k, text, heads), attn.norm_k), rotary, text_rows)
    else:
        k_text = rotate(
            rms_norm(project(attn.add_k_proj, text, heads), attn.norm_added_k), rotary, text_rows
        )
    scale = q.shape[-1] ** -0.5
    logits = torch.einsum("rnhd,rlhd->rhnl", q, k_text) * scale
    if isinstance(domain, torch.Tensor):
        logits = logits.masked_fill(~domain, float("-inf"))
    if domain == "joint":
        k_image = rotate(
            rms_norm(project(attn.to_k, image, heads), attn.norm_k), rotary, image_rows
        )
        image_logits = torch.einsum("rnhd,rmhd->rhnm", q, k_image) * scale
        probs = torch.cat([image_logits, logits], dim=-1).softmax(-1)[..., image.shape[1] :]
    else:
        probs = logits.softmax(-1)
    columns = probs.sum(dim=1)  # [R, N, L]
    return torch.stack([columns[..., p].mean(-1) for p in positions], dim=1)


class AttentionRecorder:
    """Stores the inputs of every block's joint attention, per transformer call."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls = []  # (call, block name, attn, image, text, rotary, single)
        self.block_inputs = []  # (call, block name, block, kwargs)
        self.call = -1
        self.handles = []

    def __enter__(self):
        def on_transformer(module, args, kwargs):
            self.call += 1

        self.handles.append(
            self.pipe.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True)
        )
        for name, block in named_blocks(self.pipe):
            single = name.startswith("single")

            def on_block(module, args, kwargs, name=name):
                saved = {k: v for k, v in kwargs.items() if k != "joint_attention_kwargs"}
                self.block_inputs.append((self.call, name, module, saved))

            def on_attn(module, args, kwargs, name=name, single=single):
                hidden = kwargs["hidden_states"]
                rotary = kwargs.get("image_rotary_emb")
                if single:
                    # The single block hands its attention [text, image] in one tensor.
                    text = hidden[:, :-IMAGE_TOKENS]
                    image = hidden[:, -IMAGE_TOKENS:]
                else:
                    text, image = kwargs["encoder_hidden_states"], hidden
                self.calls.append(
                    (self.call, name, module, image.clone(), text.clone(), rotary, single)
                )

            self.handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
            self.handles.append(block.attn.register_forward_pre_hook(on_attn, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def naive_in_prompt_maps(pipe, recorder, positions, domain):
    sums = {}
    for _, name, attn, image, text, rotary, single in recorder.calls:
        rows = cond_rows(pipe, image.shape[0])
        columns = naive_block_map(attn, image[rows], text[rows], rotary, positions, domain, single)
        sums[name] = sums.get(name, 0) + columns.reshape(*columns.shape[:2], *grid(pipe))
    return sums


def encode(pipe, prompt):
    if is_flux(pipe):
        return pipe.encode_prompt(prompt, prompt, max_sequence_length=TEXT_LENGTH)[0]
    return pipe.encode_prompt(
        prompt, prompt, prompt, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH
    )[0]


def naive_side_stream_maps(pipe, recorder, attribution, positions, domain):
    """Replay P''s text through every recorded block call as that block's text stream."""
    sums = {}
    with torch.no_grad():
        side0 = pipe.transformer.context_embedder(encode(pipe, attribution))
        side = None
        for _, name, block, saved in recorder.block_inputs:
            if name == "joint-0":
                rows = cond_rows(pipe, saved["hidden_states"].shape[0])
                side = side0.expand(saved["hidden_states"][rows].shape[0], -1, -1)
            replayed = []
            handle = block.attn.register_forward_pre_hook(
                lambda m, a, kw, replayed=replayed: replayed.append(kw), with_kwargs=True
            )
            try:
                new_side, _ = block(
                    hidden_states=saved["hidden_states"][rows],
                    encoder_hidden_states=side,
                    temb=saved["temb"][rows],
                    **({"image_rotary_emb": saved["image_rotary_emb"]} if is_flux(pipe) else {}),
                )
            finally:
                handle.remove()
            kwargs = replayed[0]
            single = name.startswith("single")
            if single:
                text, image = (
                    kwargs["hidden_states"][:, : side.shape[1]],
                    kwargs["hidden_states"][:, side.shape[1] :],
                )
            else:
                text, image = kwargs["encoder_hidden_states"], kwargs["hidden_states"]
            columns = naive_block_map(
                block.attn, image, text, kwargs.get("image_rotary_emb"), positions, domain, single
            )
            sums[name] = sums.get(name, 0) + columns.reshape(*columns.shape[:2], *grid(pipe))
            side = new_side
    return sums


def text_layout(pipe):
    """(offset of the traced T5 segment in the joint text sequence, its tokenizer)."""
    if is_flux(pipe):
        return 0, pipe.tokenizer_2
    return pipe.tokenizer_max_length, pipe.tokenizer_3


def positions_and_domain(pipe, prompt, concepts, softmax_over):
    offset, tokenizer = text_layout(pipe)
    ids = tokenizer(prompt).input_ids
    positions = []
    for concept in concepts:
        sub = tokenizer(concept, add_special_tokens=False).input_ids
        start = next(i for i in range(len(ids)) if ids[i : i + len(sub)] == sub)
        positions.append([offset + start + j for j in range(len(sub))])
    total = offset + TEXT_LENGTH
    if softmax_over == "prompt":
        domain = torch.zeros(total, dtype=torch.bool)
        domain[offset : offset + len(ids)] = True
    else:
        domain = None if softmax_over == "padded" else "joint"
    return positions, domain


def assert_maps_equal(maps, reference):
    assert list(maps.blocks) == list(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(maps.blocks[name], expected.float(), rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("softmax_over", ["prompt", "padded", "joint"])
def test_in_prompt_maps_match_naive_recorder(pipe, softmax_over):
    concepts = ["firefighter", "face of"]
    plain = generate(pipe)
    with AttentionRecorder(pipe) as recorder:
        with biasmap.trace(pipe, PROMPT, concepts, softmax_over=softmax_over) as tr:
            images = generate(pipe)
    maps = tr.maps()
    assert torch.equal(images, plain)
    assert maps.meta["keys"] == "in-prompt" and maps.meta["text_stream"] == "t5"
    positions, domain = positions_and_domain(pipe, PROMPT, concepts, softmax_over)
    assert_maps_equal(maps, naive_in_prompt_maps(pipe, recorder, positions, domain))


@pytest.mark.parametrize("softmax_over", ["prompt", "joint"])
def test_side_stream_maps_match_naive_replay_and_leave_images_unchanged(pipe, softmax_over):
    concepts = ["gender", "firefighter"]
    plain = generate(pipe)
    with AttentionRecorder(pipe) as recorder:
        with biasmap.trace(pipe, ATTRIBUTION, concepts, softmax_over=softmax_over) as tr:
            images = generate(pipe)
    assert torch.equal(images, plain), "the side stream must not change the generation"
    maps = tr.maps()
    assert maps.meta["keys"] == "side-stream"
    positions, domain = positions_and_domain(pipe, ATTRIBUTION, concepts, softmax_over)
    assert_maps_equal(maps, naive_side_stream_maps(pipe, recorder, ATTRIBUTION, positions, domain))


def test_side_stream_with_same_prompt_equals_in_prompt_maps(pipe):
    # The side stream of P' == P sees the same image and the same text as the generation's
    # text stream, so it reproduces it: equal maps in every block, up to float rounding.
    with biasmap.trace(pipe, PROMPT, ["firefighter"], keys="in-prompt") as in_prompt:
        generate(pipe)
    with biasmap.trace(pipe, PROMPT, ["firefighter"], keys="side-stream") as side:
        generate(pipe)
    a, b = in_prompt.maps(), side.maps()
    for name in a.blocks:
        torch.testing.assert_close(a.blocks[name], b.blocks[name], rtol=TOL, atol=TOL)


def test_in_prompt_refuses_another_prompt_and_the_negative_half(sd3):
    with biasmap.trace(sd3, ATTRIBUTION, ["gender"], keys="in-prompt"):
        with pytest.raises(ValueError, match="must be the generation prompt"):
            generate(sd3)
    # SD3's unconditional rows hold the negative prompt's text, not P's.
    with biasmap.trace(sd3, PROMPT, ["firefighter"], cfg_half="uncond", keys="in-prompt"):
        with pytest.raises(ValueError, match="must be the generation prompt"):
            generate(sd3)
    with biasmap.trace(sd3, PROMPT, ["firefighter"], cfg_half="uncond") as tr:
        generate(sd3)
    assert tr.maps().meta["keys"] == "side-stream"


def test_block_names_and_selection(pipe):
    expected = ["joint-0", "joint-1", "joint-2"]
    if is_flux(pipe):
        expected = ["joint-0", "joint-1", "single-0", "single-1"]
    with biasmap.trace(pipe, ATTRIBUTION, ["gender"]) as every:
        generate(pipe)
    assert every.block_names == expected and list(every.maps().blocks) == expected
    # The side stream must still pass through the blocks before the selected one.
    last = expected[-1]
    with biasmap.trace(pipe, ATTRIBUTION, ["gender"], blocks=[last]) as one:
        generate(pipe)
    maps = one.maps()
    assert list(maps.blocks) == [last]
    torch.testing.assert_close(maps.blocks[last], every.maps().blocks[last], rtol=0, atol=0)
    assert maps.size == grid(pipe) and maps.aggregate.shape == (1, 1, *grid(pipe))
    with pytest.raises(ValueError, match=r"unknown block name.*'joint-0'"):
        biasmap.trace(pipe, ATTRIBUTION, ["gender"], blocks=["down-64"])


def test_memory_flat_in_steps_and_step_selection(flux):
    sizes = []
    for steps in (2, 4):
        with biasmap.trace(flux, ATTRIBUTION, ["gender"], timesteps=[0]) as tr:
            generate(flux, steps=steps)
        sizes.append(tr.captured_bytes)
        assert tr.maps().meta["steps_captured"] == 1
    assert sizes[0] == sizes[1] > 0


def test_batch_entries_are_independent(pipe):
    with biasmap.trace(pipe, ATTRIBUTION, ["gender", "firefighter"]) as pair:
        generate(pipe, prompt=[PROMPT, PROMPT], seeds=(0, 1))
    with biasmap.trace(pipe, ATTRIBUTION, ["gender", "firefighter"]) as single:
        generate(pipe, seeds=(1,))
    torch.testing.assert_close(
        pair.maps().aggregate[1:], single.maps().aggregate, rtol=TOL, atol=TOL
    )


def test_flux_true_cfg_uncond_reads_the_negative_call(flux):
    with biasmap.trace(flux, ATTRIBUTION, ["gender"], cfg_half="uncond") as tr:
        generate(flux)
    with pytest.raises(RuntimeError, match="true_cfg_scale"):
        tr.maps()
    with biasmap.trace(flux, ATTRIBUTION, ["gender"], cfg_half="uncond") as uncond:
        generate(flux, negative_prompt="", true_cfg_scale=2.0)
    with biasmap.trace(flux, ATTRIBUTION, ["gender"]) as cond:
        generate(flux, negative_prompt="", true_cfg_scale=2.0)
    assert uncond.maps().meta["steps_captured"] == STEPS == cond.maps().meta["steps_captured"]
    assert not torch.allclose(uncond.maps().aggregate, cond.maps().aggregate)


def _t5_like_tokenizer(words, max_length):
    """A word-level tokenizer shaped like T5's: no start token, "</s>" at the end."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({word: 3 + i for i, word in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def test_concept_positions_come_from_the_streams_tokenizer(pipe):
    words = ATTRIBUTION.split()
    attribute = "tokenizer_2" if is_flux(pipe) else "tokenizer_3"
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, _t5_like_tokenizer(words, 512))
    try:
        with biasmap.trace(pipe, ATTRIBUTION, ["firefighter", "gender"]) as tr:
            generate(pipe)
        maps = tr.maps()
        # No start token in this stream: "firefighter" is word 7, where CLIP has it at 8.
        assert maps.meta["concept_positions"] == [[7], [9]]
        assert maps.meta["prompt_tokens"][-1] == "</s>"
        with pytest.raises(ConceptNotFoundError, match=r"'firefighter', 'and', 'gender', '</s>'"):
            biasmap.trace(pipe, ATTRIBUTION, ["nurse"])
        # SD3's CLIP stream keeps CLIP's positions, from its own tokenizer.
        if not is_flux(pipe):
            with biasmap.trace(pipe, ATTRIBUTION, ["firefighter"], text_stream="clip") as clip:
                generate(pipe)
            assert clip.maps().meta["concept_positions"] == [[8]]
            assert clip.maps().meta["prompt_tokens"][0] == "<|startoftext|>"
    finally:
        setattr(pipe, attribute, original)


def test_dit_option_errors(sd3, flux):
    with pytest.raises(ValueError, match="its token stream is T5"):
        biasmap.trace(flux, ATTRIBUTION, ["gender"], text_stream="clip")
    with pytest.raises(
        ValueError, match=r"softmax_over must be one of \['prompt', 'padded', 'joint'\]"
    ):
        biasmap.trace(sd3, ATTRIBUTION, ["gender"], softmax_over="all")
    with pytest.raises(ValueError, match="keys must be one of"):
        biasmap.trace(sd3, ATTRIBUTION, ["gender"], keys="text")
    tiny = models.tiny_sd(0)
    with pytest.raises(ValueError, match="MM-DiT pipelines"):
        biasmap.trace(tiny, ATTRIBUTION, ["gender"], keys="side-stream")
