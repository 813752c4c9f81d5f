"""Tiny, random-weight stand-ins for Clair's two real model kinds, built entirely in code.

What this is
    ``build_tiny_sdxl`` returns a genuine ``diffusers.StableDiffusionXLPipeline`` (dual CLIP text encoders,
    a ``text_time`` UNet, an 8x AutoencoderKL, SDXL's Euler scheduler settings) whose networks have only a
    handful of channels and random weights. ``build_tiny_chat`` returns a two-layer ``LlamaForCausalLM`` with a
    byte-level BPE tokenizer whose merges spell a small English word list (any text still round-trips) and a
    Jinja chat template. The weights are random: **images are coloured noise and text is readable gibberish**
    (the output layer favours the word tokens, so replies stream word by word). Only the plumbing is real: shapes, call signatures, callbacks, schedulers,
    ``save_pretrained``/``from_pretrained``, ``generate`` and streaming all behave like the full-size models.

Why
    The dev and CI machines have no model hub and no GPU, and nothing may be downloaded. These models let the
    tests exercise the same code paths a real checkpoint uses (``save_tiny_*`` writes a safetensors folder that
    loads through ``from_pretrained(folder, local_files_only=True)``), and give ``--demo`` mode something that
    runs in a second on a laptop.

Measured (2 CPU cores, torch 2.13 CPU, diffusers 0.42.1, transformers 5.23, fp32; medians of warm runs)
    build_tiny_sdxl 0.05 s; 64x64 2-step render 0.06 s (first call in a process ~0.1-0.9 s of warm-up);
    1024x1024 4-step 0.9 s; 2048x2048 4-step 7.8 s; build_tiny_chat 0.01 s; 32 tokens 0.15 s (streamed or
    not). Peak RSS ~0.9 GiB including imports and a 2048px render. The whole SDXL folder is ~0.7 MB.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = ["build_tiny_chat", "build_tiny_sdxl", "build_tiny_vae", "save_tiny_chat", "save_tiny_sdxl", "save_tiny_vae"]

# ---------------------------------------------------------------------------------------------------------
# Shared helpers


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for construction without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP mapping), in byte order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in byte order. (This is
    GPT-2's ``bytes_to_unicode``, which transformers 5 no longer exports from its tokenizer modules.)
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# ---------------------------------------------------------------------------------------------------------
# Tiny SDXL

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_MAX_LENGTH = 77
_TEXT_HIDDEN = 32  # each text encoder's hidden size; the UNet cross-attends to both, concatenated (64)
_TEXT_PROJECTION = 32  # text_encoder_2's pooled projection, fed to the UNet's text_time embedding
_TIME_EMBED = 8  # addition_time_embed_dim: 6 micro-conditioning numbers x 8 = 48


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: the two specials plus every byte char with and without ``</w>`` (514 ids)."""
    chars = _byte_chars()
    tokens = [_CLIP_BOS, _CLIP_EOS, *chars, *(c + "</w>" for c in chars)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def _clip_config(vocab_size: int, bos_id: int, eos_id: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,  # pooled output = hidden state at the first eos, as in CLIP proper
        pad_token_id=eos_id,
        **extra,
    )


def _tiny_vae(force_upcast: bool = True) -> AutoencoderKL:
    """SDXL's VAE layout (8x downsampling, 4 latent channels, SDXL's scaling factor) with a few channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's
        mid_block_add_attention=False,  # attention over 128x128 latents would dominate 1024px decodes
        force_upcast=force_upcast,  # True, as the stock SDXL VAE: diffusers decodes it in fp32
    )


def build_tiny_vae(seed: int = 1, fp16_safe: bool = True) -> AutoencoderKL:
    """A stand-alone tiny SDXL-shaped ``AutoencoderKL`` (random weights), to stand in for a replacement VAE.

    ``fp16_safe`` writes ``force_upcast=False`` into its config, as an fp16-safe VAE has (diffusers then
    decodes it in the pipeline's dtype); ``False`` gives the stock VAE's ``force_upcast=True``. The default
    seed differs from the pipeline's (0), so an image decoded by it differs from one decoded by the
    pipeline's own VAE.
    """
    with _seeded(seed):
        return _tiny_vae(force_upcast=not fp16_safe)


def save_tiny_vae(path: str | Path, seed: int = 1, fp16_safe: bool = True) -> Path:
    """``save_pretrained`` a tiny VAE (config.json + diffusion_pytorch_model.safetensors) into ``path``.

    Load it back with ``AutoencoderKL.from_pretrained(folder)``.
    """
    folder = Path(path)
    build_tiny_vae(seed, fp16_safe).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A real ``StableDiffusionXLPipeline`` with tiny random-weight components (fp32, CPU).

    The VAE keeps SDXL's 8x downsampling (4 levels, a few channels each, no attention in its mid block), so
    any width/height that is a multiple of 8 works, exactly as with the real model.
    """
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=128,  # latent size; the pipeline's default resolution is 128 * 8 = 1024 like SDXL
            in_channels=4,
            out_channels=4,
            # Three levels like SDXL, but attention only on the lowest (1/4 of the latent): full self-attention
            # over a 1024px image's 128x128 latent would cost seconds per step even at these widths.
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=(2, 2, 4),  # diffusers' name for the head *count* per block
            transformer_layers_per_block=1,
            use_linear_projection=True,
            cross_attention_dim=2 * _TEXT_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * _TIME_EMBED + _TEXT_PROJECTION,
        )
        vae = _tiny_vae()
        tokenizer = _clip_tokenizer()
        tokenizer_2 = _clip_tokenizer()
        ids = {"vocab_size": len(tokenizer), "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id}
        text_encoder = CLIPTextModel(_clip_config(**ids))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(**ids, projection_dim=_TEXT_PROJECTION))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    _sim_sdxl_memory(pipe)
    return pipe


def _sim_sdxl_memory(pipe: StableDiffusionXLPipeline) -> None:
    """Declare what the real SDXL would take on the device, so a simulated card sees a real render's memory.

    Each part declares the real part's weights (`sim_bytes`, moved by clair.device.gpu.WeightSwap); each UNet call
    takes a real step's activations at the latents' size, and the VAE decode the real decode's peak (the
    stock VAE's fp32 decode when `force_upcast` is set, one tile's when diffusers will really tile), all
    from the simulated card's own table (clair/device/simcard.py). The arithmetic stays on the CPU. On CUDA or
    without a device these calls do nothing. `pipe.sim_render_size = (w, h)` makes a smaller drawing count
    as that size (the benchmark draws 64² and declares 1024²).
    """
    from clair.device import card as device
    from clair.device import simcard

    fig = simcard.FIGURES
    pipe.unet.sim_bytes = fig["sdxl_unet"]
    pipe.vae.sim_bytes = fig["sdxl_vae"]
    pipe.text_encoder.sim_bytes = fig["sdxl_text_encoder"]
    pipe.text_encoder_2.sim_bytes = fig["sdxl_text_encoder_2"]
    unet_forward, vae_decode = pipe.unet.forward, pipe.vae.decode

    def size(latents: torch.Tensor) -> tuple[int, int, float]:
        h, w = int(latents.shape[-2]) * 8, int(latents.shape[-1]) * 8
        as_if = getattr(pipe, "sim_render_size", None)
        if as_if:
            return int(as_if[0]), int(as_if[1]), as_if[0] / w
        return w, h, 1.0

    @functools.wraps(unet_forward)
    def forward(sample, *args, **kwargs):
        w, h, _ = size(sample)
        alloc, reserved = simcard.render_peak(w, h, "fp16", decode=False)
        # The first step creates cuBLAS's workspace, outside the caching allocator.
        with device.current().transient(alloc, reserved - alloc, first_use="cublas"):
            return unet_forward(sample, *args, **kwargs)

    @functools.wraps(vae_decode)
    def decode(z, *args, **kwargs):
        vae = pipe.vae
        w, h, scale = size(z)
        kind = "stock" if vae.config.force_upcast else "fp16"
        tiled = vae.use_tiling and (z.shape[-1] > vae.tile_latent_min_size or z.shape[-2] > vae.tile_latent_min_size)
        if tiled:
            alloc, reserved = simcard.tiled_decode_peak(int(vae.tile_sample_min_size * scale), kind)
        else:
            alloc, reserved = simcard.render_peak(w, h, kind, decode=True)
        with device.current().transient(alloc, reserved - alloc):
            return vae_decode(z, *args, **kwargs)

    pipe.unet.forward = forward
    pipe.vae.decode = decode


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and ``save_pretrained`` it (safetensors) into ``path``; returns the folder.

    Load it back with ``StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)``.
    """
    folder = Path(path)
    build_tiny_sdxl(seed).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Tiny chat model

_BOS = "<s>"
_EOS = "</s>"
_PAD = "<pad>"

# Minimal role-tagged template. Messages are "<|role|>\ncontent</s>\n"; the generation prompt opens an
# assistant turn, and the model is expected to end its reply with </s> (eos).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# The demo's vocabulary: replies are random strings of these words (readable gibberish, streamed word by word).
_WORD_LIST = """the a an of and to in on at by with from for as is was are be it this that there here light sea sky
    river stone tree forest mountain city street house window door garden road bridge tower lighthouse cloud
    rain snow wind sun moon star night morning evening dusk dawn fire water glass paper book song story dream
    colour red blue green gold silver white black grey warm cold quiet bright soft old new small large long
    slow fast gentle strange little great deep high far near open every some many one two three I you we
    they she he see hear make take find keep walk wait watch think know remember paint draw write sing
    follow carry turn begin end again always never perhaps maybe yes no because while after before under
    over between beyond through around inside outside today tomorrow yesterday time moment place way thing
    picture image colours shadows lamps boats birds cats dogs horses people friends voices hands eyes"""
WORDS = tuple(_WORD_LIST.split())
_WORD_SCALE = 0.5  # the random part of the words' output rows: the spread of the choice among them
_CONSTANT = 0.1  # every embedding's dimension 0
_LEAD = 1.5  # the words' output weight on dimension 0: their lead over the other tokens, in logits per unit


def _word_merges(word: str) -> list[tuple[str, str]]:
    """The BPE merges that build `word` (in byte-level characters) one character at a time."""
    return [(word[:i], word[i]) for i in range(1, len(word))]


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token (so any text round-trips), and merges spell each of WORDS, with
    and without its leading space, as a token of its own: what the model writes (plus bos/eos/pad)."""
    specials = [_BOS, _EOS, _PAD]
    tokens = [*specials, *_byte_chars()]
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    known = set(tokens)
    for word in WORDS:
        for spelled in ("\u0120" + word, word):  # Ġ: the byte-level stand-in for a space
            for pair in _word_merges(spelled):
                if pair not in seen_merges:
                    seen_merges.add(pair)
                    merges.append(pair)
                joined = pair[0] + pair[1]
                if joined not in known:
                    known.add(joined)
                    tokens.append(joined)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",  # decoder-only: pad on the left for batched generation
        clean_up_tokenization_spaces=False,
    )


def word_token_ids(tokenizer) -> list[int]:
    """The ids a tiny chat model's replies are made of: each word with its leading space, "." and ","."""
    vocab = tokenizer.get_vocab()
    return [vocab["\u0120" + w] for w in WORDS] + [vocab["."], vocab[","]]


def build_tiny_chat(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A two-layer random-weight ``LlamaForCausalLM`` and its byte-level word tokenizer (with a chat template).

    Sampled (as Clair's LocalChat does), it writes readable gibberish: random words from WORDS."""
    tokenizer = _chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
        # Random weights give random tokens. Two weights are shaped so that sampled replies are words: every
        # token's embedding gets the same value in dimension 0, so the final hidden state always has a large
        # component there, and the output rows of the words (with "." "," and eos, to end a reply now and then)
        # turn it into a shared lead of a few logits over every other token; their other columns stay random
        # (the choice among words). Saved and loaded like any weight.
        favoured = [*word_token_ids(tokenizer), tokenizer.eos_token_id]
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = _CONSTANT
            head = model.lm_head.weight
            rows = torch.randn(len(favoured), head.shape[1]) * _WORD_SCALE
            rows[:, 0] = _LEAD
            rows[-1, 0] += 0.35  # eos: a reply of some 40 words on average, not hundreds
            head.zero_()
            head[favoured] = rows
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.eval()
    _sim_chat_memory(model)
    return model, tokenizer


def _sim_chat_memory(model: PreTrainedModel) -> None:
    """Declare what the real model the tiny one stands for (Qwen2.5-0.5B in bf16) takes on the device: its
    weights, and per forward call its activations and the KV cache of the tokens so far (clair/device/simcard.py's
    table). No-ops on CUDA and without a device."""
    from clair.device import card as device
    from clair.device import simcard

    fig = simcard.FIGURES
    model.sim_bytes = fig["chat_weights"]
    real_forward = model.forward

    @functools.wraps(real_forward)
    def forward(input_ids=None, *args, **kwargs):
        tokens = int(input_ids.shape[-1]) if input_ids is not None else 1
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        nbytes = fig["chat_activation"] + (seen + tokens) * fig["chat_kv_per_token"]
        with device.current().transient(nbytes, first_use="cublas"):
            return real_forward(input_ids, *args, **kwargs)

    model.forward = forward


def save_tiny_chat(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny chat model and ``save_pretrained`` model + tokenizer (safetensors) into ``path``.

    Load it back with ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.
    """
    folder = Path(path)
    model, tokenizer = build_tiny_chat(seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
