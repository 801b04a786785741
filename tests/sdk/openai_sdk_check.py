"""Checks mmserve with the official `openai` Python SDK.

Usage: python tests/sdk/openai_sdk_check.py BASE_URL MODEL IMAGE_FILE
Run by .ci/run against a running server. Exits non-zero on the first failure.
"""
import base64
import sys

import openai

base_url, model, image_file = sys.argv[1], sys.argv[2], sys.argv[3]
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
assert [m.id for m in models.data] == [model], models

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

print(f"openai SDK {openai.__version__}: 6 passed, 0 failed")
