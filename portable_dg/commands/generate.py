"""`pdg generate`: text (or ids) from a prompt, by block diffusion."""

from __future__ import annotations

import shutil
import sys

import click

from ..errors import ConfigError


def parse_ids(text: str) -> list[int]:
    """'2,10,11' -> [2, 10, 11], with a clear error for anything else."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def prompt_ids(model, prompt: str | None, ids: str | None, chat: bool | None, think: bool) -> list[int]:
    """The prompt as ids: given ids, the chat template, or BOS + the plain text."""
    if (prompt is None) == (ids is None):
        raise ConfigError("give exactly one of --prompt or --prompt-ids")
    if ids is not None:
        return parse_ids(ids)
    tok = model.tokenizer
    if tok is None:
        raise ConfigError(f"{model.source.path} has no tokenizer; use --prompt-ids")
    use_chat = bool(tok.chat_template) if chat is None else chat
    if use_chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, enable_thinking=think)
        return tok.encode(text, add_special_tokens=False)
    return [model.config.bos_token_id] + tok.encode(prompt, add_special_tokens=False)


class DraftView:
    """--show-drafts: the canvas being denoised, redrawn in place on a terminal."""

    def __init__(self, model, stream=None):
        self.model = model
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def __call__(self, info) -> None:
        tok = self.model.tokenizer
        text = tok.decode(info.draft.tolist()) if tok else ",".join(map(str, info.draft.tolist()))
        line = f"[canvas {info.block + 1} step {info.step:2d} T={info.temperature:.3f} " \
               f"accepted {info.accepted:3d} H={info.mean_entropy:.3f}] {text}"
        if self.live:
            width = max(20, shutil.get_terminal_size().columns - 1)
            line = line.replace("\n", "⏎")[:width]
            self.stream.write("\r\x1b[2K" + line + ("\n" if info.stopped else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@click.command()
@click.option("--model", "model_path", default=None,
              help="Checkpoint directory, .gguf file or hub repo id (default: the bundled Sudoku model, "
                   "whose chat template takes a prompt holding an 81-character puzzle).")
@click.option("--backend", default="auto", show_default=True,
              help="auto, numpy, ggml, mlx or torch (auto: GGUF -> ggml, MLX on Apple Silicon -> mlx, "
                   "CUDA -> torch, else the best CPU path).")
@click.option("--device", default=None, help="Backend device (torch: cpu or cuda).")
@click.option("--dtype", default=None, help="Backend compute dtype (numpy: float32 or float64).")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", "ids", default=None, help="Prompt as token ids, e.g. 2,10,11.")
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt in the chat template "
              "(default: when the checkpoint has one).")
@click.option("--think", is_flag=True, help="Enable the thinking mode of the chat template.")
@click.option("--max-new-tokens", type=int, default=None, help="Rounded up to whole canvases.")
@click.option("--steps", type=int, default=None, help="Maximum denoising steps per canvas.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed for noise and sampling.")
@click.option("--greedy", is_flag=True, help="Take the argmax instead of sampling.")
@click.option("--ids", "print_ids", is_flag=True, help="Print the generated token ids.")
@click.option("--show-drafts", is_flag=True, help="Show the canvas as it is denoised.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None,
              help="Constrain the output to JSON valid under this JSON Schema file.")
@click.option("--json-object", is_flag=True, help="Constrain the output to a JSON object.")
@click.option("--regex", default=None, help="Constrain the output to match this regular expression.")
@click.option("--grammar", type=click.Path(dir_okay=False), default=None,
              help="Constrain the output to this context-free grammar file (Lark or GBNF).")
def generate(model_path, backend, device, dtype, prompt, ids, chat, think, max_new_tokens, steps, seed,
             greedy, print_ids, show_drafts, json_schema, json_object, regex, grammar):
    """Generate from a prompt by block diffusion."""
    import portable_dg

    if model_path is None:     # the bundled Sudoku model: its chat template refuses a prompt without a puzzle
        from ..sudoku import default_model_path
        model_path = default_model_path()
    options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    model = portable_dg.load(model_path, backend=backend, **options)
    ids_in = prompt_ids(model, prompt, ids, chat, think)
    constraint = constraint_options(json_schema, json_object, regex, grammar)
    out = portable_dg.generate(model, ids_in, max_new_tokens=max_new_tokens, max_denoising_steps=steps,
                               seed=seed, greedy=greedy, on_step=DraftView(model) if show_drafts else None,
                               **constraint)
    if print_ids:
        click.echo(",".join(map(str, out.ids)))
    if out.text is not None and not print_ids:
        click.echo(out.text)
    status = "" if out.completed is None else (", constraint complete" if out.completed else
                                               ", constraint INCOMPLETE: the budget ended mid-structure")
    click.echo(f"[{len(out.ids)} tokens, {len(out.steps)} canvas(es), steps {out.steps}{status}]", err=True)


def constraint_options(json_schema: str | None, json_object: bool, regex: str | None,
                       grammar: str | None) -> dict:
    """generate's constraint keywords from the CLI options (files read, one-line errors)."""
    import json

    given = [name for name, v in (("--json-schema", json_schema), ("--json-object", json_object),
                                  ("--regex", regex), ("--grammar", grammar)) if v]
    if len(given) > 1:
        raise ConfigError(f"give at most one of {', '.join(given)}")
    if json_schema:
        try:
            with open(json_schema, encoding="utf-8") as f:
                return {"json_schema": json.load(f)}
        except OSError as e:
            raise ConfigError(f"{json_schema}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{json_schema}: invalid JSON ({e})") from None
    if grammar:
        try:
            with open(grammar, encoding="utf-8") as f:
                return {"grammar": f.read()}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{grammar}: cannot read ({e})") from None
    return {"json_object": True} if json_object else ({"regex": regex} if regex else {})
