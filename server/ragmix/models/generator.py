"""The generator bundle at run time: an onnxruntime session over a decoder with a caller-owned KV cache.

No torch here. The engine owns scheduling and the cache; this class only runs one forward pass over
a batch of rows, each row with its own mask, positions and past, and returns logits at the
positions asked for plus the grown cache (see generator_export.py for the graph's contract).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ragmix.errors import BundleError
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

KIND = "generator"


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last `new_tokens` slots: the count of attended slots before each.

    Holes in the mask (left padding, evicted slots) do not advance the position, so a row's
    positions are the same wherever its tokens sit in the batch. Padding slots get 0.
    """
    positions = np.cumsum(attention_mask, axis=1, dtype=np.int64) - 1  # batch x total
    return np.clip(positions[:, attention_mask.shape[1] - new_tokens :], 0, None)  # batch x new


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in preferred if p in available]


class Generator:
    """A loaded generator bundle: tokenizer, prompt template, KV layout and the ONNX session."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], session: ort.InferenceSession
    ) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer = Tokenizer.from_file(str(self.folder / manifest["tokenizer"]))
        kv = manifest["kv"]
        self.num_layers: int = int(kv["num_layers"])
        self.num_kv_heads: int = int(kv["num_kv_heads"])
        self.head_dim: int = int(kv["head_dim"])
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in manifest["eos_token_ids"])
        self.pad_token_id: int = int(manifest["pad_token_id"])
        self.bos_token_id: int | None = manifest.get("bos_token_id")
        self.prompt_template: str = manifest["prompt_template"]
        self.max_positions: int = int(manifest["max_positions"])
        self.session = session
        self.input_names: list[str] = list(manifest["io"]["inputs"])
        self.output_names: list[str] = list(manifest["io"]["outputs"])
        graph_inputs = [i.name for i in session.get_inputs()]
        if graph_inputs != self.input_names:
            raise BundleError(
                f"{folder}: model.onnx inputs {graph_inputs} do not match the manifest's "
                f"{self.input_names}. Rebuild the bundle."
            )

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> Generator:
        """Verify the bundle's checksums and open its ONNX session (all graph optimisations on)."""
        folder = Path(folder)
        manifest = bundle.read_manifest(folder, KIND)
        for key in ("name", "fingerprint", "tokenizer", "prompt_template", "kv", "io", "files"):
            if key not in manifest:
                raise BundleError(f"{folder}/manifest.json lacks {key!r}. Rebuild the bundle.")
        if manifest["kv"].get("outputs") != "new":
            raise BundleError(
                f"{folder} was exported by an older ragmix whose graph returns the whole KV cache; "
                "this version needs only the new keys and values. Rebuild it (`ragmix models "
                "export-default --overwrite`, or `ragmix models export ... --overwrite`)."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}.")
            options.intra_op_num_threads = threads
        chosen = providers or default_providers()
        try:
            session = ort.InferenceSession(
                str(folder / "model.onnx"), sess_options=options, providers=chosen
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise BundleError(f"{folder}/model.onnx cannot be loaded by onnxruntime: {e}") from e
        LOG.info(
            "loaded generator %s from %s on %s", manifest["name"], folder, session.get_providers()
        )
        return cls(folder, manifest, session)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode(self, text: str) -> list[int]:
        """Token ids without added BOS/EOS; special tokens written in `text` become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """A past of length 0 for `batch` rows, ordered k0, v0, k1, v1, ..."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)  # batch x kv_heads x 0 x head_dim
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
        logits_index: np.ndarray,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """`forward_new`, returning the present cache (past and new concatenated) instead.

        Convenient for callers that rebuild their cache every call; the engine appends in place.
        """
        logits, new = self.forward_new(input_ids, attention_mask, position_ids, past, logits_index)
        return logits, [np.concatenate([p, n], axis=2) for p, n in zip(past, new, strict=True)]

    def forward_new(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
        logits_index: np.ndarray,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass over `batch` rows of `new` tokens each.

        input_ids, position_ids: batch x new; attention_mask: batch x (past + new), 1 = attend;
        past: 2 * layers arrays batch x kv_heads x past x head_dim (slots the mask zeroes must hold
        finite values, e.g. zeros: a buffer with spare capacity is passed whole, without a copy);
        logits_index: batch x positions, indices into the new tokens. Returns logits
        batch x positions x vocab and the new tokens' keys and values (batch x kv_heads x new x
        head_dim each, same order as `past`).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        position_ids = np.asarray(position_ids, dtype=np.int64)
        logits_index = np.asarray(logits_index, dtype=np.int64)
        self._check(input_ids, attention_mask, position_ids, past, logits_index)
        feeds = dict(
            zip(
                self.input_names[:4],
                (input_ids, attention_mask, position_ids, logits_index),
                strict=True,
            )
        )
        for name, array in zip(self.input_names[4:], past, strict=True):
            feeds[name] = array
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def _check(self, input_ids, attention_mask, position_ids, past, logits_index) -> None:
        """Shape and range checks that cost O(batch x new), so a caller's bug reads as one line
        instead of an onnxruntime trace."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be batch x new, got shape {input_ids.shape}.")
        batch, new = input_ids.shape
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"past must hold {2 * self.num_layers} arrays, got {len(past)}.")
        past_shape = past[0].shape
        expected = (batch, self.num_kv_heads, past_shape[2] if past_shape else -1, self.head_dim)
        for i, array in enumerate(past):
            if array.shape != expected or array.dtype != np.float32:
                raise ValueError(
                    f"past[{i}] must be float32 {expected}, got {array.dtype} {array.shape}."
                )
        total = expected[2] + new
        if attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask must be batch x (past + new) = {(batch, total)}, "
                f"got {attention_mask.shape}."
            )
        if position_ids.shape != (batch, new):
            raise ValueError(f"position_ids must be {(batch, new)}, got {position_ids.shape}.")
        if new and (position_ids.min() < 0 or position_ids.max() >= self.max_positions):
            raise ValueError(
                f"position_ids must be in [0, {self.max_positions - 1}], "
                f"got [{position_ids.min()}, {position_ids.max()}]."
            )
        if logits_index.ndim != 2 or logits_index.shape[0] != batch:
            raise ValueError(
                f"logits_index must be batch x positions with batch {batch}, "
                f"got {logits_index.shape}."
            )
        if logits_index.size and (logits_index.min() < 0 or logits_index.max() >= new):
            raise ValueError(
                f"logits_index must be in [0, {new - 1}], "
                f"got [{logits_index.min()}, {logits_index.max()}]."
            )
        if new and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(
                f"input_ids must be in [0, {self.vocab_size - 1}], "
                f"got [{input_ids.min()}, {input_ids.max()}]."
            )
