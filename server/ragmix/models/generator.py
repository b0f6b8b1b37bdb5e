"""The generator bundle at run time: an onnxruntime session over a fused decoder graph whose KV
cache the caller owns.

No torch here. The engine owns scheduling and the cache; this class runs one forward pass over a
batch of rows, each row's KV a prefix of its own row of the cache, and returns logits at the
positions asked for; the graph writes the new keys and values into the cache in place (see
fused_graph.py for the graph's contract).
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
from ragmix.models import arrays, bundle

LOG = logging.getLogger(__name__)

KIND = "generator"
GRAPH = "fused"  # the graph kind this runtime drives (fused_graph.py's contract)
REQUIRED = ("name", "fingerprint", "tokenizer", "prompt_template", "kv", "io", "files")
"""Manifest keys every generator bundle has (servable() checks the graph's own)."""


def servable(manifest: dict[str, Any]) -> bool:
    """Whether this runtime serves the bundle: the fused graph and its chunk twin (older exports
    are rebuilt, the defaults, or refused with the command that rebuilds them)."""
    return manifest.get("graph") == GRAPH and "chunk_graph" in manifest


def _open(path: Path, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise BundleError(f"{path} cannot be loaded by onnxruntime: {e}") from e


def _bind(bind: Any, name: str, array: Any) -> None:
    """Bind a float32 array's own memory, host or device, as an input or output (`bind`: the
    binding's method): onnxruntime reads and writes it in place, no copy either way."""
    kind, device_id, pointer = arrays.location(array)
    bind(name, kind, device_id, np.float32, tuple(array.shape), pointer)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in preferred if p in available]


TITLE_LINE = "{title}\n{text}"
"""How a decoder-only prompt's {passage} slot shows a passage: its title line, then its text."""


def session_options(threads: int | None) -> ort.SessionOptions:
    """All graph optimisations on, `threads` intra-op threads (None: onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The encoder and the generator take turns on the same cores: a pool whose threads spin on
    # after its run made the other session's next run 1.7x slower (38 -> 65 ms for a 5-row
    # decode step after a 2-thread session ran, 2 cores). Spin within a run, not after it.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        options.intra_op_num_threads = threads
    return options


class SlotCacheModel:
    """What every generator runtime shares: its tokenizer and its KV cache of slots
    (2 * layers buffers [rows, kv_heads, capacity, head_dim], k0, v0, k1, v1, ...)."""

    tokenizer: Tokenizer
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def providers(self) -> list[str]:
        raise NotImplementedError

    @property
    def device_kind(self) -> str:
        """ "cuda" when the sessions run on onnxruntime's CUDA provider, else "cpu"."""
        return "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    def device_cache(self, rows: int, capacity: int) -> list[Any]:
        """A KV cache like `new_cache`, in the sessions' device memory (CuPy arrays on CUDA,
        numpy on the CPU): decode passes over it copy nothing between host and device."""
        xp = arrays.module_for(self.device_kind)
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        return [xp.zeros(shape, np.float32) for _ in range(2 * self.num_layers)]

    def new_cache(self, rows: int, capacity: int) -> list[np.ndarray]:
        """An empty host KV cache, zeroed (lazily by the OS: untouched slots cost no memory)."""
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)]

    def encode(self, text: str) -> list[int]:
        """Token ids without added special tokens; special tokens written in `text` (a prompt
        template's "<|im_start|>", "<s>", "</s>") become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class Generator(SlotCacheModel):
    """A loaded generator bundle: tokenizer, prompt template, KV layout and the ONNX session."""

    is_encoder_decoder = False
    decoder_start_ids: tuple[int, ...] = ()  # a decoder-only prompt is the decoder's input
    passage_template = TITLE_LINE

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        session: ort.InferenceSession,
        chunk_session: ort.InferenceSession,
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
        # The chunk graph: several new tokens over pasts in more than one row, in one pass.
        self.chunk_session = chunk_session
        self.chunk_input_names: list[str] = list(manifest["chunk_graph"]["io"]["inputs"])
        self.chunk_output_names: list[str] = list(manifest["chunk_graph"]["io"]["outputs"])
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
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> Generator:
        """Verify the bundle's checksums and open its ONNX session (all graph optimisations on)."""
        folder, manifest = bundle.open_bundle(folder, KIND, required=REQUIRED)
        if not servable(manifest):
            raise BundleError(
                f"{folder} holds a {manifest.get('graph', 'traced')} graph from an older ragmix; "
                "this version serves the fused graph (GroupQueryAttention over a slot cache). "
                "Rebuild it (`ragmix models export-default --overwrite`, or `ragmix models "
                "export ... --overwrite`)."
            )
        options = session_options(threads)
        chosen = providers or default_providers()
        with bundle.malformed(folder, KIND):
            chunk_file = folder / manifest["chunk_graph"]["file"]
        session = _open(folder / "model.onnx", options, chosen)
        chunk = _open(chunk_file, options, chosen)
        with bundle.malformed(folder, KIND):
            generator = cls(folder, manifest, session, chunk)
        LOG.info("loaded generator %s from %s on %s", generator.name, folder, generator.providers)
        return generator

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def sessions(self) -> list[ort.InferenceSession]:
        return [self.session, self.chunk_session]

    def forward(
        self,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        logits_index: np.ndarray,
        cache: Sequence[Any],
        sources: np.ndarray | None = None,
    ) -> Any:
        """One pass over `batch` rows of `new` tokens each; returns logits batch x W x vocab.

        input_ids: batch x new, each row's tokens first and any padding after; lengths: batch,
        the slots each row already holds in `cache` (its KV is the prefix [0, length) of its row);
        logits_index: batch x W, indices into the new tokens; cache: 2 * layers C-contiguous
        float32 buffers [batch, kv_heads, capacity, head_dim] (slices of a bigger buffer's rows
        are fine; numpy, or CuPy on the session's device: the logits come back in the same
        memory) whose unused slots hold finite values (zeros: the chunk graph reads the whole
        capacity, masked). The keys and values of the new tokens are written in place at slots
        [length, length + new) of each row, nothing else is touched: a padding token's slot holds
        a stand-in until the row's next token overwrites it. sources: the encoder tokens at the
        start of each row, for encoder-decoder generators (seq2seq.py); a decoder-only model has
        none (None or zeros).
        """
        if sources is not None and np.any(sources):
            raise ValueError("a decoder-only generator has no encoder input: sources must be 0.")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        logits_index = np.ascontiguousarray(logits_index, dtype=np.int64)
        self._check(input_ids, lengths, logits_index, cache)
        batch, new = input_ids.shape
        xp = arrays.module_of(cache[0])  # the logits live where the cache does
        logits = xp.empty((batch, logits_index.shape[1], self.vocab_size), np.float32)
        if new > 1 and batch > 1 and lengths.any():
            # GroupQueryAttention on CPU refuses several new tokens over a past for more than one
            # row: the chunk graph batches them.
            self._run_chunk(input_ids, lengths, logits_index, cache, logits)
        else:
            self._run(input_ids, lengths, logits_index, cache, logits)
        return logits

    def _run_chunk(self, input_ids, lengths, logits_index, cache, logits) -> None:
        """The chunk graph: it reads each row's past where it lies and returns the new tokens'
        keys and values, written here at slots [length, length + new) of each row."""
        batch, new = input_ids.shape
        shape = (batch, self.num_kv_heads, new, self.head_dim)
        xp = arrays.module_of(cache[0])
        fresh = [xp.empty(shape, np.float32) for _ in cache]
        binding = self.chunk_session.io_binding()
        names = self.chunk_input_names
        for name, array in zip(names[:3], (input_ids, lengths, logits_index), strict=True):
            binding.bind_cpu_input(name, array)
        for name, array in zip(names[3:], cache, strict=True):
            _bind(binding.bind_input, name, array)
        for name, array in zip(self.chunk_output_names, (logits, *fresh), strict=True):
            _bind(binding.bind_output, name, array)
        self.chunk_session.run_with_iobinding(binding)
        rows = xp.asarray(np.repeat(np.arange(batch), new))  # batch*new
        slots = xp.asarray((lengths[:, None] + np.arange(new)[None, :]).reshape(-1))  # batch*new
        for buf, part in zip(cache, fresh, strict=True):  # one vectorised write per tensor
            buf[rows, :, slots] = part.transpose(0, 2, 1, 3).reshape(batch * new, *shape[1::2])

    def _run(self, input_ids, lengths, logits_index, cache, logits) -> None:
        """One session run with every input and output bound to caller memory (no copies):
        present key/value are bound to the past buffers, so the graph appends in place."""
        new = input_ids.shape[1]
        binding = self.session.io_binding()
        seqlens = (lengths + (new - 1)).astype(np.int32)
        total = np.array(int(lengths.max()) + new, np.int32)
        for name, array in zip(
            self.input_names[:4], (input_ids, seqlens, total, logits_index), strict=True
        ):
            binding.bind_cpu_input(name, array)
        for past, present, array in zip(
            self.input_names[4:], self.output_names[1:], cache, strict=True
        ):
            _bind(binding.bind_input, past, array)
            _bind(binding.bind_output, present, array)
        _bind(binding.bind_output, self.output_names[0], logits)
        self.session.run_with_iobinding(binding)

    def _check(self, input_ids, lengths, logits_index, cache) -> None:
        """Shape and range checks that cost O(batch x new), so a caller's bug reads as one line
        instead of an onnxruntime trace (or a write outside the buffer)."""
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be batch x new (new >= 1), got {input_ids.shape}.")
        batch, new = input_ids.shape
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}.")
        if len(cache) != 2 * self.num_layers:
            raise ValueError(f"cache must hold {2 * self.num_layers} arrays, got {len(cache)}.")
        first = cache[0]
        capacity = first.shape[2] if first.ndim == 4 else -1
        expected = (batch, self.num_kv_heads, capacity, self.head_dim)
        for i, array in enumerate(cache):
            if array.shape != expected or array.dtype != np.float32 or not array.flags.c_contiguous:
                raise ValueError(
                    f"cache[{i}] must be C-contiguous float32 {expected}, got {array.dtype} "
                    f"{array.shape}{'' if array.flags.c_contiguous else ' (not contiguous)'}."
                )
        if lengths.min() < 0 or lengths.max() + new > capacity:
            raise ValueError(
                f"lengths + new must fit the cache's {capacity} slots, got lengths in "
                f"[{lengths.min()}, {lengths.max()}] with {new} new."
            )
        if lengths.max() + new > self.max_positions:
            raise ValueError(f"a row would pass the model's {self.max_positions} positions.")
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
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, {self.vocab_size - 1}], "
                f"got [{input_ids.min()}, {input_ids.max()}]."
            )
