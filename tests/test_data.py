"""Loaders, filters and downloads in vulnsteer.data, checked against the shared datasets when present."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from vulnsteer import data
from vulnsteer.cwes import CWES, normalise_cwe
from vulnsteer.data import (
    Sample,
    augmentation_group,
    augmentation_id,
    fetch_dataset,
    filter_samples,
    load_dataset,
    load_demo,
    load_jsonl,
    load_secllmholmes,
    secllmholmes_tree_hash,
)
from vulnsteer.errors import VulnsteerError

SHARED = Path(__file__).parents[2] / "shared" / "datasets"
HOLMES = SHARED / "secllmholmes"
needs_shared = pytest.mark.skipif(not HOLMES.is_dir(), reason="shared datasets not present")


def _expected_index() -> list[dict]:
    return [json.loads(line) for line in (HOLMES / "expected_index.jsonl").read_text().splitlines()]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _sample(id_: str, pair_id: str, label: str = "vulnerable", cwe: str = "CWE-79", split: str = "s") -> Sample:
    return Sample(id_, cwe, label, "c", "int x;", pair_id, split, "test")  # type: ignore[arg-type]


# --- SecLLMHolmes ----------------------------------------------------------------------------


@needs_shared
def test_secllmholmes_matches_expected_index() -> None:
    samples = {s.id: s for s in load_secllmholmes(HOLMES)}
    index = _expected_index()
    assert len(samples) == len(index) == 264
    for row in index:
        sample = samples[row["path"]]
        got = (sample.cwe, sample.split, sample.label, sample.language, sample.pair_id, sample.source)
        assert got == (row["cwe"], row["split"], row["label"], row["language"], row["pair_id"], "secllmholmes")
        assert sample.code.strip()
        assert sample.reasoning == (HOLMES / row["gt_path"]).read_text().strip()


@needs_shared
def test_secllmholmes_augmentation_helpers_match_index() -> None:
    samples = {s.id: s for s in load_secllmholmes(HOLMES)}
    for row in _expected_index():
        sample = samples[row["path"]]
        aug = augmentation_id(sample)
        group = augmentation_group(sample)
        if row["split"] == "hand-crafted":
            assert aug is None
        if row["split"] == "augmented-trivial":
            assert aug == row["augmentation"]
        if row["split"] == "augmented-nontrivial":
            assert aug == row["augmentation"] + {"before": "_0", "after": "_1"}[row["aug_variant"]]
            assert group == row["aug_pair_id"]
        else:
            stem = Path(row["path"]).stem
            assert group == f"{row['scenario'].rsplit('/', 1)[0]}/{stem}"
    groups = defaultdict(list)
    for sample in samples.values():
        groups[augmentation_group(sample)].append(sample)
    # a trivial group: the hand-crafted original plus its seven edits, all with the same label
    trivial = groups["hc/CWE-787/1"]
    assert Counter(s.split for s in trivial) == {"hand-crafted": 1, "augmented-trivial": 7}
    assert {s.label for s in trivial} == {"vulnerable"}
    assert all(
        Counter(augmentation_id(s)[-2:] for s in g) == {"_0": 1, "_1": 1}
        for k, g in groups.items()
        if k.startswith("nt/")
    )


@needs_shared
def test_secllmholmes_hand_crafted_pairs_complete() -> None:
    by_pair = defaultdict(list)
    for sample in load_secllmholmes(HOLMES):
        if sample.split == "hand-crafted":
            by_pair[sample.pair_id].append(sample.label)
    assert len(by_pair) == 24
    assert all(sorted(labels) == ["patched", "vulnerable"] for labels in by_pair.values())
    assert {key.split("/")[1] for key in by_pair} == set(CWES)


@needs_shared
def test_secllmholmes_accepts_repo_clone_layout(tmp_path: Path) -> None:
    (tmp_path / "datasets").symlink_to(HOLMES)
    assert [s.id for s in load_secllmholmes(tmp_path)] == [s.id for s in load_secllmholmes(HOLMES)]


def _fake_real_world(root: Path, details: dict | None) -> None:
    cve = root / "datasets" / "real-world" / "libfoo" / "CVE-2023-0001"
    _write(cve / "vuln.c", "int f(char *p) { return *p; }\n")
    _write(cve / "patch.c", "int f(char *p) { return p ? *p : 0; }\n")
    _write(cve / "vuln.txt", "p may be NULL.\n")
    _write(cve / "vuln", "embedding, not code")
    if details is not None:
        _write(root / "datasets" / "real-world" / "cve_details.json", json.dumps(details))


def test_secllmholmes_real_world(tmp_path: Path) -> None:
    _fake_real_world(tmp_path, {"libfoo": {"CVE-2023-0001": {"cwe": "cwe-476", "file_path": "src/f.c"}}})
    vuln, patch = load_secllmholmes(tmp_path)
    assert (vuln.id, vuln.label, vuln.cwe, vuln.split, vuln.pair_id, vuln.language) == (
        "real-world/libfoo/CVE-2023-0001/vuln.c",
        "vulnerable",
        "CWE-476",
        "real-world",
        "rw/libfoo/CVE-2023-0001",
        "c",
    )
    assert (patch.label, patch.pair_id, patch.reasoning) == ("patched", vuln.pair_id, None)
    assert vuln.reasoning == "p may be NULL."
    assert augmentation_group(vuln) is None and augmentation_id(vuln) is None


def test_secllmholmes_real_world_needs_cwe(tmp_path: Path) -> None:
    _fake_real_world(tmp_path, None)
    with pytest.raises(VulnsteerError, match="cve_details.json"):
        load_secllmholmes(tmp_path)


def test_secllmholmes_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(VulnsteerError, match="no SecLLMHolmes code files"):
        load_secllmholmes(tmp_path)
    with pytest.raises(VulnsteerError, match="not found"):
        load_secllmholmes(tmp_path / "absent")


@pytest.mark.parametrize(("content", "message"), [(b"\xff\xfeint x;", "not valid UTF-8"), (b"  \n", "empty")])
def test_secllmholmes_bad_code_file(tmp_path: Path, content: bytes, message: str) -> None:
    bad = _write(tmp_path / "hand-crafted" / "dataset" / "CWE-22" / "1.c", content)
    with pytest.raises(VulnsteerError, match=message) as err:
        load_secllmholmes(tmp_path)
    assert str(bad) in str(err.value)


# --- JSONL -----------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", ["sven", "juliet", "castle"])
def test_load_jsonl_shared(name: str) -> None:
    path = SHARED / name / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = load_jsonl(path)
    assert len(samples) == len(rows)
    for row, sample in zip(rows, samples):
        assert sample.id == row["id"] and sample.code == row["code"] and sample.label == row["label"]
        assert sample.cwe == row["target_cwe"] and sample.cwe in CWES
        assert sample.pair_id == (row["pair_id"] or row["id"])
        assert sample.split == row["meta"].get("split", name)
    pairs = Counter(s.pair_id for s in samples)
    if name == "castle":
        assert set(pairs.values()) == {1}
    else:
        assert all(Counter(s.label for s in samples if s.pair_id == p)["vulnerable"] == 1 for p in list(pairs)[:50])


def test_load_jsonl_fields(tmp_path: Path) -> None:
    row = {
        "id": "a",
        "cwe": "cwe-078",
        "label": "patched",
        "language": "python",
        "code": "x = 1",
        "pair_id": None,
        "source": "mine",
        "reasoning": "why",
    }
    (sample,) = load_jsonl(_write(tmp_path / "extra.jsonl", json.dumps(row) + "\n\n"))
    assert (sample.cwe, sample.split, sample.pair_id, sample.source, sample.reasoning) == (
        "CWE-78",
        "extra",
        "a",
        "mine",
        "why",
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "a", "cwe": "CWE-79", "label": "vulnerable", "language": "c"}', "code"),
        ('{"id": "a", "cwe": "CWE-79", "label": "maybe", "language": "c", "code": "x"}', "label"),
        ('{"id": "a", "cwe": "XSS", "label": "patched", "language": "c", "code": "x"}', "not a CWE"),
    ],
)
def test_load_jsonl_malformed_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"id": "ok", "cwe": "CWE-79", "label": "vulnerable", "language": "c", "code": "x"}'
    path = _write(tmp_path / "bad.jsonl", f"{good}\n{line}\n")
    with pytest.raises(VulnsteerError, match=message) as err:
        load_jsonl(path)
    assert f"{path} line 2" in str(err.value)


def test_load_jsonl_bad_files(tmp_path: Path) -> None:
    with pytest.raises(VulnsteerError, match="not valid UTF-8"):
        load_jsonl(_write(tmp_path / "latin.jsonl", b'{"id": "\xe9"}\n'))
    with pytest.raises(VulnsteerError, match="empty"):
        load_jsonl(_write(tmp_path / "empty.jsonl", ""))
    row = '{"id": "a", "cwe": "CWE-79", "label": "vulnerable", "language": "c", "code": "x"}\n'
    with pytest.raises(VulnsteerError, match="duplicate id"):
        load_jsonl(_write(tmp_path / "dup.jsonl", row * 2))


@pytest.mark.parametrize(
    ("raw", "expected"), [("cwe-79", "CWE-79"), ("79", "CWE-79"), ("CWE-079", "CWE-79"), (" CWE_787 ", "CWE-787")]
)
def test_normalise_cwe(raw: str, expected: str) -> None:
    assert normalise_cwe(raw) == expected


def test_normalise_cwe_rejects_garbage() -> None:
    with pytest.raises(VulnsteerError, match="not a CWE"):
        normalise_cwe("SQL injection")


# --- Demo ------------------------------------------------------------------------------------


def test_demo_set() -> None:
    samples = load_demo()
    by_pair = defaultdict(list)
    for sample in samples:
        by_pair[sample.pair_id].append(sample)
        assert sample.split == "demo" and sample.source == "vulnsteer-demo" and sample.reasoning
        assert 10 <= sample.code.count("\n") <= 40
        assert not re.search(r"vuln|safe|fix|bad|good", sample.code, re.IGNORECASE), sample.id
    assert all(sorted(s.label for s in pair) == ["patched", "vulnerable"] for pair in by_pair.values())
    assert all(pair[0].code != pair[1].code and pair[0].cwe == pair[1].cwe for pair in by_pair.values())
    per_cwe = Counter(pair[0].cwe for pair in by_pair.values())
    assert set(per_cwe) == set(CWES) and min(per_cwe.values()) >= 2
    assert {s.language for s in samples if s.cwe in ("CWE-190", "CWE-416", "CWE-476", "CWE-787")} == {"c"}


# --- load_dataset / filter_samples -----------------------------------------------------------


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("demo") == load_demo()
    row = '{"id": "a", "cwe": "CWE-79", "label": "vulnerable", "language": "c", "code": "x"}\n'
    assert load_dataset(str(_write(tmp_path / "one.jsonl", row)))[0].id == "a"
    _write(tmp_path / "set" / "hand-crafted" / "dataset" / "CWE-89" / "1.py", "q = 1\n")
    assert load_dataset(str(tmp_path / "set"))[0].pair_id == "hc/CWE-89/1"
    with pytest.raises(VulnsteerError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(VulnsteerError, match="unsupported"):
        load_dataset(str(_write(tmp_path / "data.csv", "a,b\n")))


def test_filter_splits_and_cwes() -> None:
    samples = [_sample("1", "p1", cwe="CWE-79", split="a"), _sample("2", "p2", cwe="CWE-89", split="b")]
    assert filter_samples(samples, None, None, None) == samples
    assert filter_samples(samples, ["b"], None, None) == samples[1:]
    assert filter_samples(samples, None, ["89"], None) == samples[1:]
    with pytest.raises(VulnsteerError, match="unknown CWE.*CWE-22.*known: CWE-79, CWE-89"):
        filter_samples(samples, None, ["cwe-22"], None)
    with pytest.raises(VulnsteerError, match="unknown split.*c; available: a, b"):
        filter_samples(samples, ["c"], None, None)
    with pytest.raises(VulnsteerError, match="no samples left"):
        filter_samples(samples, ["a"], ["CWE-89"], None)
    with pytest.raises(VulnsteerError, match="limit"):
        filter_samples(samples, None, None, 0)


def test_filter_limit_keeps_pairs_whole() -> None:
    samples = [
        _sample("a1", "A"),
        _sample("b1", "B"),
        _sample("a2", "A", "patched"),
        _sample("c1", "C"),
        _sample("b2", "B", "patched"),
    ]
    assert [s.id for s in filter_samples(samples, None, None, 1)] == ["a1", "a2"]
    assert [s.id for s in filter_samples(samples, None, None, 3)] == ["a1", "a2", "b1", "b2"]
    assert [s.id for s in filter_samples(samples, None, None, 4)] == ["a1", "a2", "b1", "b2"]
    assert len(filter_samples(samples, None, None, 100)) == 5


@needs_shared
def test_filter_limit_on_secllmholmes_keeps_pairs() -> None:
    kept = filter_samples(load_secllmholmes(HOLMES), ["hand-crafted"], ["CWE-787", "CWE-22"], 5)
    assert len(kept) == 6
    assert all(count == 2 for count in Counter(s.pair_id for s in kept).values())


# --- Downloads -------------------------------------------------------------------------------


@needs_shared
def test_tree_hash_of_shared_copy_is_pinned() -> None:
    assert secllmholmes_tree_hash(HOLMES) == data.SECLLMHOLMES_TREE_SHA256


def _tarball(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path.as_uri()


FAKE_HOLMES = {
    "SecLLMHolmes-9421928/README.md": "repo",
    "SecLLMHolmes-9421928/datasets/hand-crafted/dataset/CWE-22/1.c": "int main(void) { return 0; }\n",
    "SecLLMHolmes-9421928/datasets/hand-crafted/dataset/CWE-22/p_1.c": "int main(void) { return 1; }\n",
    "SecLLMHolmes-9421928/datasets/hand-crafted/ground-truth/CWE-22/1.txt": "reason\n",
    "SecLLMHolmes-9421928/datasets/hand-crafted/embeddings/CWE-22/1": "not hashed",
}


def test_fetch_secllmholmes_verifies_tree_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _tarball(tmp_path / "holmes.tar.gz", FAKE_HOLMES)
    with pytest.raises(VulnsteerError, match="hash mismatch"):
        fetch_dataset("secllmholmes", tmp_path / "out", url=url)
    assert not (tmp_path / "out" / "SecLLMHolmes").exists()

    reference = tmp_path / "reference"
    for name, text in FAKE_HOLMES.items():
        if "/datasets/" in name and "embeddings" not in name:
            _write(reference / name.split("/datasets/")[1], text)
    monkeypatch.setattr(data, "SECLLMHOLMES_TREE_SHA256", secllmholmes_tree_hash(reference))
    datasets = fetch_dataset("secllmholmes", tmp_path / "out", url=url)
    assert datasets == tmp_path / "out" / "SecLLMHolmes" / "datasets"
    assert [s.pair_id for s in load_dataset(str(datasets))] == ["hc/CWE-22/1", "hc/CWE-22/1"]
    assert fetch_dataset("secllmholmes", tmp_path / "out", url="file:///unused") == datasets


def test_fetch_sven_converts_upstream(tmp_path: Path) -> None:
    record = {
        "func_name": "run",
        "func_src_before": "os.system(cmd)",
        "func_src_after": "subprocess.run([cmd])",
        "file_name": "tool/run.py",
        "commit_link": "github.com/x/y/commit/1",
        "vul_type": "cwe-078",
    }
    c_record = dict(record, func_src_before="int f(void);", func_src_after="int f(int);", file_name="a.cc")
    url = _tarball(
        tmp_path / "sven.tar.gz",
        {
            "sven-e8449a0/data_train_val/train/cwe-078.jsonl": json.dumps(record) + "\n" + json.dumps(c_record) + "\n",
            "sven-e8449a0/data_train_val/val/cwe-125.jsonl": json.dumps(dict(c_record, file_name="b.c")) + "\n",
        },
    )
    path = fetch_dataset("sven", tmp_path / "out", url=url)
    samples = load_dataset(str(path))
    assert [(s.id, s.cwe, s.label, s.language, s.split) for s in samples] == [
        ("sven:train:cwe-078:0:vul", "CWE-77", "vulnerable", "python", "train"),
        ("sven:train:cwe-078:0:pat", "CWE-77", "patched", "python", "train"),
        ("sven:train:cwe-078:1:vul", "CWE-77", "vulnerable", "cpp", "train"),
        ("sven:train:cwe-078:1:pat", "CWE-77", "patched", "cpp", "train"),
        ("sven:val:cwe-125:0:vul", "CWE-787", "vulnerable", "c", "val"),
        ("sven:val:cwe-125:0:pat", "CWE-787", "patched", "c", "val"),
    ]
    assert samples[0].code == "os.system(cmd)" and samples[0].pair_id == "sven:train:cwe-078:0"
    converted = json.loads(path.read_text().splitlines()[0])
    if (SHARED / "sven" / "sven.jsonl").is_file():
        shared = json.loads((SHARED / "sven" / "sven.jsonl").read_text().splitlines()[0])
        assert converted.keys() == shared.keys() and converted["meta"].keys() == shared["meta"].keys()
        assert converted["source"].rsplit(":", 1)[0] == shared["source"].rsplit(":", 1)[0]


def test_fetch_errors(tmp_path: Path) -> None:
    with pytest.raises(VulnsteerError, match="download failed"):
        fetch_dataset("secllmholmes", tmp_path, url=(tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(VulnsteerError, match="cannot unpack"):
        fetch_dataset("sven", tmp_path, url=_write(tmp_path / "junk.tar.gz", "junk").as_uri())
    url = _tarball(tmp_path / "empty.tar.gz", {"sven-x/README.md": "no data"})
    with pytest.raises(VulnsteerError, match="no data_train_val/train"):
        fetch_dataset("sven", tmp_path, url=url)
    with pytest.raises(VulnsteerError, match="unknown dataset"):
        fetch_dataset("bigvul", tmp_path)  # type: ignore[arg-type]


def test_max_chars_and_pairs_per_cwe_keep_whole_pairs():
    from vulnsteer.data import filter_samples, load_demo

    demo = load_demo()
    short = filter_samples(demo, None, None, None, max_chars=500)
    assert short and all(len(s.code) <= 500 for s in short)
    assert {s.pair_id for s in short} == {s.pair_id for s in demo} - {s.pair_id for s in demo if len(s.code) > 500}
    one_each = filter_samples(demo, None, None, None, pairs_per_cwe=1)
    assert len({s.pair_id for s in one_each}) == len({s.cwe for s in demo})
    assert all(sum(t.pair_id == s.pair_id for t in one_each) == 2 for s in one_each)


def test_juliet_cases_that_differ_only_in_their_data_source_are_one_family():
    from vulnsteer.data import family_of

    def fam(case):
        return family_of("github:x", "juliet", f"{case}:bad", case)

    assert (
        fam("juliet-c:CWE190_Integer_Overflow__int_fgets_add_01")
        == fam("juliet-c:CWE190_Integer_Overflow__int_rand_add_01")
        == "juliet-c:CWE190_Integer_Overflow__int_*_add"
    )
    assert fam("juliet-c:CWE190_Integer_Overflow__int_fgets_add_01") != fam(
        "juliet-c:CWE190_Integer_Overflow__int_fgets_multiply_01"
    )
    assert fam("juliet-java:CWE78_OS_Command_Injection__Environment_01") == fam(
        "juliet-java:CWE78_OS_Command_Injection__getParameter_Servlet_01"
    )
    assert family_of("sven", "train", "a", "7") == "7"  # other datasets: the pair


@pytest.mark.skipif(not (SHARED / "juliet" / "juliet.jsonl").exists(), reason="needs ../shared/datasets/juliet")
def test_juliet_folds_keep_source_variants_together():
    from vulnsteer.data import family
    from vulnsteer.protocol import pair_folds

    samples = [s for s in load_dataset(str(SHARED / "juliet" / "juliet.jsonl")) if s.cwe == "CWE-190"]
    for train, test in pair_folds(samples, k=4):
        assert {family(samples[i]) for i in train}.isdisjoint({family(samples[i]) for i in test})
