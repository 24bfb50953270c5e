"""The official `openai` package with OptiRoute keys: the key given as
`api_key` works (a completion and a stream); a wrong key raises
AuthenticationError; a spent budget raises RateLimitError with OpenAI's
`insufficient_quota` type."""
import sys

import openai

base_url, key, spent_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
c = client.chat.completions.create(
    model="local",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=5,
    user="end-user-42",
)
assert c.choices[0].message.content
print("key ok")

pieces = []
with client.chat.completions.create(
    model="local", messages=[{"role": "user", "content": "Say hello"}], max_tokens=3, stream=True
) as stream:
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
assert pieces
print("stream ok")

bad = openai.OpenAI(base_url=base_url, api_key="sk-or-not-a-key", max_retries=0, timeout=20)
try:
    bad.chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    assert e.code == "invalid_api_key", e.code
    print("wrong key ok")

spent = openai.OpenAI(base_url=base_url, api_key=spent_key, max_retries=0, timeout=20)
try:
    spent.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "a fresh question"}], max_tokens=5
    )
    raise SystemExit("expected RateLimitError")
except openai.RateLimitError as e:
    assert e.status_code == 429
    assert e.code == "budget_exceeded", e.code
    assert e.body["type"] == "insufficient_quota", e.body
    print("budget ok")
