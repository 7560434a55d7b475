"""The transformers side of the parity tests (spec §7): logits of the tiny checkpoints and a
deterministic, recorded `generate`.

`hf_logits` runs the spec §7.2 recipe (encode a prompt, a plain decoder step, a self-conditioned
step, a commit, a step after it).  `deterministic_generate` runs transformers' own `generate` with
its two random sources replaced (spec §7.3): the canvas noise by `pattern(n, V)` and
`torch.multinomial` by the argmax, and records every decoder call.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def pattern(n: int, vocab_size: int) -> np.ndarray:
    """The fixed noise of spec §7.3: canvas[j] = (37 j + 5) mod V, j = 0..n-1."""
    return (37 * np.arange(n, dtype=np.int64) + 5) % vocab_size


def pattern_noise(vocab_size: int):
    """A portable_dg NoiseSource returning `pattern(n, vocab_size)` on every call."""
    return lambda n: pattern(n, vocab_size)


def single_threaded(run):
    """Run a torch function on one thread: on the tiny models torch's thread pool only spins
    (10x the CPU time on a shared 2-core machine); the previous setting is restored."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def load_hf(path: str | Path):
    """A saved tiny checkpoint as a float32 transformers model in eval mode."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()


def as_float64(model):
    """A float64 copy of a transformers model, with eager (per-expert loop) experts: the default
    grouped_mm kernel has no float64 path."""
    import torch

    double = copy.deepcopy(model).to(torch.float64)
    double.set_experts_implementation("eager")
    return double


@dataclass
class Steps:
    """Inputs and outputs of the spec §7.2 decoder calls (numpy, batch dimension dropped)."""

    plain: np.ndarray              # logits [L, V] of the plain step
    self_conditioned: np.ndarray   # logits [L, V] with self_conditioning = plain / temperature
    after_commit: np.ndarray       # logits [L, V] after committing `block`


@single_threaded
def hf_models(path_of):
    """Factory: make(name="a", dtype="float32") -> the transformers model of the checkpoint at
    path_of(name), cached; float64 is a copy of the float32 model with eager experts."""
    loaded: dict[tuple[str, str], object] = {}

    def make(name: str = "a", dtype: str = "float32"):
        if (name, "float32") not in loaded:
            loaded[name, "float32"] = load_hf(path_of(name))
        if (name, dtype) not in loaded:
            loaded[name, dtype] = as_float64(loaded[name, "float32"])
        return loaded[name, dtype]

    return make


def hf_logits(model, prompt: Sequence[int], canvas: Sequence[int], block: Sequence[int],
              temperature: float, self_conditioning: np.ndarray | None = None) -> Steps:
    """Run spec §7.2 on a transformers model: encode `prompt`, denoise `canvas` plainly and with
    self-conditioning, commit `block`, denoise `canvas` again.

    self_conditioning: the logits / temperature fed to the second step; by default the model's own
    plain logits / temperature (give it to feed a float64 model exactly the float32 input)."""
    import torch
    from transformers import DynamicCache

    dtype = model.model.decoder.embed_tokens.weight.dtype
    L, P = len(canvas), len(prompt)
    ids = torch.tensor([list(prompt)])
    canvas_t = torch.tensor([list(canvas)])
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(P)[None])

        def decode(position: int, sc: torch.Tensor | None) -> np.ndarray:
            out = model(decoder_input_ids=canvas_t, past_key_values=cache, self_conditioning_logits=sc,
                        decoder_position_ids=torch.arange(position, position + L)[None])
            return out.logits[0].double().numpy()

        plain = decode(P, None)
        sc = plain / temperature if self_conditioning is None else self_conditioning
        conditioned = decode(P, torch.from_numpy(np.asarray(sc)).to(dtype)[None])
        model.model.encoder(input_ids=torch.tensor([list(block)]), past_key_values=cache,
                            position_ids=torch.arange(P, P + len(block))[None])
        after = decode(P + len(block), None)
    return Steps(plain, conditioned, after)


@dataclass
class DecoderCall:
    """One decoder pass made by transformers' generate."""

    position: int                       # position of the canvas's first token (tokens cached)
    canvas: np.ndarray                  # [L] ids in
    self_conditioning: np.ndarray | None  # [L, V] temperature-scaled logits in, or None
    logits: np.ndarray                  # [L, V] float32 logits out


@dataclass
class Recording:
    """A deterministic transformers generate: its output and every decoder call, in order."""

    sequences: np.ndarray               # [prompt + canvases * L]
    calls: list[DecoderCall]
    config: object                      # the DiffusionGemmaGenerationConfig in effect
    tokens_per_forward: float

    def passes_per_canvas(self, prompt_length: int, canvas_length: int) -> list[int]:
        """Decoder passes per canvas, in canvas order."""
        blocks = [(c.position - prompt_length) // canvas_length for c in self.calls]
        return [blocks.count(b) for b in range(max(blocks) + 1)]


@contextmanager
def deterministic(model) -> Iterator[list[DecoderCall]]:
    """Within the block: transformers' canvas noise is `pattern`, `torch.multinomial` is the argmax,
    and every call of `model.forward` is appended to the yielded list."""
    import torch
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    vocab_size = model.config.text_config.vocab_size
    canvas_length = model.config.canvas_length
    calls: list[DecoderCall] = []

    def initialize_canvas(self, batch_size, device):
        row = torch.from_numpy(pattern(canvas_length, vocab_size)).to(device)
        return row[None].expand(batch_size, canvas_length).clone()

    def argmax_multinomial(probs, num_samples, *args, **kwargs):
        assert num_samples == 1
        return probs.argmax(dim=-1, keepdim=True)

    forward = model.forward

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        sc = kwargs.get("self_conditioning_logits")
        calls.append(DecoderCall(
            position=int(kwargs["decoder_position_ids"][0, 0]),
            canvas=kwargs["decoder_input_ids"][0].numpy().copy(),
            self_conditioning=None if sc is None else sc[0].float().numpy().copy(),
            logits=out.logits[0].float().numpy().copy()))
        return out

    saved = gen.EntropyBoundSampler.initialize_canvas, torch.multinomial
    gen.EntropyBoundSampler.initialize_canvas = initialize_canvas
    torch.multinomial = argmax_multinomial
    model.forward = recording_forward
    try:
        yield calls
    finally:
        gen.EntropyBoundSampler.initialize_canvas, torch.multinomial = saved
        del model.forward


@single_threaded
def deterministic_generate(model, prompt: Sequence[int], start_canvas: Sequence[int] | None = None,
                           **options) -> Recording:
    """transformers' generate under `deterministic`; options are generation-config overrides."""
    import torch

    if start_canvas is not None:
        options["decoder_input_ids"] = torch.tensor([list(start_canvas)])
    config, _ = model._prepare_generation_config(None, **options)
    with deterministic(model) as calls, torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), **options)
    return Recording(out.sequences[0].numpy(), calls, config, float(out.tokens_per_forward[0]))


@single_threaded
def hf_replay(model, recording: Recording) -> list[np.ndarray]:
    """Logits [L, V] of every recorded decoder call, recomputed by `model` (e.g. a float64 copy)
    from the recorded inputs, committing the recorded output blocks in between."""
    import torch
    from transformers import DynamicCache

    dtype = model.model.decoder.embed_tokens.weight.dtype
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    length, out = 0, []
    with torch.no_grad():
        for call in recording.calls:
            if length < call.position:
                ids = recording.sequences[length:call.position]   # the prompt, then committed blocks
                model.model.encoder(input_ids=torch.from_numpy(ids)[None], past_key_values=cache,
                                    position_ids=torch.arange(length, call.position)[None])
                length = call.position
            sc = None if call.self_conditioning is None else torch.from_numpy(call.self_conditioning).to(dtype)[None]
            L = len(call.canvas)
            logits = model(decoder_input_ids=torch.from_numpy(call.canvas)[None], past_key_values=cache,
                           self_conditioning_logits=sc,
                           decoder_position_ids=torch.arange(length, length + L)[None]).logits
            out.append(logits[0].double().numpy())
    return out


@dataclass
class Margins:
    """How far a recorded generate is from flipping a decision (spec §7.3 caveats): a near-tie
    that 1e-5 of logit noise could flip makes a free-running comparison meaningless."""

    argmax_gap: float       # smallest top-1 minus top-2 raw logit, over the positions that matter
    entropy_gap: float      # smallest distance (nats) of an acceptance or stop test from flipping


def margins(recording: Recording) -> Margins:
    """Margins of every decoder call in a recording, under its generation config.

    Positions that matter for the argmax: the accepted ones of each step (they enter the next
    canvas) and every position of a canvas's last step (its argmax is committed)."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    cfg = recording.config
    schedule = LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, cfg.max_denoising_steps)
    L = len(recording.calls[0].canvas)
    argmax_gap = entropy_gap = np.inf
    for k, call in enumerate(recording.calls):
        steps_before = sum(c.position == call.position for c in recording.calls[:k])
        n = torch.tensor(cfg.max_denoising_steps - steps_before, dtype=torch.int32)
        scaled = schedule(None, torch.from_numpy(call.logits), n).double().numpy()   # [L, V]
        z = scaled - scaled.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)                       # [L]
        order = np.argsort(entropy, kind="stable")
        sorted_h = entropy[order]
        exclusive = np.cumsum(sorted_h) - sorted_h
        accepted = exclusive <= cfg.sampler_config.entropy_bound
        gaps = [np.abs(exclusive - cfg.sampler_config.entropy_bound).min(),
                abs(entropy.mean() - cfg.confidence_threshold)]
        if not accepted.all():
            first_rejected = int(np.argmin(accepted))
            gaps.append(sorted_h[first_rejected] - sorted_h[first_rejected - 1])
        entropy_gap = min(entropy_gap, *gaps)
        last_of_canvas = k + 1 == len(recording.calls) or recording.calls[k + 1].position != call.position
        matter = np.arange(L) if last_of_canvas else order[accepted]
        top2 = np.sort(call.logits[matter], axis=-1)[:, -2:]
        argmax_gap = min(argmax_gap, float((top2[:, 1] - top2[:, 0]).min()))
    return Margins(argmax_gap, float(entropy_gap))


# --- Image prompts (the vision path) ---


def load_hf_processor(path: str | Path):
    """transformers' Gemma4Processor for a directory written by `tiny.write_tiny_processor` (or a
    checkpoint): its tokenizer and chat template, the PIL image backend (Gemma4ImageProcessorPil)
    and no video processor.  The video processor and the torchvision image backend need torchvision,
    which has no CPU build for torch 2.13.0 here; without torchvision, transformers' own
    AutoProcessor picks the same PIL backend."""
    import json

    from transformers import AutoTokenizer
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor

    class Gemma4ProcessorWithoutVideo(Gemma4Processor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    settings = json.loads(Path(path, "processor_config.json").read_text())
    return Gemma4ProcessorWithoutVideo(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil.from_pretrained(str(path)), tokenizer=tokenizer,
        video_processor=None, chat_template=tokenizer.chat_template,
        image_seq_length=settings.get("image_seq_length", 280))


@single_threaded
def hf_image_logits(model, inputs, canvas: Sequence[int], block: Sequence[int], temperature: float,
                    self_conditioning: np.ndarray | None = None) -> Steps:
    """Spec §7.2 on an image prompt, run the way transformers' `generate` runs it: the parity
    oracle for the vision path.

    The prompt goes through the encoder once, with pixel_values, image_position_ids and
    mm_token_type_ids and with the masks `generate` prepares (`_prepare_encoder_inputs`): tokens
    of one image attend to each other bidirectionally, on full and sliding layers.  (Calling the
    encoder's forward without prepared masks would silently use plain causal masks.)  Decoder calls
    take the masks `generate` prepares too; the commit of `block` (len(block) == len(canvas)) goes
    through the encoder as `generate` commits a canvas, without the image inputs.

    inputs: a mapping with input_ids, mm_token_type_ids ([1, T] or [T]), pixel_values and
        image_position_ids: transformers' processor output (numpy) or `vars(ProcessedPrompt)`.
    """
    import torch
    from transformers import DynamicCache

    dtype = model.model.decoder.embed_tokens.weight.dtype
    ids = torch.from_numpy(np.atleast_2d(inputs["input_ids"]).astype(np.int64))
    P, L = ids.shape[1], len(canvas)
    if len(block) != L:
        raise ValueError(f"block has {len(block)} ids, canvas {L}: generate commits whole canvases")
    image_kwargs = dict(pixel_values=torch.from_numpy(np.asarray(inputs["pixel_values"])),
                        image_position_ids=torch.from_numpy(np.asarray(inputs["image_position_ids"])),
                        mm_token_type_ids=torch.from_numpy(np.atleast_2d(inputs["mm_token_type_ids"])))
    canvas_t = torch.tensor([list(canvas)])

    def positions(start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, dtype=torch.int32)[None]

    def encode(all_ids: torch.Tensor, start: int, is_prefill: bool, **kwargs) -> None:
        new_ids, masks = model._prepare_encoder_inputs(
            input_ids=all_ids, attention_mask=torch.ones_like(all_ids, dtype=torch.bool),
            encoder_position_ids=positions(start, all_ids.shape[1] - start), past_key_values=cache,
            is_prefill=is_prefill, canvas_length=L, batch_size=1, **kwargs)
        model.model.encoder(input_ids=new_ids, attention_mask=masks, past_key_values=cache,
                            position_ids=positions(start, new_ids.shape[1]), **kwargs)

    def decode(position: int, sc: torch.Tensor | None) -> np.ndarray:
        masks = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=canvas_t.unsqueeze(-1), past_key_values=cache,
            decoder_attention_mask=torch.ones((1, position + L), dtype=torch.bool))
        out = model(decoder_input_ids=canvas_t, self_conditioning_logits=sc, decoder_attention_mask=masks,
                    past_key_values=cache, decoder_position_ids=positions(position, L))
        return out.logits[0].double().numpy()

    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        encode(ids, 0, True, **image_kwargs)
        plain = decode(P, None)
        sc = plain / temperature if self_conditioning is None else self_conditioning
        conditioned = decode(P, torch.from_numpy(np.asarray(sc)).to(dtype)[None])
        encode(torch.cat([ids, torch.tensor([list(block)])], dim=1), P, False)
        after = decode(P + L, None)
    return Steps(plain, conditioned, after)
