"""Families across sources (issue 29): near-duplicate code is one family wherever folds are grouped and held-out-ness
is checked; overlap between training and test data is refused with its count or dropped (--drop-overlap) and
reported; folds are stratified by families, not items."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vulnsteer.data import Sample, load_demo
from vulnsteer.errors import VulnsteerError
from vulnsteer.neardup import jaccard
from vulnsteer.protocol import families, held_out, leak_keys, overlapping, pair_folds, training_keys

COPY = """
static int read_record(const char *path, char *out, size_t size) {
    FILE *f = fopen(path, "r");
    char line[256];
    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "key=", 4) == 0) {
            strcpy(out, line + 4);
            break;
        }
    }
    fclose(f);
    return 0;
}
"""
# The same function renamed, re-wrapped, with other constants and one more call: what an augmented copy or a second
# dataset holds (shingle-set Jaccard 0.86 with COPY, checked below).
NEAR = """static int read_record(const char *file_name, char *dest, size_t n)
{ FILE *fp = fopen(file_name, "r"); char buf[1024]; memset(dest, 0, n);
  if (fp == NULL) { return -2; }
  while (fgets(buf, sizeof(buf), fp) != NULL) { if (strncmp(buf, "name=", 5) == 0) { strcpy(dest, buf + 5); break; } }
  fclose(fp); return 0; }
"""
OTHER = """
def login(request, db):
    user = request.form["user"]
    rows = db.execute("SELECT * FROM users WHERE name = '%s'" % user).fetchall()
    if not rows:
        raise PermissionError(user)
    return render_template("home.html", user=rows[0])
"""


def item(id_: str, code: str, source: str, cwe: str = "CWE-787", label: str = "vulnerable") -> Sample:
    return Sample(id=id_, cwe=cwe, label=label, language="c", code=code, pair_id=id_, split="x", source=source)


def test_near_duplicates_across_sources_are_one_family_and_never_held_out():
    """Renamed variables, re-wrapped lines and changed constants under another source and pair id: one family, so
    one fold, and a bank fitted on the copy does not count the original as held out."""
    assert 0.8 <= jaccard(COPY, NEAR) < 1
    original, copy = item("a/1", COPY, "dataset-a"), item("b/9", NEAR, "dataset-b")
    others = [item(f"o/{n}", f"int f{n}(void) {{ return g{n}(h{n}({n})); }}", "dataset-c") for n in range(4)]
    samples = [original, copy, *others]
    assert families(samples)[0] == families(samples)[1]
    for _, test in pair_folds(samples, 3):
        assert (0 in test) == (1 in test)
    assert overlapping([original], set(training_keys([copy]))) == [original]
    with pytest.raises(VulnsteerError, match="^1 of the 1 test items"):
        held_out([original], {s.id for s in overlapping([original], set(training_keys([copy])))}, False, "b")


def test_dissimilar_code_is_not_merged():
    samples = [item("a/1", COPY, "dataset-a"), item("b/1", OTHER, "dataset-b"), *load_demo()]
    assert len(set(families(samples))) == 2 + len({s.pair_id for s in load_demo()})
    assert not set(leak_keys(samples[0])) & set(leak_keys(samples[1]))


def test_leak_keys_are_deterministic_and_ignore_white_space():
    assert leak_keys(item("a", COPY, "s")) == leak_keys(item("a", "\n\n" + COPY.replace("\n", "\n\n"), "s"))


def test_folds_are_stratified_by_families_not_items():
    """Each CWE's families are dealt evenly over the folds (counts differ by at most one), however many items a
    family holds (here a family of one pair and families of ten near-copies)."""
    samples = []
    for c, cwe in enumerate(("CWE-79", "CWE-89", "CWE-787")):
        for n in range(7):
            copies = 10 if n % 3 == 0 else 2
            samples += [
                Sample(
                    id=f"{cwe}/{n}/{k}",
                    cwe=cwe,
                    label=("vulnerable", "patched")[k % 2],
                    language="c",
                    code=f"c{c}_{n}(x);",
                    pair_id=f"{cwe}/{n}/{k // 2}",
                    split="x",
                    source="s",
                )
                for k in range(copies)
            ]
    for k in (2, 3, 4):
        folds = pair_folds(samples, k, seed=1)
        groups = families(samples)
        for cwe in ("CWE-79", "CWE-89", "CWE-787"):
            per_fold = [len({groups[i] for i in test if samples[i].cwe == cwe}) for _, test in folds]
            assert max(per_fold) - min(per_fold) <= 1, (k, cwe, per_fold)
        assert Counter(i for _, test in folds for i in test) == Counter(range(len(samples)))


def overlapping_train_set(tmp_path) -> str:
    """The demo's first two pairs renamed and re-wrapped under another source, plus two pairs the test set lacks."""
    import json
    from dataclasses import asdict

    demo = load_demo()
    rows = [
        {
            **asdict(s),
            "id": f"copy-{s.id}",
            "pair_id": f"copy-{s.pair_id}",
            "source": "elsewhere",
            "code": s.code.replace("\n", "\n\n").replace("buf", "buffer_"),
        }
        for s in demo[:4]
    ]
    rows += [{**asdict(s), "source": "elsewhere"} for s in demo[8:12]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "reasoning"}) + "\n" for r in rows))
    return str(path)


def test_sweep_refuses_overlap_with_its_count_or_drops_it_and_the_report_says_so(tmp_path, capsys):
    from conftest import run_cli

    from vulnsteer.experiments.sweep import SweepConfig
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    train = overlapping_train_set(tmp_path)
    args = [
        "sweep",
        "--dataset",
        "demo",
        "--limit",
        "8",
        "--train-dataset",
        train,
        "--folds",
        "2",
        "--layers",
        "1",
        "--strengths",
        "1",
        "--mode",
        "score",
        "--no-transfer",
        "-o",
        str(tmp_path / "refused"),
    ]
    code, out, err = run_cli(args, capsys)
    errors = err.strip().splitlines()
    assert code == 1 and len(errors) == 1 and "4 of the 8 test items" in errors[0] and "--drop-overlap" in errors[0]
    config = SweepConfig(
        dataset="demo",
        limit=8,
        train_dataset=train,
        drop_overlap=True,
        folds=2,
        layers=["1"],
        strengths=[1.0],
        mode="score",
        transfer=False,
        vectors=["pooled"],
    )
    report = run_sweep(config, tmp_path / "dropped", lm=random_model("llama")).report.html
    text = report.with_suffix(".md").read_text()
    assert "dropped 4 of 8 test items (whole families)" in text and "dropped 4" in report.read_text()
    rows = tmp_path / "dropped" / "rows.jsonl"
    assert {json.loads(line)["sample_id"] for line in rows.read_text().splitlines()} == {s.id for s in load_demo()[4:8]}
