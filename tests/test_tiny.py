"""The tiny random-weight models behave like the real ones, offline, through the real loading code paths."""

from __future__ import annotations

import os

# Prove nothing is fetched: set before huggingface_hub is imported (it reads this once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from clair.engines.tiny import build_tiny_chat, build_tiny_sdxl, save_tiny_chat, save_tiny_sdxl

pytestmark = pytest.mark.usefixtures("offline")


def _render(pipe: StableDiffusionXLPipeline, width: int = 64, height: int = 64, steps: int = 2, **kwargs):
    return pipe(
        "a lighthouse at dusk",
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(1234),
        **kwargs,
    ).images[0]


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusionXLPipeline:
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def chat():
    return build_tiny_chat(seed=0)


# ---------------------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_is_shaped_like_the_real_thing(sdxl: StableDiffusionXLPipeline) -> None:
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    assert sdxl.vae_scale_factor == 8
    assert sdxl.default_sample_size * sdxl.vae_scale_factor == 1024
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.tokenizer.model_max_length == sdxl.tokenizer_2.model_max_length == 77
    cfg = sdxl.scheduler.config
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.steps_offset, cfg.timestep_spacing) == (1, "leading")
    assert sdxl.unet.dtype == torch.float32
    assert sdxl.device.type == "cpu"


@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64), (72, 136)])
def test_sdxl_renders_requested_size_with_one_callback_per_step(
    sdxl: StableDiffusionXLPipeline, width: int, height: int
) -> None:
    steps_seen: list[int] = []

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        steps_seen.append(step)
        return callback_kwargs

    image = _render(sdxl, width, height, steps=3, callback_on_step_end=on_step_end)

    assert image.size == (width, height)
    assert image.mode == "RGB"
    assert steps_seen == [0, 1, 2]


def test_sdxl_same_seed_same_pixels_different_seed_different(sdxl: StableDiffusionXLPipeline) -> None:
    again = build_tiny_sdxl(seed=0)
    other = build_tiny_sdxl(seed=1)
    for pipe in (again, other):
        pipe.set_progress_bar_config(disable=True)

    reference = np.asarray(_render(sdxl))
    assert np.array_equal(reference, np.asarray(_render(again)))
    assert not np.array_equal(reference, np.asarray(_render(other)))


def test_building_does_not_disturb_the_callers_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    build_tiny_sdxl(seed=3)
    build_tiny_chat(seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_sdxl_save_then_from_pretrained_renders_the_same(sdxl: StableDiffusionXLPipeline, tmp_path: Path) -> None:
    folder = save_tiny_sdxl(tmp_path / "tiny-sdxl")

    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be safetensors"

    loaded = StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    loaded.set_progress_bar_config(disable=True)

    image = _render(loaded, 128, 64)
    assert image.size == (128, 64)
    assert np.array_equal(np.asarray(image), np.asarray(_render(sdxl, 128, 64)))


# ---------------------------------------------------------------------------------------------------------
# Chat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, wörld 🙂"},
]


def test_chat_template_renders_roles_and_generation_prompt(chat) -> None:
    _, tokenizer = chat
    text = tokenizer.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<s><|system|>\nYou are terse.</s>\n<|user|>\nHello, wörld 🙂</s>\n"
        "<|assistant|>\nHi.</s>\n<|user|>\nAgain</s>\n<|assistant|>\n"
    )
    without = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("<|assistant|>\n")

    with pytest.raises(Exception, match="Unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_tokenizer_is_byte_level_and_lossless(chat) -> None:
    _, tokenizer = chat
    text = "Grüße, 世界! 🙂\n\ttabs xq"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))  # bytes at most; merges join some
    assert all(tokenizer.decode([i]) for i in ids)


def test_chat_replies_are_readable_words_that_stream_word_by_word(chat) -> None:
    """Sampled as Clair's LocalChat does, the random model writes words of its vocabulary, not byte noise."""
    from clair.engines.tiny import WORDS, word_token_ids

    model, tokenizer = chat
    words = set(word_token_ids(tokenizer))
    assert len(words) == len(WORDS) + 2
    assert all(tokenizer.decode([i]).strip() in (*WORDS, ".", ",") for i in words)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8)
    new = [i for i in out[0, inputs["input_ids"].shape[1] :].tolist() if i != tokenizer.eos_token_id]
    assert len(new) >= 5
    assert sum(i in words for i in new) >= 0.9 * len(new), tokenizer.decode(new)
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert "\ufffd" not in text and len(set(text.split())) >= 3, text


def test_chat_generate_produces_new_tokens(chat) -> None:
    model, tokenizer = chat
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_ids = inputs["input_ids"]
    assert prompt_ids.shape[0] == 1
    assert prompt_ids[0, 0].item() == tokenizer.bos_token_id

    output = model.generate(**inputs, max_new_tokens=8)
    new = output[0, prompt_ids.shape[1] :]
    assert torch.equal(output[0, : prompt_ids.shape[1]], prompt_ids[0])
    assert 1 <= len(new) <= 8
    assert len(new) == 8 or new[-1].item() == tokenizer.eos_token_id


def test_chat_streams_from_a_generate_thread(chat) -> None:
    model, tokenizer = chat
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    result: dict[str, torch.Tensor] = {}

    def work() -> None:
        result["output"] = model.generate(**inputs, max_new_tokens=16, streamer=streamer)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    streamed = "".join(streamer)
    thread.join(timeout=30)

    assert not thread.is_alive()
    new = result["output"][0, inputs["input_ids"].shape[1] :]
    assert streamed == tokenizer.decode(new, skip_special_tokens=True)


def test_chat_save_then_auto_from_pretrained_round_trips(chat, tmp_path: Path) -> None:
    model, tokenizer = chat
    folder = save_tiny_chat(tmp_path / "tiny-chat")

    assert (folder / "model.safetensors").is_file()
    loaded_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert (loaded_tokenizer.bos_token, loaded_tokenizer.eos_token, loaded_tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert loaded_model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded_model.generation_config.pad_token_id == tokenizer.pad_token_id

    def prompt_ids(tok) -> torch.Tensor:
        enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return enc["input_ids"]

    ids, loaded_ids = prompt_ids(tokenizer), prompt_ids(loaded_tokenizer)
    assert torch.equal(ids, loaded_ids)

    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded_model(ids).logits)
