"""Constrained generation through the engine (`generate(..., json_schema=/regex=/grammar=)`), the CLI
and the server: on a synthetic model with random weights and a byte-level BPE tokenizer trained
here, every output parses and validates (the guarantee does not depend on the model); on the
bundled Sudoku model a regular expression fixing the givens keeps the solve rate.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
lark = pytest.importorskip("lark")

import portable_dg  # noqa: E402
from portable_dg import sudoku as sd  # noqa: E402
from portable_dg.errors import ConfigError  # noqa: E402
from bpe import ARITHMETIC, DATE, ORDER, PERSON, SETTINGS, SLUG, train_bpe  # noqa: E402

SEEDS = list(range(50))


@pytest.fixture(scope="module")
def json_model(tmp_path_factory):
    """A synthetic tiny DiffusionGemma (random weights, canvas 16) with the trained BPE tokenizer."""
    from portable_dg.synth import write_synthetic

    path = tmp_path_factory.mktemp("constrained") / "tiny"
    hf = train_bpe()
    write_synthetic(path, like="tiny", vocab=hf.get_vocab_size() + 4, dtype="f32")
    train_bpe(save_to=path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    return portable_dg.load(path)


def texts(model, budget: int, **constraint):
    """The 50 seeds' outputs under a constraint (one batch), as (text, completed)."""
    outs = portable_dg.generate_batch(model, [[2]] * len(SEEDS), seed=SEEDS, max_new_tokens=budget,
                                      max_denoising_steps=2, **constraint)
    return [(o.text, o.completed) for o in outs]


@pytest.mark.parametrize("schema", [PERSON, ORDER, SETTINGS], ids=["person", "order", "settings"])
def test_json_schema_outputs_validate(json_model, schema):
    for seed, (text, completed) in zip(SEEDS, texts(json_model, 160, json_schema=schema)):
        assert completed, f"seed {seed}: incomplete {text!r}"
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", [DATE, SLUG], ids=["date", "slug"])
def test_regex_outputs_match(json_model, pattern):
    for seed, (text, completed) in zip(SEEDS, texts(json_model, 48, regex=pattern)):
        assert completed and re.fullmatch(pattern, text), f"seed {seed}: {text!r}"


def test_grammar_outputs_parse(json_model):
    parser = lark.Lark(ARITHMETIC)
    for seed, (text, completed) in zip(SEEDS, texts(json_model, 48, grammar=ARITHMETIC)):
        assert completed, f"seed {seed}: {text!r}"
        parser.parse(text)


def test_budget_ending_mid_structure_is_reported(json_model):
    """A budget too short for the schema: the text is still a valid prefix, and says it is incomplete."""
    out = portable_dg.generate(json_model, [2], seed=0, max_new_tokens=16, max_denoising_steps=2,
                               json_schema=PERSON)
    assert out.completed is False and out.text.startswith("{")
    assert portable_dg.generate(json_model, [2], seed=0, max_new_tokens=16).completed is None


def test_constraint_options_are_checked(json_model):
    with pytest.raises(ConfigError, match="regex"):
        portable_dg.generate(json_model, [2], regex="[0-9")
    with pytest.raises(ConfigError, match="at most one"):
        portable_dg.generate(json_model, [2], regex="a", json_object=True)
    with pytest.raises(ConfigError, match="pinned positions and a constraint"):
        portable_dg.generate(json_model, [2], regex="a+", pinned={0: 5})


def test_sudoku_regex_fixing_the_givens(tiny_model):
    """The bundled model under a regex that fixes the givens and allows digits elsewhere: no answer
    breaks a given, and the solve rate is not lower than without the constraint (same seeds)."""
    model = portable_dg.load(sd.default_model_path())
    pairs = sd.test_set(40)
    prompts = [sd.prompt_ids(puzzle) for puzzle, _ in pairs]
    regexes = [sd.givens_regex(puzzle) for puzzle, _ in pairs]
    options = dict(seed=list(range(40)), max_new_tokens=sd.CELLS)
    free = portable_dg.generate_batch(model, prompts, **options)
    constrained = portable_dg.generate_batch(model, prompts, regex=regexes, **options)

    def answers(outs):
        return [sd.grid_from_ids(o.sequences[0, sd.PROMPT_LENGTH:]) for o in outs]

    for (puzzle, _), answer in zip(pairs, answers(constrained)):
        assert not ((puzzle > 0) & (answer != puzzle)).any() and (answer > 0).all()
    solved = [sd.score(pairs, answers(o), [sum(x.steps) for x in o]).solved for o in (free, constrained)]
    assert solved[1] >= solved[0]
    assert all(o.completed for o in constrained)


def test_constraint_when_the_vocabulary_is_smaller_than_the_candidates():
    """The bundled model's vocabulary is smaller than the walk's 16 candidates: torch's top-k must
    not be asked for more (it raised), and torch walks to numpy's answers."""
    pairs = sd.test_set(3)
    prompts = [sd.prompt_ids(puzzle) for puzzle, _ in pairs]
    regexes = [sd.givens_regex(puzzle) for puzzle, _ in pairs]
    outs = {backend: portable_dg.generate_batch(portable_dg.load(sd.default_model_path(), backend=backend), prompts,
                                                regex=regexes, seed=[0, 1, 2], max_new_tokens=sd.CELLS)
            for backend in ("numpy", "torch")}
    assert portable_dg.load(sd.default_model_path()).config.vocab_size < 16
    for (puzzle, _), a, b in zip(pairs, outs["numpy"], outs["torch"]):
        answer = sd.grid_from_ids(b.sequences[0, sd.PROMPT_LENGTH:])
        assert b.completed and not ((puzzle > 0) & (answer != puzzle)).any()
        assert np.array_equal(a.sequences, b.sequences)


def test_cli_json_schema(json_model, tmp_path):
    from click.testing import CliRunner

    from portable_dg.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(ORDER))
    result = CliRunner().invoke(main, ["generate", "--model", str(json_model.source.path), "--prompt-ids", "2",
                                       "--max-new-tokens", "160", "--steps", "2", "--seed", "3",
                                       "--json-schema", str(schema)])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout.strip()), ORDER)
    assert "constraint complete" in result.stderr
    bad = CliRunner().invoke(main, ["generate", "--model", str(json_model.source.path), "--prompt-ids", "2",
                                    "--regex", "(", "--json-object"])
    assert bad.exit_code == 1 and "at most one" in bad.output


def test_server_response_format_json_schema(json_model):
    """The official openai client with response_format json_schema gets JSON valid under it."""
    pytest.importorskip("openai")
    from serving import running_server

    with running_server(json_model, model_name="tiny") as server:
        client = server.client()
        reply = client.completions.create(
            model="tiny", prompt="", max_tokens=160, seed=5,
            extra_body={"response_format": {"type": "json_schema",
                                            "json_schema": {"name": "order", "schema": ORDER}},
                        "max_denoising_steps": 2})
        jsonschema.validate(json.loads(reply.choices[0].text), ORDER)
        import openai

        with pytest.raises(openai.BadRequestError, match="regex"):
            client.completions.create(model="tiny", prompt="", max_tokens=16, extra_body={"regex": "[0-9"})
        assert np.isfinite(reply.usage.completion_tokens)
