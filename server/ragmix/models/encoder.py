"""The query/passage encoder at serving time: a tokenizer and one ONNX session, no torch.

The graph already pools and normalises (see encoder_export), so `encode` returns the unit vectors
whose inner products are retrieval scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ragmix.errors import BundleError, ValidationError
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

# Texts tokenised, sorted by length and batched together: large enough that sorting cuts padding,
# small enough that a million-passage corpus never holds all its encodings at once.
SORT_WINDOW_BATCHES = 16


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a device, else CPU (docs/DESIGN.md § Not built yet)."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


KIND = "encoder"
REQUIRED = ("name", "fingerprint", "tokenizer", "dimension", "max_length", "files")
"""Manifest keys the loader reads."""


class Encoder:
    """A loaded encoder bundle: texts → float32 unit vectors [n, dimension]."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.fingerprint: str = manifest["fingerprint"]
        self.dimension: int = int(manifest["dimension"])
        self.max_length: int = int(manifest["max_length"])
        self._session = session
        self._tokenizer = tokenizer
        self._input_names = {i.name for i in session.get_inputs()}
        self._output = manifest.get("output", "embedding")

    @classmethod
    def load(
        cls, folder: Path, *, providers: list[Any] | None = None, threads: int | None = None
    ) -> Encoder:
        folder, manifest = bundle.open_bundle(folder, KIND, required=REQUIRED)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The encoder and the generator take turns on the same cores: a pool whose threads spin on
        # after its run made the other session's next run 1.7x slower (38 -> 65 ms for a 5-row
        # decode step after a 2-thread session ran, 2 cores). Spin within a run, not after it.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads is not None:
            if threads < 1:
                raise ValidationError("threads", f"threads must be >= 1, got {threads}.")
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(
                str(folder / manifest.get("onnx", "model.onnx")),
                sess_options=options,
                providers=providers or default_providers(),
            )
            tokenizer = Tokenizer.from_file(str(folder / manifest["tokenizer"]))
        except Exception as e:  # onnxruntime and tokenizers raise their own types
            raise BundleError(f"{folder}: cannot load the encoder bundle: {e}") from e
        with bundle.malformed(folder, KIND):
            encoder = cls(folder, manifest, session, tokenizer)
            # Padding is done per batch, after sorting by length; truncation stays from the bundle.
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=encoder.max_length)
        LOG.info("loaded encoder %s (%d dims) from %s", encoder.name, encoder.dimension, folder)
        return encoder

    @property
    def session(self) -> ort.InferenceSession:
        return self._session

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embed `texts` in batches of similar length; rows come back in the order given."""
        if batch_size < 1:
            raise ValidationError("batch_size", f"batch_size must be >= 1, got {batch_size}.")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)  # texts x dim
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit="passage", desc=f"encoding with {self.name}")
        window = batch_size * SORT_WINDOW_BATCHES
        try:
            for start in range(0, len(texts), window):
                encodings = self._tokenizer.encode_batch(list(texts[start : start + window]))
                order = np.argsort([len(e.ids) for e in encodings], kind="stable")
                for b in range(0, len(order), batch_size):
                    rows = order[b : b + batch_size]
                    out[start + rows] = self._run([encodings[i] for i in rows])
                    if bar is not None:
                        bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _run(self, encodings: list[Any]) -> np.ndarray:
        length = max(len(e.ids) for e in encodings)
        input_ids = np.zeros((len(encodings), length), dtype=np.int64)  # batch x seq
        attention_mask = np.zeros_like(input_ids)  # batch x seq
        token_type_ids = np.zeros_like(input_ids)  # batch x seq
        for r, e in enumerate(encodings):
            n = len(e.ids)
            input_ids[r, :n] = e.ids
            attention_mask[r, :n] = e.attention_mask
            token_type_ids[r, :n] = e.type_ids
        pad_id = self.manifest.get("pad_id")
        if pad_id:
            input_ids[attention_mask == 0] = pad_id
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = token_type_ids
        (embedding,) = self._session.run([self._output], feeds)  # batch x dim
        return embedding

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dimension={self.dimension}, folder={str(self.folder)!r})"
