"""FAISS index types for maximum inner-product search: exact, graph (HNSW) and compressed (IVF-PQ).

Every type uses METRIC_INNER_PRODUCT, so the distance FAISS returns is the score the prior needs,
d(z)·q(x): exactly for `flat` and `hnsw` (they keep the float32 vectors), and for `ivfpq` the inner
product with the vector its codes reconstruct (coarse centroid + PQ residual, which is what the
asymmetric distance computes). The embeddings are unit-norm, so inner-product ranking is also
cosine and L2 ranking; no metric conversion is needed (docs/DESIGN.md § Index types).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import faiss
import numpy as np

from ragmix.errors import BundleError, ValidationError

TYPES = ("flat", "hnsw", "ivfpq")
FLAT_BELOW = 100_000
"""`auto` picks exact search below this many passages: 100k x 384 float32 is 150 MB and a
brute-force query a few milliseconds on 2 cores, so approximation buys nothing there."""
HNSW_BELOW = 2_000_000
"""...and HNSW below this many (its float32 vectors plus graph, ~1.7 KB per 384-d passage, fit in
a few GB); IVF-PQ above, where memory decides (16-64 bytes per passage)."""
MAX_NPROBE = 65_536
MAX_EF_SEARCH = 32_768
"""Range bounds of the knobs, checked before they reach FAISS's int arguments."""


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """An index type and its build parameters (0 = derived from the corpus size)."""

    type: str = "auto"
    hnsw_m: int = 32
    ef_construction: int = 200
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    train_size: int = 0

    def resolved(self, n: int, dimension: int) -> IndexSpec:
        """The concrete type and parameters for n passages of `dimension` (checked)."""
        kind = self.type
        if kind == "auto":
            kind = "flat" if n < FLAT_BELOW else "hnsw" if n < HNSW_BELOW else "ivfpq"
        if kind not in TYPES:
            raise ValidationError(
                "index_type", f"index_type must be auto or one of {TYPES}, got {kind!r}."
            )
        spec = dataclasses.replace(self, type=kind)
        if kind == "hnsw" and not (4 <= spec.hnsw_m <= 256 and spec.ef_construction >= spec.hnsw_m):
            raise ValidationError(
                "hnsw_m",
                f"HNSW needs M in [4, 256] and efConstruction >= M, got M={spec.hnsw_m}, "
                f"efConstruction={spec.ef_construction}.",
            )
        if kind != "ivfpq":
            return spec
        nlist = spec.nlist or _default_nlist(n)
        pq_m = spec.pq_m or _default_pq_m(dimension)
        if dimension % pq_m:
            raise ValidationError(
                "pq_m", f"pq_m must divide the dimension {dimension}, got {pq_m}."
            )
        if spec.pq_bits not in (4, 6, 8):
            raise ValidationError("pq_bits", f"pq_bits must be 4, 6 or 8, got {spec.pq_bits}.")
        train = spec.train_size or min(n, max(64 * nlist, 2**spec.pq_bits * 64))
        if not (1 <= nlist <= n and 2**spec.pq_bits <= train <= n):
            raise ValidationError(
                "nlist",
                f"IVF-PQ over {n} passages needs 1 <= nlist <= {n} and "
                f"{2**spec.pq_bits} <= train_size <= {n}, got nlist={nlist}, train_size={train}.",
            )
        return dataclasses.replace(spec, nlist=nlist, pq_m=pq_m, train_size=train)

    def factory(self) -> str:
        """The FAISS index_factory string of a resolved spec."""
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}"


def _default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists (FAISS's guideline), at least 1 and at most n / 39 so that every
    centroid has the 39 training points k-means wants."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _default_pq_m(dimension: int) -> int:
    """dimension / 8 sub-quantisers (48 bytes per 384-d passage at 8 bits), a divisor of it."""
    m = max(1, dimension // 8)
    while dimension % m:
        m -= 1
    return m


def build(spec: IndexSpec, vectors: np.ndarray, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A trained, filled FAISS index of a resolved spec over unit `vectors`, and what its manifest
    records about the build (type, parameters, factory string, training)."""
    n, d = vectors.shape
    index = faiss.index_factory(d, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    details: dict[str, Any] = {"type": spec.type, "factory": spec.factory(), "parameters": {}}
    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = spec.ef_construction
        details["parameters"] = {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}
    if spec.type == "ivfpq":
        # The factory turns on polysemous training for 8-bit PQ (~45 s at any size on 2 cores);
        # it serves polysemous filtering, which ragmix's searches never use.
        faiss.downcast_index(index).do_polysemous_training = False
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, spec.train_size, replace=False))]
        t0 = time.perf_counter()
        index.train(sample)
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct() for passage_ids scores
        details["parameters"] = {"nlist": spec.nlist, "pq_m": spec.pq_m, "pq_bits": spec.pq_bits}
        details["training"] = {
            "vectors": int(spec.train_size),
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    index.add(vectors)
    details["spec"] = dataclasses.asdict(spec)
    return index, details


def index_type_of(index: Any) -> str:
    """What a loaded FAISS index is, by its class (the manifest says it too; they must agree)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    raise BundleError(
        f"FAISS index class {type(index).__name__} is not one ragmix serves ({TYPES})."
    )


@dataclasses.dataclass(frozen=True)
class SearchKnobs:
    """Query-time accuracy/speed knobs; 0 = the index's default."""

    nprobe: int = 0
    ef_search: int = 0


def check_knobs(kind: str, knobs: SearchKnobs, k: int, nlist: int = 0) -> None:
    """Refuse knobs the index type does not have or values outside their range."""
    if knobs.nprobe:
        if kind != "ivfpq":
            raise ValidationError(
                "nprobe", f"nprobe applies to ivfpq indexes; this server's index is {kind} (use 0)."
            )
        if not 1 <= knobs.nprobe <= nlist:
            raise ValidationError(
                "nprobe", f"nprobe must be in [1, {nlist}] (the index's nlist), got {knobs.nprobe}."
            )
    if knobs.ef_search:
        if kind != "hnsw":
            raise ValidationError(
                "ef_search",
                f"ef_search applies to hnsw indexes; this server's index is {kind} (use 0).",
            )
        if not k <= knobs.ef_search <= MAX_EF_SEARCH:
            raise ValidationError(
                "ef_search",
                f"ef_search must be in [top_k = {k}, {MAX_EF_SEARCH}], got {knobs.ef_search}.",
            )


def search_parameters(
    kind: str, knobs: SearchKnobs, defaults: SearchKnobs, k: int, selector: Any = None
) -> Any:
    """FAISS per-call SearchParameters: the request's knobs, else the server's, else ragmix's
    defaults, and the selector that masks deleted rows (None: none). Per call, not set on the
    index, so concurrent requests with different knobs share one index; efSearch is raised to k
    when lower, since HNSW cannot return more than efSearch results. None for flat without
    deletions: FAISS's unfiltered path."""
    if kind == "hnsw":
        ef = knobs.ef_search or defaults.ef_search or DEFAULT_EF_SEARCH
        return faiss.SearchParametersHNSW(efSearch=max(ef, k), sel=selector)
    if kind == "ivfpq":
        nprobe = knobs.nprobe or defaults.nprobe or DEFAULT_NPROBE
        return faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
    return None if selector is None else faiss.SearchParameters(sel=selector)


DEFAULT_EF_SEARCH = 64
"""HNSW efSearch when neither the server (--ef-search) nor the request sets one."""
DEFAULT_NPROBE = 16
"""IVF nprobe when neither the server nor the request sets one."""
