"""The KServe predictor of registered generators: ``load()`` resolves the model from MLflow, ``predict()``
samples it, over the v1 (``instances``) and v2 (``inputs`` tensors) protocols.

GAN families with an exported ONNX graph run on ONNX Runtime (CUDA when the provider is there) and draw their
latents with ``sonogen.noise``, so they need no torch; other families sample with torch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput

from serving.batching import Batcher, DrawBatcher
from serving.requests import SamplingRequest, parse_request, parse_v2_request
from sonogen.sampling import gaussian_latents, png_bytes

INLINE_ENCODE_PIXELS = 4 * 64 * 64  # a request's pixels encoded on the event loop itself (about 0.2 ms of PNG)


class SamplerModel(Model):
    def __init__(self, name: str, model_uri: str, max_n: int = 256, max_batch: int | None = None,
                 precision: str | None = None, channels_last: bool = False, compile: bool = False):
        """``max_batch``: images per network call (default: what suits the model's device and family);
        ``precision``: what requests that name none sample at (torch families: fp32 or bf16; default fp32);
        ``channels_last`` and ``compile``: a torch family's networks in NHWC memory order, compiled."""
        super().__init__(name)
        self.model_uri, self.max_n, self.requested_batch = model_uri, max_n, max_batch
        self.tuning = {"precision": precision, "channels_last": channels_last, "compile": compile}
        self.max_batch = max_batch or 16
        self.version: str | None = None
        self.batcher: Batcher | DrawBatcher | None = None
        self._lock = threading.Lock()

    def load(self) -> bool:
        """Resolves ``model_uri`` and loads the sampler; False (not ready) while the model is not there yet."""
        from sonogen.backends import load_backend

        with self._lock:
            backend = load_backend(self.model_uri, **self.tuning)
            if backend is None:
                return False
            if self.batcher is not None:
                self.batcher.close()
            self.backend, self.version = backend, backend.version
            self.max_batch = self.requested_batch or backend.max_batch
            self.batcher = (Batcher(backend.run, self.max_batch) if backend.run
                            else DrawBatcher(backend.sample_draws, self.max_batch))
            self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        """The v2 inputs, as ``GET /v2/models/NAME`` lists them (shape [1] each; the condition a JSON object)."""
        return [{"name": "n", "datatype": "INT64", "shape": [1]}, {"name": "seed", "datatype": "INT64", "shape": [1]},
                {"name": "label", "datatype": "BYTES", "shape": [1]},
                {"name": "condition", "datatype": "BYTES", "shape": [1]},
                {"name": "precision", "datatype": "BYTES", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        """``images`` (n, H, W) uint8, ``boxes`` (n, most boxes of an image, 4) from families that place lesions,
        ``masks`` (n, H, W) uint8 (1 on the lesion) from families that draw them; -1 marks a size that depends on
        the request."""
        outputs = [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1]}]
        if self.ready and self.backend.places_lesions:
            outputs.append({"name": "boxes", "datatype": "INT32", "shape": [-1, -1, 4]})
        if self.ready and self.backend.draws_masks:
            outputs.append({"name": "masks", "datatype": "UINT8", "shape": [-1, -1, -1]})
        return outputs

    async def _sample(self, request: SamplingRequest) -> tuple[np.ndarray, list | None]:
        """The request's images, with each image's lesion boxes from families that place lesions."""
        backend, batcher = self.backend, self.batcher
        if isinstance(batcher, DrawBatcher):  # torch families: whole draws, batched with others of the condition
            try:
                return await batcher.run(request.n, request.seed, request.condition,
                                         request.precision or backend.precision)
            except ValueError as err:  # the family's own condition checks
                raise InvalidInput(f"condition: {err}") from err
        chunks = [gaussian_latents(request.seed, min(self.max_batch, request.n - start), backend.latent_dim, start)
                  for start in range(0, request.n, self.max_batch)]
        return np.concatenate(await asyncio.gather(*(batcher.run(chunk) for chunk in chunks))), None

    def _echo(self, request: SamplingRequest) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version, "seed": request.seed,
                "label": request.condition.get("label", self.backend.label), "condition": request.condition,
                "precision": request.precision or self.backend.precision}

    async def predict(self, payload, headers: dict[str, str] | None = None):
        if isinstance(payload, InferRequest):
            request = parse_v2_request(payload, self.backend, self.max_n)
            images, boxes = await self._sample(request)
            output = InferOutput(name="images", shape=list(images.shape), datatype="UINT8")
            output.set_data_from_numpy(images, binary_data=False)
            outputs = [output]
            if self.backend.draws_masks:
                outputs.append(InferOutput(name="masks", shape=list(images.shape), datatype="UINT8"))
                outputs[-1].set_data_from_numpy(np.stack(boxes).astype(np.uint8), binary_data=False)
            elif boxes is not None:  # (n, most boxes of an image, 4), rows of -1 where an image has fewer
                table = np.full((len(boxes), max(map(len, boxes), default=0), 4), -1, dtype=np.int32)
                for k, image_boxes in enumerate(boxes):
                    table[k, :len(image_boxes)] = np.asarray(image_boxes, dtype=np.int32).reshape(-1, 4)
                outputs.append(InferOutput(name="boxes", shape=list(table.shape), datatype="INT32"))
                outputs[-1].set_data_from_numpy(table, binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=outputs, model_version=self.version,
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs,
                                 parameters={k: v for k, v in self._echo(request).items()
                                             if k in ("model_version", "seed", "label", "precision")})
        if isinstance(payload, (bytes, str)):  # kserve leaves bodies of other content types (curl -d) undecoded
            try:
                payload = json.loads(payload)
            except (ValueError, RecursionError) as err:
                raise InvalidInput(f"request body: not JSON ({err})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
            raise InvalidInput('instances: expected {"instances": [{"n": ..., "seed": ..., ...}]}')
        requests = [parse_request(item, self.backend, self.max_n, f"instances[{i}]")
                    for i, item in enumerate(payload["instances"])]
        if sum(r.n for r in requests) > self.max_n:
            raise InvalidInput(f"instances: {sum(r.n for r in requests)} images in one call; at most {self.max_n}")
        predictions = []
        for request, (images, boxes) in zip(requests, await asyncio.gather(*(self._sample(r) for r in requests))):
            encode = lambda: [base64.b64encode(png_bytes(image)).decode() for image in images]  # noqa: E731
            if self.backend.draws_masks:  # the masks as PNGs too, 255 on the lesion
                masks = [base64.b64encode(png_bytes(mask.astype(np.uint8) * 255)).decode() for mask in boxes]
                boxes = None
            # a few small images are cheaper to encode here than the thread hop; more go off the event loop (zlib
            # releases the GIL, so they overlap with other requests' encoding and sampling)
            encoded = encode() if images.size <= INLINE_ENCODE_PIXELS else await asyncio.to_thread(encode)
            predictions.append({**self._echo(request), "format": request.format, "images": encoded,
                                **({} if boxes is None else {"boxes": boxes}),
                                **({"masks": masks} if self.backend.draws_masks else {})})
        return {"predictions": predictions}
