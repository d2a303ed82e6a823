"""The OpenAPI description of `edgetl serve` (GET /openapi.json) and a page that shows it (GET /docs),
self-contained: it works offline, with no script or style fetched from anywhere."""

from __future__ import annotations

import html

from edgetl import __version__

_ERROR = {"description": "one-line JSON error",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi(served) -> dict:
    """An OpenAPI 3.1 document for the running server and model."""
    classes = served.classes
    answer = {
        "type": "object",
        "properties": {
            "class": {"type": "string", "enum": classes},
            "probability": {"type": "number"},
            "top": {"type": "array", "items": {"type": "object", "properties": {
                "class": {"type": "string"}, "probability": {"type": "number"}}}},
            "model": {"$ref": "#/components/schemas/ModelRef"},
            "timings_ms": {"type": "object", "properties": {k: {"type": "number"} for k in ("queue", "decode", "inference")}},
            "batch": {"type": "integer", "description": "images in the inference batch this one rode in"},
        },
    }
    image_body = {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in (
        "image/jpeg", "image/png", "image/webp", "application/octet-stream")}}
    image_body["content"]["multipart/form-data"] = {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}

    def get(summary, description, ok="application/json"):
        return {"get": {"summary": summary, "description": description,
                        "responses": {"200": {"description": "OK", "content": {ok: {}}}, "401": _ERROR}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": f"edgetl serve: {served.name}", "version": __version__,
                 "description": f"Classifies images into {len(classes)} classes ({', '.join(classes[:8])}"
                                f"{', …' if len(classes) > 8 else ''}) with model {served.sha256[:12]}."},
        "paths": {
            "/v1/predict": {"post": {
                "summary": "Classify one image (the body) or several (multipart files)",
                "description": "The answer equals `edgetl predict` on the same file. A multipart request answers "
                               "{model, results: [...]} with one entry per file, each an answer or an error.",
                "parameters": [
                    {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "name", "in": "query", "schema": {"type": "string"},
                     "description": "a label for the image in errors (raw body only)"}],
                "requestBody": {"required": True, **image_body},
                "responses": {"200": {"description": "the answer", "content": {"application/json": {"schema": answer}}},
                              **{s: _ERROR for s in ("400", "401", "408", "413", "415")},
                              "503": {**_ERROR, "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}}},
            "/v1/model": get("The model: classes, input size, hashes, training summary", "From the model's metadata."),
            "/healthz": get("Alive", "The process answers (needs no token)."),
            "/readyz": get("Ready", "The model is loaded and warmed up and the server is not stopping (else 503)."),
            "/metrics": get("Prometheus metrics", "Prometheus text exposition format.", "text/plain"),
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}, "kind": {"type": "string"}}},
                "ModelRef": {"type": "object", "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def page(served) -> str:
    """An HTML page listing the operations of the OpenAPI document, with curl examples."""
    doc = openapi(served)
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            rows.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p><b>{html.escape(op['summary'])}"
                        f"</b>. {html.escape(op.get('description', ''))}</p>")
    examples = ("curl -s --data-binary @photo.jpg http://HOST:PORT/v1/predict\n"
                "curl -s -F file=@a.jpg -F file=@b.png 'http://HOST:PORT/v1/predict?top_k=2'\n"
                "curl -s -H 'Authorization: Bearer TOKEN' http://HOST:PORT/v1/model")
    return ("<!doctype html><meta charset=utf-8><title>" + html.escape(doc["info"]["title"]) + "</title>"
            "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}"
            "code,pre{background:#f3f3f3;padding:.1em .3em}</style>"
            f"<h1>{html.escape(doc['info']['title'])}</h1><p>{html.escape(doc['info']['description'])}</p>"
            f"<pre>{html.escape(examples)}</pre>" + "".join(rows) +
            "<p>The machine-readable description: <a href=openapi.json>openapi.json</a>.</p>")
