"""Images through pdg serve (OpenAI image_url parts with data: URLs) and pdg chat (/image): the same
answer as the API given the processor's arrays; limits on count, size and network URLs."""

from __future__ import annotations

import base64

import pytest

import portable_dg
from portable_dg.processor import Processor
from serving import request, running_server
from test_image_processor import encoded, synthetic
from tiny import build_tiny_multimodal


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_serve") / "model"
    build_tiny_multimodal(path, "a", "p4k2")
    return portable_dg.load(path)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


IMAGE = encoded(synthetic(40, 70, seed=1))


def api_answer(model, messages, **options):
    inputs = Processor.for_model(model).apply_chat_template(messages)
    return portable_dg.generate(model, inputs.input_ids, pixel_values=inputs.pixel_values,
                                image_position_ids=inputs.image_position_ids,
                                mm_token_type_ids=inputs.mm_token_type_ids, **options)


def test_image_url_parts_answer_as_the_api(vision_model):
    content = [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}, {"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": content}]
    with running_server(vision_model, model_name="tiny") as server:
        reply = server.client().chat.completions.create(model="tiny", messages=messages, seed=3, max_tokens=16)
    expected = api_answer(vision_model, messages, seed=3, max_new_tokens=16)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_length


@pytest.mark.parametrize("url, status, words", [
    ("https://example.com/cat.png", 400, "not fetched"),
    ("data:image/png;base64,iVBORw0KGgo=", 400, "image"),                     # a truncated PNG
])
def test_bad_image_parts_are_400(vision_model, url, status, words):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    with running_server(vision_model, model_name="tiny") as server:
        code, _, body = request(server.url + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": content}]})
        assert code == status and words in body["error"]["message"], body
        ok, _, _ = request(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 16})
        assert ok == 200


def test_image_limits(vision_model):
    part = {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}
    with running_server(vision_model, model_name="tiny", max_images=1, max_image_bytes=100) as server:
        code, _, body = request(server.url + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": [part, part]}]})
        assert code == 400 and "at most 1" in body["error"]["message"]
        code, _, body = request(server.url + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": [part]}]})
        assert code == 413 and body["error"]["code"] == "image_too_large"


def test_chat_image_attachment(vision_model, tmp_path):
    from portable_dg.commands.chat import ChatSession
    from portable_dg.errors import PortableDGError

    picture = tmp_path / "wide.png"
    picture.write_bytes(IMAGE)
    session = ChatSession(vision_model, max_tokens=16, seed=3)
    with pytest.raises(PortableDGError):
        session.attach(str(tmp_path / "missing.png"))
    session.attach(str(picture))
    reply = session.reply("What is it?")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                             {"type": "text", "text": "What is it?"}]}]
    assert reply.text == api_answer(vision_model, messages, seed=3, max_new_tokens=16).text
    assert session.attached == [] and isinstance(session.history[0]["content"], list)
    session.reply("And now?")                              # the image stays in the history
