"""The official `openai` Python SDK against mmserve's bounded queue.

Usage: python tests/sdk/openai_backpressure_check.py BASE_URL CHAT_MODEL
The server must run with `[engine] max_num_seqs = 1` and `max_waiting = 1`
(scripts/sdk-check.sh starts one). Two streams (the first with `ignore_eos`)
hold the only seat and the only waiting place; then a request without retries
raises RateLimitError (429, code queue_full, Retry-After), and one with the
SDK's default retries gets 429 first and succeeds once the streams are gone.
"""
import sys
import threading

import openai

base_url, model = sys.argv[1:3]
messages = [{"role": "user", "content": "tell me a story"}]
no_retry = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

running = no_retry.chat.completions.create(
    model=model, messages=messages, max_tokens=4000, stream=True,
    extra_body={"ignore_eos": True})
for chunk in running:
    if chunk.choices and chunk.choices[0].delta.content:
        break  # it generates: the seat is taken
waiting = no_retry.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True)

try:
    no_retry.chat.completions.create(model=model, messages=messages, max_tokens=4)
    raise AssertionError("a full queue accepted a request")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.code == "queue_full", (e.status_code, e.body)
    assert e.response.headers["retry-after"] == "1", e.response.headers

statuses = []
first_refusal = threading.Event()


def record(response):
    statuses.append(response.status_code)
    if response.status_code == 429:
        first_refusal.set()


def free_the_queue():
    first_refusal.wait(60)
    running.close()
    waiting.close()


threading.Thread(target=free_the_queue).start()
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused",
                       http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}))
done = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
assert done.choices[0].finish_reason in ("stop", "length"), done
assert statuses[0] == 429 and statuses[-1] == 200, statuses
print(f"backpressure: ok (statuses {statuses})")
