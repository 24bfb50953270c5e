"""Drives OptiRoute with the official `openai` package: a completion, a
stream, and an error, checking that the typed objects parse."""
import sys

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=20)

c = client.chat.completions.create(
    model="local",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=5,
)
assert isinstance(c, ChatCompletion), type(c)
assert c.choices[0].message.role == "assistant"
assert c.choices[0].message.content
assert c.usage is not None and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
print("completion ok:", c.choices[0].message.content)

pieces = []
usage = None
with client.chat.completions.create(
    model="auto",
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=4,
    stream=True,
    stream_options={"include_usage": True},
) as stream:
    for chunk in stream:
        assert isinstance(chunk, ChatCompletionChunk), type(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
assert pieces, "no streamed content"
assert usage is not None and usage.completion_tokens == 4, usage
print("stream ok:", "".join(pieces))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("expected an error")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert "model" in str(e)
    print("error ok")
