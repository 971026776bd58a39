"""Labelled vulnerable/patched code samples and the loaders that produce them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Literal

from vulnsteer.cwes import TARGET_CWE, normalise_cwe
from vulnsteer.errors import VulnsteerError

Label = Literal["vulnerable", "patched"]


@dataclass(frozen=True)
class Sample:
    """One code file with its ground truth; `pair_id` links a vulnerable file to its patched twin."""

    id: str
    cwe: str
    label: Label
    language: str
    code: str
    pair_id: str
    split: str
    source: str
    reasoning: str | None = None  # ground-truth explanation, when the dataset has one

    @property
    def is_vulnerable(self) -> bool:
        return self.label == "vulnerable"


# --- SecLLMHolmes ----------------------------------------------------------------------------

SECLLMHOLMES_SOURCE = "secllmholmes"
_LANGUAGES = MappingProxyType({".c": "c", ".py": "python"})


def _read_text(path: Path, what: str = "code file") -> str:
    """Read a UTF-8 file, turning the ways it can be unusable into one clear error."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VulnsteerError(f"{what} is not valid UTF-8: {path} ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise VulnsteerError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not text.strip():
        raise VulnsteerError(f"{what} is empty: {path}")
    return text


def _reasoning(path: Path) -> str | None:
    return _read_text(path, "ground-truth file").strip() if path.is_file() else None


def _code_files(folder: Path) -> list[Path]:
    """Code files of one `CWE-*` folder in a stable order, skipping stray files such as `.DS_Store`."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _LANGUAGES)


def _cwe_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("CWE-*") if p.is_dir()) if folder.is_dir() else []


def _synthetic_samples(root: Path, dataset: Path, truth: Path, split: str, pair_prefix: str) -> list[Sample]:
    """Samples of one `dataset/CWE-*/{N,p_N}.ext` tree; `N` is vulnerable and `p_N` its patched twin."""
    samples = []
    for cwe_dir in _cwe_dirs(dataset):
        for path in _code_files(cwe_dir):
            stem = path.stem
            samples.append(
                Sample(
                    id=path.relative_to(root).as_posix(),
                    cwe=normalise_cwe(cwe_dir.name),
                    label="patched" if stem.startswith("p_") else "vulnerable",
                    language=_LANGUAGES[path.suffix],
                    code=_read_text(path),
                    pair_id=f"{pair_prefix}/{cwe_dir.name}/{stem.removeprefix('p_')}",
                    split=split,
                    source=SECLLMHOLMES_SOURCE,
                    reasoning=_reasoning(truth / cwe_dir.name / f"{stem}.txt"),
                )
            )
    return samples


def _real_world_samples(root: Path) -> list[Sample]:
    """`real-world/<project>/<CVE>/{vuln,patch}.c`, CWE from `real-world/cve_details.json`.

    Upstream keeps one `cve_details.json` for all CVEs (`{project: {CVE: {"cwe": "cwe-787", ...}}}`) and the
    ground-truth reasoning next to the code as `vuln.txt` / `patch.txt`.
    """
    folder = root / "real-world"
    cve_dirs = sorted(p for p in folder.glob("*/CVE-*") if p.is_dir()) if folder.is_dir() else []
    if not cve_dirs:
        return []
    details_path = folder / "cve_details.json"
    if not details_path.is_file():
        raise VulnsteerError(f"real-world CVEs need their CWEs from {details_path}, which is missing")
    try:
        details = json.loads(_read_text(details_path, "CVE details file"))
    except json.JSONDecodeError as exc:
        raise VulnsteerError(f"{details_path} is not valid JSON: {exc}") from None
    samples = []
    for cve_dir in cve_dirs:
        project, cve = cve_dir.parent.name, cve_dir.name
        cwe = details.get(project, {}).get(cve, {}).get("cwe")
        if cwe is None:
            raise VulnsteerError(f"{details_path} gives no CWE for {project}/{cve}")
        labels: tuple[tuple[str, Label], ...] = (("vuln", "vulnerable"), ("patch", "patched"))
        for stem, label in labels:
            path = cve_dir / f"{stem}.c"
            if not path.is_file():
                raise VulnsteerError(f"missing {path} (each real-world CVE needs vuln.c and patch.c)")
            samples.append(
                Sample(
                    id=path.relative_to(root).as_posix(),
                    cwe=normalise_cwe(cwe),
                    label=label,
                    language="c",
                    code=_read_text(path),
                    pair_id=f"rw/{project}/{cve}",
                    split="real-world",
                    source=SECLLMHOLMES_SOURCE,
                    reasoning=_reasoning(cve_dir / f"{stem}.txt"),
                )
            )
    return samples


def _secllmholmes_root(root: Path) -> Path:
    """Accept the `datasets/` folder itself or a clone of the repository that contains it."""
    if (root / "datasets").is_dir():
        return root / "datasets"
    if not root.is_dir():
        raise VulnsteerError(f"SecLLMHolmes folder not found: {root}")
    return root


def load_secllmholmes(root: Path) -> list[Sample]:
    """Read SecLLMHolmes' `datasets/` folder with its upstream layout, as a user's clone has it.

    Splits: `hand-crafted`, `augmented-trivial` (A1..A7), `augmented-nontrivial` (A1..A6, `_0` before and
    `_1` after the misleading edit) and `real-world`. A sample's id is its path under `datasets/`, so the
    augmentation is readable from it (see `augmentation_group` and `augmentation_id`). Pair ids:
    `hc/<CWE>/<N>`, `triv/<A>/<CWE>/<N>`, `nt/<A>/<A_v>/<CWE>/<N>`, `rw/<project>/<CVE>`.
    """
    root = _secllmholmes_root(Path(root))
    hand = root / "hand-crafted"
    samples = _synthetic_samples(root, hand / "dataset", hand / "ground-truth", "hand-crafted", "hc")
    for aug in sorted(p for p in (root / "augmented" / "trivial").glob("A*") if p.is_dir()):
        samples += _synthetic_samples(
            root, aug / "dataset", aug / "ground_truth", "augmented-trivial", f"triv/{aug.name}"
        )
    for variant in sorted(p for p in (root / "augmented" / "non-trivial").glob("A*/A*_*") if p.is_dir()):
        samples += _synthetic_samples(
            root,
            variant / "dataset",
            variant / "ground-truth",
            "augmented-nontrivial",
            f"nt/{variant.parent.name}/{variant.name}",
        )
    samples += _real_world_samples(root)
    if not samples:
        raise VulnsteerError(
            f"no SecLLMHolmes code files under {root} "
            "(expected hand-crafted/, augmented/ or real-world/ with the upstream layout)"
        )
    return samples


def augmentation_id(sample: Sample) -> str | None:
    """The augmentation a SecLLMHolmes file went through: `A3` (trivial), `A3_0`/`A3_1` (non-trivial,
    before/after the misleading edit), or None for originals and other datasets."""
    if sample.source != SECLLMHOLMES_SOURCE:
        return None
    parts = sample.id.split("/")
    if sample.split == "augmented-trivial":
        return parts[2]
    if sample.split == "augmented-nontrivial":
        return parts[3]
    return None


def augmentation_group(sample: Sample) -> str | None:
    """A key shared by a SecLLMHolmes file and its augmented versions, so a sweep can compare verdicts.

    * hand-crafted `CWE-X/<stem>` and every trivial `A1..A7/.../CWE-X/<stem>` share `hc/CWE-X/<stem>`
      (the original vs each semantics-preserving edit);
    * non-trivial `A*_0` and `A*_1` copies of one file share `nt/<A>/CWE-X/<stem>` (before vs after);
    * `stem` keeps the `p_` prefix, so a vulnerable file and its patched twin are in different groups.

    Real-world files and other datasets have no augmentations: None.
    """
    if sample.source != SECLLMHOLMES_SOURCE or sample.split == "real-world":
        return None
    parts = sample.id.split("/")
    cwe_dir, stem = parts[-2], PurePosixPath(parts[-1]).stem
    if sample.split == "augmented-nontrivial":
        return f"nt/{parts[2]}/{cwe_dir}/{stem}"
    return f"hc/{cwe_dir}/{stem}"


# --- JSONL -----------------------------------------------------------------------------------

_REQUIRED_FIELDS = ("id", "cwe", "label", "language", "code")


def _json_objects(text: str, name: str):
    """(where, object) for each non-blank line; a line that is not a JSON object is an error naming it."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VulnsteerError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise VulnsteerError(f"{where}: expected a JSON object")
        yield where, record


def _parse_jsonl(text: str, name: str, default_split: str) -> list[Sample]:
    """Parse the paired JSONL schema; `name` is what error messages call the file."""
    samples = []
    seen: set[str] = set()
    for where, record in _json_objects(text, name):
        missing = [key for key in _REQUIRED_FIELDS if not isinstance(record.get(key), str)]
        if missing:
            raise VulnsteerError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        if record["label"] not in ("vulnerable", "patched"):
            raise VulnsteerError(f"{where}: label must be 'vulnerable' or 'patched', not {record['label']!r}")
        if not record["code"].strip():
            raise VulnsteerError(f"{where}: code is empty")
        if record["id"] in seen:
            raise VulnsteerError(f"{where}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        meta = record.get("meta") or {}
        try:
            cwe = normalise_cwe(record.get("target_cwe") or record["cwe"])
        except VulnsteerError as exc:
            raise VulnsteerError(f"{where}: {exc}") from None
        samples.append(
            Sample(
                id=record["id"],
                cwe=cwe,
                label=record["label"],
                language=record["language"],
                code=record["code"],
                pair_id=record.get("pair_id") or record["id"],
                split=str(meta.get("split") or default_split),
                source=str(record.get("source") or default_split),
                reasoning=record.get("reasoning"),
            )
        )
    if not samples:
        raise VulnsteerError(f"no samples in {name}")
    return samples


def load_jsonl(path: Path) -> list[Sample]:
    """Read the paired JSONL schema (`id, cwe, label, language, code, pair_id, source, target_cwe, meta`).

    `target_cwe` wins over `cwe` so that e.g. CWE-78 data lines up with SecLLMHolmes' CWE-77; the split is
    `meta.split` when given, else the file's stem. Unpaired rows (`pair_id` null) form a pair of one.
    """
    path = Path(path)
    if not path.is_file():
        raise VulnsteerError(f"JSONL file not found: {path}")
    return _parse_jsonl(_read_text(path, "JSONL file"), str(path), path.stem)


def load_demo() -> list[Sample]:
    """The small built-in set (MIT, written for vulnsteer) that lets everything run without downloads."""
    resource = files("vulnsteer") / "demo" / "demo.jsonl"
    return _parse_jsonl(resource.read_text(encoding="utf-8"), "built-in demo.jsonl", "demo")


def load_dataset(spec: str) -> list[Sample]:
    """Load `demo`, a SecLLMHolmes folder (or a clone holding `datasets/`), or a `.jsonl` file."""
    if spec == "demo":
        return load_demo()
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_secllmholmes(path)
    if path.is_file() and path.suffix == ".jsonl":
        return load_jsonl(path)
    if not path.exists():
        raise VulnsteerError(f"dataset not found: {spec} (expected 'demo', a SecLLMHolmes folder or a .jsonl file)")
    raise VulnsteerError(f"unsupported dataset: {spec} (expected 'demo', a SecLLMHolmes folder or a .jsonl file)")


# --- Filtering -------------------------------------------------------------------------------


def filter_samples(
    samples: list[Sample],
    splits: list[str] | None = None,
    cwes: list[str] | None = None,
    limit: int | None = None,
    max_chars: int | None = None,
    pairs_per_cwe: int | None = None,
) -> list[Sample]:
    """Keep the chosen splits and CWEs (None keeps all), pairs whose code is at most `max_chars` long, the first
    `pairs_per_cwe` pairs of each CWE, then at most about `limit` samples.

    `limit` never breaks a pair, because paired metrics need both twins: samples are grouped by
    `pair_id` (groups in order of first appearance, members in input order) and whole groups are taken
    until at least `limit` samples are in, so the result can exceed `limit` by less than one group
    (`limit=1` gives one full pair).
    """
    known = {s.cwe for s in samples}
    if splits is not None:
        available = sorted({s.split for s in samples})
        unknown = [s for s in splits if s not in available]
        if unknown:
            raise VulnsteerError(f"unknown split(s) {', '.join(unknown)}; available: {', '.join(available)}")
        samples = [s for s in samples if s.split in splits]
    if cwes is not None:
        wanted = {normalise_cwe(c) for c in cwes}
        unknown = sorted(wanted - known, key=_cwe_number)
        if unknown:
            listed = ", ".join(sorted(known, key=_cwe_number))
            raise VulnsteerError(f"unknown CWE(s) {', '.join(unknown)}; known: {listed}")
        samples = [s for s in samples if s.cwe in wanted]
    if max_chars is not None:
        too_long = {s.pair_id for s in samples if len(s.code) > max_chars}
        samples = [s for s in samples if s.pair_id not in too_long]
    if pairs_per_cwe is not None:
        first: dict[str, list[str]] = {}
        for s in samples:
            pairs = first.setdefault(s.cwe, [])
            if s.pair_id not in pairs and len(pairs) < pairs_per_cwe:
                pairs.append(s.pair_id)
        samples = [s for s in samples if s.pair_id in first[s.cwe]]
    if limit is not None:
        if limit < 1:
            raise VulnsteerError(f"limit must be at least 1, not {limit}")
        groups: dict[str, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(sample.pair_id, []).append(sample)
        kept: list[Sample] = []
        for group in groups.values():
            if len(kept) >= limit:
                break
            kept += group
        samples = kept
    if not samples:
        raise VulnsteerError("no samples left after filtering")
    return samples


def _cwe_number(cwe: str) -> int:
    return int(normalise_cwe(cwe).removeprefix("CWE-"))


# --- Downloads -------------------------------------------------------------------------------

# The full 40-hex id of SecLLMHolmes' 9421928 could not be looked up offline; GitHub resolves the short id,
# and the tree hash below pins the content whatever the archive's bytes.
SECLLMHOLMES_COMMIT = "9421928"
SECLLMHOLMES_URL = f"https://codeload.github.com/ai4cloudops/SecLLMHolmes/tar.gz/{SECLLMHOLMES_COMMIT}"
# Files the tree hash covers, relative to `datasets/`: everything the loader and the prompts read.
# Upstream's `embeddings/` folders, `real-world/` and stray `.DS_Store` files are not covered.
SECLLMHOLMES_TREE_GLOBS = (
    "hand-crafted/dataset/*/*",
    "hand-crafted/ground-truth/*/*",
    "augmented/trivial/*/dataset/*/*",
    "augmented/trivial/*/ground_truth/*/*",
    "augmented/non-trivial/*/*/dataset/*/*",
    "augmented/non-trivial/*/*/ground-truth/*/*",
    "few-shot/examples/*",
    "few-shot/reasoning/*",
    "few-shot/step-by-step-reasoning/*",
    "mitre-cwe-definitions.json",
)
SECLLMHOLMES_TREE_SHA256 = "c91bd7c471375ae60d7e0f08af7954098aa87fd3b8b043ba7a149ef4866b06f6"

SVEN_COMMIT = "e8449a0d54a5ae0bbdc6bb236330b8c7ec71df57"
SVEN_URL = f"https://codeload.github.com/eth-sri/sven/tar.gz/{SVEN_COMMIT}"
_SVEN_LANGUAGES = MappingProxyType({".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".C": "cpp"})
_SVEN_FIELDS = ("func_src_before", "func_src_after", "file_name")


def secllmholmes_tree_hash(root: Path) -> str:
    """sha256 over the covered files' sorted relative paths and contents, to pin a download's content."""
    root = _secllmholmes_root(Path(root))
    paths = {
        path
        for pattern in SECLLMHOLMES_TREE_GLOBS
        for path in root.glob(pattern)
        if path.is_file() and not path.name.startswith(".")
    }
    if not paths:
        raise VulnsteerError(f"no SecLLMHolmes files to hash under {root}")
    digest = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in paths):
        digest.update(f"{rel}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as exc:  # URLError is an OSError; ValueError: a malformed URL
        raise VulnsteerError(f"download failed: {url} ({exc})") from None


def _extract(archive: Path, into: Path) -> Path:
    """Unpack a GitHub tarball and return its single top-level folder."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise VulnsteerError(f"cannot unpack {archive.name}: {exc}") from None
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise VulnsteerError(f"unexpected archive layout: {len(tops)} top-level folders")
    return tops[0]


def _check_secllmholmes(datasets: Path) -> None:
    actual = secllmholmes_tree_hash(datasets)
    if actual != SECLLMHOLMES_TREE_SHA256:
        raise VulnsteerError(f"SecLLMHolmes content hash mismatch: expected {SECLLMHOLMES_TREE_SHA256}, got {actual}")


def _sven_pair(record: dict, split: str, file_name: str, index: int) -> list[dict]:
    """One upstream SVEN fix as two rows of our schema, with the ids and metadata of the shared copy."""
    language = _SVEN_LANGUAGES.get(PurePosixPath(record["file_name"]).suffix)
    if language is None:
        raise VulnsteerError(f"SVEN {split}/{file_name} line {index + 1}: unknown language of {record['file_name']}")
    cwe = normalise_cwe(PurePosixPath(file_name).stem)
    base = f"sven:{split}:{PurePosixPath(file_name).stem}:{index}"
    meta = {
        "split": split,
        "func_name": record.get("func_name"),
        "file_name": record["file_name"],
        "commit_link": record.get("commit_link"),
        "description": record.get("description"),
        "upstream_line": index,
    }
    return [
        {
            "id": f"{base}:{tag}",
            "cwe": cwe,
            "label": label,
            "language": language,
            "code": record[key],
            "pair_id": base,
            "source": f"github:eth-sri/sven@{SVEN_COMMIT}:data_train_val/{split}/{file_name}#L{index + 1}",
            "target_cwe": TARGET_CWE.get(cwe, cwe),
            "meta": meta,
        }
        for tag, label, key in (("vul", "vulnerable", "func_src_before"), ("pat", "patched", "func_src_after"))
    ]


def _sven_rows(folder: Path) -> list[dict]:
    """Upstream SVEN (`data_train_val/{train,val}/cwe-NNN.jsonl`, one fix a line with `func_src_before`
    and `func_src_after`) in our paired schema."""
    rows = []
    for split in ("train", "val"):
        paths = sorted((folder / split).glob("cwe-*.jsonl"))
        if not paths:
            raise VulnsteerError(f"SVEN archive has no data_train_val/{split}/cwe-*.jsonl")
        for path in paths:
            for index, (where, record) in enumerate(
                _json_objects(_read_text(path, "SVEN file"), f"SVEN {split}/{path.name}")
            ):
                if any(not isinstance(record.get(k), str) for k in _SVEN_FIELDS):
                    raise VulnsteerError(f"{where}: needs string fields {', '.join(_SVEN_FIELDS)}")
                rows += _sven_pair(record, split, path.name, index)
    return rows


def fetch_dataset(name: str, dest: Path, url: str | None = None) -> Path:
    """Download a pinned dataset into `dest` and return what `load_dataset` takes.

    * `secllmholmes`: the repository at commit 9421928, kept as `dest/SecLLMHolmes`; returns its
      `datasets/` folder. Verified by `secllmholmes_tree_hash` (hand-crafted, augmented, few-shot and the
      CWE definitions; not real-world), because the archive's own sha256 could not be computed offline.
      An existing copy is re-verified instead of downloaded again.
    * `sven`: eth-sri/sven at e8449a0, `data_train_val/` converted to `dest/sven.jsonl`. Only the format is
      checked, not the content: no hash of upstream's files was computable offline, and the shared copy
      this converter was checked against leaves out a few upstream lines by a rule we could not recover,
      so a download may hold slightly more pairs than the 795 of that copy.

    `url` replaces the pinned address (a mirror, or a file:// URL in tests).
    """
    if name not in ("secllmholmes", "sven"):
        raise VulnsteerError(f"unknown dataset to fetch: {name!r} (choose secllmholmes or sven)")
    dest = Path(dest)
    target = dest / ("SecLLMHolmes" if name == "secllmholmes" else "sven.jsonl")
    if target.exists():
        if name == "secllmholmes":
            _check_secllmholmes(target / "datasets")
            return target / "datasets"
        return target
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VulnsteerError(f"cannot create {dest}: {exc.strerror}") from None
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        _download(url or (SECLLMHOLMES_URL if name == "secllmholmes" else SVEN_URL), archive)
        top = _extract(archive, Path(tmp) / "unpacked")
        if name == "secllmholmes":
            _check_secllmholmes(top / "datasets")
            top.rename(target)
            return target / "datasets"
        rows = _sven_rows(top / "data_train_val")
        lines = (json.dumps(row, ensure_ascii=False) for row in rows)
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return target


def family(sample: Sample) -> str:
    """The group of files that must stay on one side of a train/test split: a pair, plus, for SecLLMHolmes,
    every augmented copy of that pair's hand-crafted scenario (`hc/CWE-X/N`), since those are near-duplicates, and
    for Juliet every case that differs from it only in its data source (`juliet_family`)."""
    return family_of(sample.source, sample.split, sample.id, sample.pair_id)


# Juliet test cases that differ only in where the tainted data comes from share their flaw and sink code: one family.
_JULIET_SOURCES = re.compile(
    r"(^|_)(?:connect_socket|listen_socket|connect_tcp|listen_tcp|fgets|fscanf|rand|random|large|negative|zero|max|"
    r"min|environment|Environment|file|File|console|console_readLine|readLine|PropertiesFile|Property|"
    r"URLConnection|database|getCookies_Servlet|getParameter_Servlet|getQueryString_Servlet|nextInt|parseInt)"
    r"(?=_|$)"
)


def juliet_family(pair_id: str) -> str:
    """`juliet-c:CWE190_Integer_Overflow__int_fgets_add_01` and its `_fscanf_`, `_rand_`... siblings share
    `juliet-c:CWE190_Integer_Overflow__int_*_add`."""
    prefix, _, case = pair_id.partition(":")
    head, _, variant = case.partition("__")
    variant = re.sub(r"_\d+$", "", variant)  # the flow variant
    return f"{prefix}:{head}__{_JULIET_SOURCES.sub(lambda m: m.group(1) + '*', variant)}"


def family_of(source: str, split: str, sample_id: str, pair_id: str) -> str:
    """`family` from a sample's fields (result rows carry them, not the sample)."""
    if pair_id.startswith(("juliet-c:", "juliet-java:")):
        return juliet_family(pair_id)
    if source != SECLLMHOLMES_SOURCE or split == "real-world":
        return pair_id
    parts = sample_id.split("/")
    return f"hc/{parts[-2]}/{PurePosixPath(parts[-1]).stem.removeprefix('p_')}"
