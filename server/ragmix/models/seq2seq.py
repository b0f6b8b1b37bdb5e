"""An encoder-decoder generator bundle (BART, mBART, T5) at run time, over the same KV cache a
decoder-only Generator uses, so the engine drives either.

The cache contract ("unified slots"; seq2seq_export.py builds the graphs): a row's cache is 2 *
decoder layers buffers k0, v0, k1, ... [rows, heads, capacity, head_dim]. For a row whose source
("encoder input") has E tokens, slots [0, E) of layer i's buffers hold decoder layer i's
cross-attention keys and values of the encoder's output, and slots [E, length) the decoder's
self-attention keys and values of the answer so far. A row's length counts its E source slots and
its decoder tokens, as a decoder-only row's counts prompt and answer; moving, copying and growing
rows needs nothing new. A fresh row's tokens are its source followed by the decoder's first
tokens (`decoder_start_ids`); one pass encodes the sources, writes their cross keys and values,
and runs the decoder over every row's new tokens.

No torch here.
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
from ragmix.models.generator import (
    Generator,
    SlotCacheModel,
    _bind,
    _open,
    default_providers,
    session_options,
)

LOG = logging.getLogger(__name__)

KIND = "generator"
ARCHITECTURE = "encoder-decoder"
GRAPH = "seq2seq"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
REQUIRED = (
    "name",
    "fingerprint",
    "tokenizer",
    "prompt_template",
    "architecture",
    "graph",
    "kv",
    "io",
    "files",
    "vocab_size",
    "eos_token_ids",
    "pad_token_id",
    "decoder_start_token_id",
    "max_positions",
    "max_source_positions",
)
"""Manifest keys every encoder-decoder bundle has."""


def load_generator(folder: Path, **kw: Any) -> Generator | Seq2SeqGenerator:
    """The runtime the bundle at `folder` needs, loaded: Seq2SeqGenerator for an encoder-decoder
    bundle, Generator otherwise (kw: providers, threads)."""
    _, manifest = bundle.open_bundle(folder, KIND, verify=False)  # load() verifies
    if manifest.get("architecture") == ARCHITECTURE:
        return Seq2SeqGenerator.load(folder, **kw)
    return Generator.load(folder, **kw)


class Seq2SeqGenerator(SlotCacheModel):
    """A loaded encoder-decoder bundle: tokenizer, templates, KV layout, the two ONNX sessions.

    Attributes and methods mean what Generator's do. decoder_start_ids: the decoder's first
    tokens of every answer, [decoder_start_token_id] plus forced_bos_token_id when the model has
    one (mBART-50's target language): HF forces that token as the first generated one, which is
    the same as feeding it, and costs no logits processor in the engine. forced_eos_token_id is
    reported, not applied: the engine decides what to do at its length limit.
    """

    is_encoder_decoder = True

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
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
        self.passage_template: str = manifest.get("passage_template", "{title} / {text}")
        self.max_positions: int = int(manifest["max_positions"])
        self.max_source_positions: int = int(manifest["max_source_positions"])
        self.decoder_start_token_id: int = int(manifest["decoder_start_token_id"])
        forced_bos = manifest.get("forced_bos_token_id")
        self.forced_bos_token_id: int | None = None if forced_bos is None else int(forced_bos)
        forced_eos = manifest.get("forced_eos_token_id")
        self.forced_eos_token_id: int | None = None if forced_eos is None else int(forced_eos)
        self.decoder_start_ids: list[int] = [self.decoder_start_token_id]
        if self.forced_bos_token_id is not None:
            self.decoder_start_ids.append(self.forced_bos_token_id)
        self.encoder_session = encoder
        self.decoder_session = decoder
        io = manifest["io"]
        self.encoder_inputs: list[str] = list(io["encoder"]["inputs"])
        self.encoder_outputs: list[str] = list(io["encoder"]["outputs"])
        self.decoder_inputs: list[str] = list(io["decoder"]["inputs"])
        self.decoder_outputs: list[str] = list(io["decoder"]["outputs"])
        for file, session, names in (
            (ENCODER_FILE, encoder, self.encoder_inputs),
            (DECODER_FILE, decoder, self.decoder_inputs),
        ):
            graph_inputs = [i.name for i in session.get_inputs()]
            if graph_inputs != names:
                raise BundleError(
                    f"{folder}: {file} inputs {graph_inputs} do not match the manifest's "
                    f"{names}. Rebuild the bundle."
                )

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> Seq2SeqGenerator:
        """Verify the bundle's checksums and open its two sessions (all graph optimisations on)."""
        folder, manifest = bundle.open_bundle(folder, KIND)
        architecture, graph = manifest.get("architecture"), manifest.get("graph")
        if architecture != ARCHITECTURE or graph != GRAPH:
            raise BundleError(
                f"{folder} holds a {architecture!r} generator ({graph!r} graph), not an "
                "encoder-decoder one: load it with Generator.load, or with "
                "seq2seq.load_generator, which picks the runtime."
            )
        missing = [key for key in REQUIRED if key not in manifest]
        if missing:
            raise BundleError(
                f"{folder}/{bundle.MANIFEST} lacks {', '.join(map(repr, missing))}: "
                f"{bundle.fix_for(KIND, folder)}."
            )
        options = session_options(threads)
        chosen = providers or default_providers()
        encoder = _open(folder / ENCODER_FILE, options, chosen)
        decoder = _open(folder / DECODER_FILE, options, chosen)
        with bundle.malformed(folder, KIND):
            generator = cls(folder, manifest, encoder, decoder)
        LOG.info("loaded generator %s from %s on %s", generator.name, folder, generator.providers)
        return generator

    @property
    def providers(self) -> list[str]:
        return self.decoder_session.get_providers()

    @property
    def sessions(self) -> list[ort.InferenceSession]:
        """Both sessions (the loader checks each is placed on the device asked for)."""
        return [self.encoder_session, self.decoder_session]

    def forward(
        self,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        logits_index: np.ndarray,
        cache: Sequence[Any],
        sources: np.ndarray | None = None,
    ) -> Any:
        """One pass over `batch` rows of `new` tokens each; returns logits batch x W x vocab.

        input_ids: batch x new, each row's tokens first and padding after; lengths: batch, the
        slots each row already holds; sources: batch, each row's source length E >= 1. A row with
        length 0 is fresh: its first E tokens are the source (encoded here, their cross keys and
        values written at slots [0, E)) and the rest decoder tokens, from slot E on. A row with
        length >= E continues: all its tokens are decoder tokens from slot `length` on.
        logits_index: batch x W, indices into each row's tokens (>= E for a fresh row). cache:
        as Generator.forward's (numpy, or CuPy on the sessions' device: the logits come back in
        the same memory). The decoder's new keys and values are written at slots
        [length, length + new) of a continuing row and [E, new) of a fresh one, nothing else: a
        padding token's slot holds a stand-in until the row's next token overwrites it.
        """
        if sources is None:
            raise ValueError("an encoder-decoder generator needs sources: each row's E >= 1.")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        sources = np.ascontiguousarray(sources, dtype=np.int64)
        logits_index = np.ascontiguousarray(logits_index, dtype=np.int64)
        self._check(input_ids, lengths, logits_index, cache, sources)
        fresh = lengths == 0
        if fresh.any():
            self._encode(input_ids[fresh], sources[fresh], np.flatnonzero(fresh), cache)
        # The decoder's tokens: a fresh row's after its source, shifted to the start.
        skip = np.where(fresh, sources, 0)  # batch
        widths = input_ids.shape[1] - skip  # batch: the row's decoder tokens (padding too)
        width = int(widths.max())
        cols = np.arange(width)
        take = skip[:, None] + np.minimum(cols, widths[:, None] - 1)  # batch x D, in range
        tokens = np.take_along_axis(input_ids, take, axis=1)
        tokens[cols[None, :] >= widths[:, None]] = self.pad_token_id
        starts = np.where(fresh, sources, lengths)
        index = logits_index - skip[:, None]
        xp = arrays.module_of(cache[0])
        logits = xp.empty((input_ids.shape[0], index.shape[1], self.vocab_size), np.float32)
        self._decode(np.ascontiguousarray(tokens), starts, sources, index, cache, logits, widths)
        return logits

    def _encode(self, ids, sources, rows, cache) -> None:
        """Encode the fresh rows' sources (right-padded to the longest, masked) and write their
        cross keys and values at slots [0, E) of their rows."""
        longest = int(sources.max())
        cols = np.arange(longest)
        mask = (cols[None, :] < sources[:, None]).astype(np.int64)  # fresh x S
        source_ids = np.where(mask == 1, ids[:, :longest], self.pad_token_id).astype(np.int64)
        xp = arrays.module_of(cache[0])
        shape = (len(rows), self.num_kv_heads, longest, self.head_dim)
        cross = [xp.empty(shape, np.float32) for _ in cache]
        binding = self.encoder_session.io_binding()
        binding.bind_cpu_input(self.encoder_inputs[0], np.ascontiguousarray(source_ids))
        binding.bind_cpu_input(self.encoder_inputs[1], mask)
        for name, array in zip(self.encoder_outputs, cross, strict=True):
            _bind(binding.bind_output, name, array)
        self.encoder_session.run_with_iobinding(binding)
        which = np.repeat(np.arange(len(rows)), sources)  # n: the fresh row of each slot
        slots = _ranges(sources)  # n
        _scatter(cache, cross, rows[which], which, slots, slots)

    def _decode(self, tokens, starts, sources, index, cache, logits, widths) -> None:
        """One decoder pass over every row from slot `starts`; writes each row's `widths` new
        keys and values at slots [starts, starts + widths)."""
        batch, width = tokens.shape
        xp = arrays.module_of(cache[0])
        shape = (batch, self.num_kv_heads, width, self.head_dim)
        new = [xp.empty(shape, np.float32) for _ in cache]
        binding = self.decoder_session.io_binding()
        names = self.decoder_inputs
        for name, array in zip(names[:4], (tokens, starts, sources, index), strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for name, array in zip(names[4:], cache, strict=True):
            _bind(binding.bind_input, name, array)
        for name, array in zip(self.decoder_outputs, (logits, *new), strict=True):
            _bind(binding.bind_output, name, array)
        self.decoder_session.run_with_iobinding(binding)
        rows = np.repeat(np.arange(batch), widths)  # n
        cols = _ranges(widths)  # n
        _scatter(cache, new, rows, rows, starts[rows] + cols, cols)

    def _check(self, input_ids, lengths, logits_index, cache, sources) -> None:
        """Shape and range checks that cost O(batch x new), so a caller's bug reads as one line
        instead of an onnxruntime trace (or a write outside the buffer)."""
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be batch x new (new >= 1), got {input_ids.shape}.")
        batch, new = input_ids.shape
        for what, array in (("lengths", lengths), ("sources", sources)):
            if array.shape != (batch,):
                raise ValueError(f"{what} must have shape ({batch},), got {array.shape}.")
        capacity = self._check_cache(cache, batch)
        if logits_index.ndim != 2 or logits_index.shape[0] != batch or logits_index.shape[1] < 1:
            raise ValueError(
                f"logits_index must be batch x positions with batch {batch} and positions >= 1, "
                f"got {logits_index.shape}."
            )
        if sources.min() < 1 or sources.max() > self.max_source_positions:
            raise ValueError(
                f"sources must be in [1, {self.max_source_positions}] (the model's source "
                f"positions), got [{sources.min()}, {sources.max()}]."
            )
        partial = (lengths > 0) & (lengths < sources)
        if lengths.min() < 0 or partial.any():
            b = int(np.flatnonzero((lengths < 0) | partial)[0])
            raise ValueError(
                f"row {b} has length {lengths[b]} and a source of {sources[b]}: a row is fresh "
                "(length 0) or holds at least its source's slots (length >= source)."
            )
        if lengths.max() + new > capacity:
            raise ValueError(
                f"lengths + new must fit the cache's {capacity} slots, got lengths in "
                f"[{lengths.min()}, {lengths.max()}] with {new} new."
            )
        if (lengths + new - sources).max() > self.max_positions:
            raise ValueError(
                f"a row would pass the model's {self.max_positions} decoder positions."
            )
        self._check_tokens(input_ids, lengths, logits_index, sources)

    def _check_cache(self, cache, batch) -> int:
        """The cache's capacity, once every buffer is the right shape, type and layout."""
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
        return int(capacity)

    def _check_tokens(self, input_ids, lengths, logits_index, sources) -> None:
        new = input_ids.shape[1]
        fresh = lengths == 0
        if fresh.any() and sources[fresh].max() >= new:
            raise ValueError(
                f"a fresh row's tokens are its source and at least one decoder token: new ({new}) "
                f"must exceed its source ({sources[fresh].max()})."
            )
        if logits_index.min() < 0 or logits_index.max() >= new:
            raise ValueError(
                f"logits_index must be in [0, {new - 1}], "
                f"got [{logits_index.min()}, {logits_index.max()}]."
            )
        low = logits_index.min(axis=1) < np.where(fresh, sources, 0)
        if low.any():
            b = int(np.flatnonzero(low)[0])
            raise ValueError(
                f"row {b} is fresh with a source of {sources[b]} tokens: its logits_index must "
                f"point at decoder tokens (>= {sources[b]}), got {logits_index[b].min()}."
            )
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, {self.vocab_size - 1}], "
                f"got [{input_ids.min()}, {input_ids.max()}]."
            )


def _ranges(counts: np.ndarray) -> np.ndarray:
    """arange(counts[0]), arange(counts[1]), ... concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1])) - np.repeat(ends - counts, counts)


def _scatter(cache, parts, rows, part_rows, slots, part_slots) -> None:
    """cache[l][rows[n], :, slots[n]] = parts[l][part_rows[n], :, part_slots[n]] for every n:
    one vectorised write per buffer (arrays of the cache's module)."""
    xp = arrays.module_of(cache[0])
    rows, slots = xp.asarray(rows), xp.asarray(slots)
    part_rows, part_slots = xp.asarray(part_rows), xp.asarray(part_slots)
    for buf, part in zip(cache, parts, strict=True):
        buf[rows, :, slots] = part[part_rows, :, part_slots]  # n x heads x head_dim
