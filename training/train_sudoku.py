"""Train the bundled Sudoku model: a small DiffusionGemma (dev-time tool; needs torch + transformers).

    python training/train_sudoku.py --out runs/sudoku --minutes 55 --threads 2

The objective follows the public DiffusionGemma fine-tuning recipe (NeMo AutoModel): per example a
noise level t ~ U(eps, 1); every canvas token is replaced by a uniform random vocabulary token with
probability t (uniform-state corruption, no [MASK] token); the encoder reads the clean prompt into a
KV cache and the decoder reads the corrupted canvas; the loss is the cross-entropy against the clean
canvas over every canvas position, corrupted or not.  Self-conditioning is the two-pass scheme: a
no-grad decoder pass first, whose logits divided by a sampling temperature from the released
schedule's range are fed back as `self_conditioning_logits`, switched on per example with
probability 0.5 (`self_conditioning_mask`).  Unlike the recipe's fine-tuning of a pretrained
model, the router is trained too (this model starts from random weights) and there is no
co-trained encoder AR loss (the prompt is the puzzle, not text).

Data: a pool of unique-solution puzzles from a training seed (never the held-out test seed nor the
validation seed, whose first 64 puzzles give the logged validation loss), augmented by relabelling
the digits and by the Sudoku symmetries (band/stack and row/column permutations within them,
transposition), which keep a puzzle's solution unique.  Curriculum: easy
puzzles (40-50 givens) first, then medium ones (32-39) mixed in.

Checkpoints are written atomically in the Hugging Face DiffusionGemma layout with the Sudoku
tokenizer, loadable by transformers 5.23.0 and by `portable_dg.load`.

The bundled model: about 1.5 hours from random weights in runs of about an hour (the last with
`--batch 32 --easy-until 1.0`), then `--resume` runs with `--batch 32 --easy-until 1.0`: 33 minutes at
`--lr 2e-3 --seed 3` (stopped early: the restarted optimizer set it back at first), then
`--minutes 65 --lr 1e-3 --warmup 50 --seed 4`; validation loss 0.094 -> 0.071 over the last run.
`training/tune_sampler.py --write` chose its sampler settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portable_dg import sudoku  # noqa: E402

VISION = dict(model_type="gemma4_vision", hidden_size=32, num_hidden_layers=1, patch_size=4,
              position_embedding_size=64, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16)

TEXT = dict(vocab_size=len(sudoku.VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
            sliding_window=64, max_position_embeddings=256,
            pad_token_id=sudoku.PAD, eos_token_id=sudoku.EOS, bos_token_id=sudoku.BOS,
            use_bidirectional_attention="vision")

GENERATION = dict(max_new_tokens=sudoku.CELLS, max_denoising_steps=48, t_min=0.4, t_max=0.8,
                  stability_threshold=1, confidence_threshold=0.005, eos_token_id=[sudoku.EOS],
                  pad_token_id=sudoku.PAD, bos_token_id=sudoku.BOS)


def build_model(text: dict | None = None, seed: int = 0):
    """A fresh DiffusionGemmaForBlockDiffusion with the Sudoku geometry (or `text` overrides)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
    )

    config = DiffusionGemmaConfig(canvas_length=sudoku.CELLS, text_config={**TEXT, **(text or {})},
                                  vision_config=dict(VISION), bos_token_id=sudoku.BOS,
                                  eos_token_id=sudoku.EOS, pad_token_id=sudoku.PAD)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config = DiffusionGemmaGenerationConfig(
        **GENERATION, sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1})
    return model


def write_tokenizer(directory: Path) -> None:
    """tokenizer.json (word level, one token per character, decodes to plain digits),
    tokenizer_config.json and the bundled model's chat template (a puzzle in a user message)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(sudoku.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(".", "0"),
                                           normalizers.Replace(Regex(r"\s+"), "")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sudoku.VOCAB[:4]])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", sep_token="<sep>", unk_token="<pad>", model_max_length=256), indent=2) + "\n")
    shutil.copyfile(sudoku.default_model_path() / "chat_template.jinja", directory / "chat_template.jinja")


def save_checkpoint(model, out: Path) -> None:
    """Save model + tokenizer to `out` atomically (a temporary sibling directory, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(str(tmp))
        write_tokenizer(tmp)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- data

def augment(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same puzzle under a random digit relabelling and grid symmetry (uniqueness is kept)."""
    relabel = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.int8)
    rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    transpose = rng.random() < 0.5

    def transform(grid: np.ndarray) -> np.ndarray:
        g = relabel[grid].reshape(9, 9)[rows][:, cols]                  # [9, 9]
        return (g.T if transpose else g).reshape(81).copy()

    return transform(puzzle), transform(solution)


def make_pool(seed: int, counts: dict[str, int]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Puzzles per difficulty from the training seed (never the test seed)."""
    assert seed not in (sudoku.TEST_SEED, sudoku.VALIDATION_SEED)
    return {name: sudoku.puzzles(seed + i, n, name) for i, (name, n) in enumerate(counts.items())}


def batch(pool, names: list[str], size: int, rng: np.random.Generator):
    """(prompts [B, 83], targets [B, 81]) int64 arrays of augmented puzzles drawn from `names`."""
    prompts, targets = [], []
    for _ in range(size):
        group = pool[names[rng.integers(len(names))]]
        puzzle, solution = augment(*group[rng.integers(len(group))], rng)
        prompts.append(sudoku.prompt_ids(puzzle))
        targets.append(sudoku.solution_ids(solution))
    return np.stack(prompts), np.stack(targets)


# ---------------------------------------------------------------------------------------- objective

def diffusion_loss(model, prompts, targets, generator, self_conditioning_rate: float = 0.5,
                   eps: float = 1e-3):
    """The uniform-state diffusion loss of one batch (see the module docstring); returns a scalar."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    B, L = targets.shape
    V = model.config.text_config.vocab_size
    P = prompts.shape[1]
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator)                  # [B, 1]
    corrupt = torch.rand(B, L, generator=generator) < t                          # [B, L]
    noise = torch.randint(0, V, (B, L), generator=generator)
    canvas = torch.where(corrupt, noise, targets)
    positions = torch.arange(P, P + L)[None].expand(B, L)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    model.model.encoder(input_ids=prompts, past_key_values=cache,
                        position_ids=torch.arange(P)[None].expand(B, P))
    use_sc = torch.rand(B, generator=generator) < self_conditioning_rate         # [B]
    sc_logits = None
    if bool(use_sc.any()):
        with torch.no_grad():
            first = model(decoder_input_ids=canvas, past_key_values=cache,
                          decoder_position_ids=positions).logits                 # [B, L, V]
            temperature = 0.4 + 0.4 * torch.rand(B, 1, 1, generator=generator)
            sc_logits = first / temperature
    logits = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=positions,
                   self_conditioning_logits=sc_logits,
                   self_conditioning_mask=use_sc if sc_logits is not None else None).logits
    return F.cross_entropy(logits.reshape(B * L, V), targets.reshape(B * L))


def train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out.with_suffix(".log"), "a", buffering=1)

    def say(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    say(f"building pool: {args.pool}")
    pool = make_pool(args.seed * 1000 + 1, dict(easy=args.pool, medium=args.pool // 2))
    held = sudoku.validation_set(64)
    val_prompts = torch.from_numpy(np.stack([sudoku.prompt_ids(p) for p, _ in held]))      # [64, 83]
    val_targets = torch.from_numpy(np.stack([sudoku.solution_ids(s) for _, s in held]))    # [64, 81]
    model = build_model() if args.resume is None else _load(args.resume)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    say(f"parameters: {sum(p.numel() for p in model.parameters())}")
    start = time.time()
    budget = 60 * args.minutes
    step, last_save, running = 0, start, None
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        names = ["easy"] if progress < args.easy_until else ["easy", "easy", "medium"]
        prompts, targets = (torch.from_numpy(a) for a in batch(pool, names, args.batch, rng))
        loss = diffusion_loss(model, prompts, targets, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 5 == 0:
            say(f"step {step} loss {running:.4f} lr {lr:.2e} elapsed {time.time() - start:.0f}s")
        if time.time() - last_save > 60 * args.save_minutes:
            _save(model, args.out, val_prompts, val_targets, generator, say)
            last_save = time.time()
    _save(model, args.out, val_prompts, val_targets, generator, say)
    say(f"done after {step} steps")


def _save(model, out, val_prompts, val_targets, generator, say) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        val = diffusion_loss(model, val_prompts, val_targets, torch.Generator().manual_seed(0)).item()
    model.train()
    save_checkpoint(model, out)
    say(f"saved {out} (validation loss {val:.4f})")


def _load(path: Path):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--minutes", type=float, default=55.0, help="wall-clock training budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pool", type=int, default=600, help="easy puzzles in the pool (medium: half)")
    parser.add_argument("--easy-until", type=float, default=0.5, help="fraction of the budget on easy only")
    parser.add_argument("--save-minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resume", type=Path, default=None, help="start from this checkpoint")
    parser.add_argument("--init-only", action="store_true", help="save the untrained model and stop")
    args = parser.parse_args(argv)
    if args.init_only:
        save_checkpoint(build_model(), args.out)
        return
    train(args)


if __name__ == "__main__":
    main()
