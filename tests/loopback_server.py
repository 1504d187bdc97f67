"""A loopback OpenAI-compatible server for the tests and for trying the openai: backends offline:
it answers /chat/completions by model name and /images/edits with a fixed edit.

    python tests/loopback_server.py 8011      # then --qe openai:http://127.0.0.1:8011/v1#judge

Models: judge (a verdict after a thinking block, in a fenced JSON), writer (a prompt inside prose),
garbage (no JSON), flaky (503 once), locked (401), strict (400 to a response_format); any other
name gets the judge's reply. /images/edits puts a square at (40, 40) and a faint drift everywhere.
"""
import base64
import email.parser
import http.server
import io
import json
import sys
from collections import Counter

import numpy as np
from PIL import Image

WRITER_PROMPT = ("Using the provided image, change only the bottle rim to introduce a crack: a large dark "
                 "jagged crack. Keep the rest of the image unchanged.")
VERDICT = {"location_score": 3.5, "quality_score": 4.0, "review": "A plausible crack, a little faint."}


class Handler(http.server.BaseHTTPRequestHandler):
    """Replies as the module's docstring says; the server keeps a log of (path, Authorization,
    request) and the calls per model."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.endswith("/images/edits"):
            message = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            form = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                    for part in message.get_payload()}
            self.server.log.append((self.path, self.headers.get("Authorization"), form))
            image = np.asarray(Image.open(io.BytesIO(form["image"])).convert("RGB")).astype(int) + 3
            image[40:56, 40:56] = 0 if image[40:56, 40:56].mean() > 128 else 255
            buffer = io.BytesIO()
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
            return self.reply(200, {"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]})
        request = json.loads(body)
        self.server.log.append((self.path, self.headers.get("Authorization"), request))
        model = request["model"]
        self.server.calls[model] += 1
        if model == "flaky" and self.server.calls[model] == 1:
            return self.reply(503, {"error": "busy"})
        if model == "locked":
            return self.reply(401, {"error": "bad key"})
        if model == "strict" and "response_format" in request:
            return self.reply(400, {"error": "response_format is not supported"})
        text = {"writer": f'Sure. {{"prompt": "{WRITER_PROMPT}"}} Good luck!',
                "garbage": "I would rather not say."}.get(
            model, f'<think>First {{"draft": 1}}, then the rim.</think>\nVerdict:\n```json\n{json.dumps(VERDICT)}\n```')
        self.reply(200, {"choices": [{"message": {"content": text}}]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(port=0) -> http.server.ThreadingHTTPServer:
    """The server on 127.0.0.1 (port 0: any free one), not yet serving; .url is its openai: prefix."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.log, httpd.calls = [], Counter()
    httpd.url = f"openai:http://127.0.0.1:{httpd.server_port}/v1"
    return httpd


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8011)
    print(f"serving {server.url}#judge and {server.url}#writer; Ctrl-C stops", flush=True)
    server.serve_forever()
