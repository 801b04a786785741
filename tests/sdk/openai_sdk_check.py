"""Checks mmserve with the official `openai` Python SDK.

Usage: python tests/sdk/openai_sdk_check.py BASE_URL CHAT_MODELS EMBED_MODEL IMAGE_FILE
CHAT_MODELS is a comma-separated list: the chat checks run for each (one model
per family). Run by .ci/run against a server serving all of them. Exits
non-zero on the first failure.
"""
import base64
import sys

import openai

base_url, chat_models, embed_model, image_file = sys.argv[1:5]
chat_models = chat_models.split(",")
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

with open(image_file, "rb") as f:
    data_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
messages = [{
    "role": "user",
    "content": [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": "What is in this image?"},
    ],
}]

models = client.models.list()
assert [m.id for m in models.data] == chat_models + [embed_model], models


def check_chat(model):
    """Chat with an image: JSON, streaming, logprobs and errors through the SDK."""

    done = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    text = done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length"), done
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0, done.usage

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens, usage
    assert finish == done.choices[0].finish_reason

    lp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
    )
    assert len(lp.choices[0].logprobs.content[0].top_logprobs) == 2, lp

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", (e.code, e.body)

    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        assert e.param == "temperature", (e.param, e.body)


for chat_model in chat_models:
    check_chat(chat_model)

# Embeddings: the SDK asks for base64 by default and decodes it itself.
texts = ["a photo of a cat", "a bike"]
b64 = client.embeddings.create(model=embed_model, input=texts)
flt = client.embeddings.create(model=embed_model, input=texts, encoding_format="float")
assert [d.index for d in b64.data] == [0, 1], b64
for a, b in zip(b64.data, flt.data):
    assert len(a.embedding) == len(b.embedding) > 0
    assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
    assert abs(sum(x * x for x in a.embedding) - 1.0) < 1e-4, "vectors are L2-normalised"
assert b64.usage.prompt_tokens > 0

# Images go in through extra_body, mixed with text, in order.
mixed = client.embeddings.create(
    model=embed_model, input="unused",
    extra_body={"input": [{"type": "image_url", "image_url": {"url": data_url}}, texts[0]]},
    encoding_format="float",
)
assert len(mixed.data) == 2, mixed
assert max(abs(x - y) for x, y in zip(mixed.data[1].embedding, flt.data[0].embedding)) < 1e-5
assert [d.index for d in mixed.data] == [0, 1], mixed

print(f"openai SDK {openai.__version__}: {6 * len(chat_models) + 2} passed, 0 failed")
