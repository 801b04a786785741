"""Schemathesis hooks for scripts/schemathesis-check.sh: three generated
requests in four name the model the check serves for their endpoint, so that
they get past the model lookup into validation and generation."""
import zlib

import schemathesis

MODELS = {
    "/v1/chat/completions": "llava-clip-llama",
    "/v1/embeddings": "clip-tiny",
}


@schemathesis.hook
def map_body(ctx, body):
    model = MODELS.get(ctx.operation.path)
    if model and isinstance(body, dict) and isinstance(body.get("model"), str):
        # Deterministic, so that a seed reproduces a run.
        if zlib.crc32(repr(body).encode()) % 4:
            body["model"] = model
    return body
