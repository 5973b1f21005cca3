"""Data sources: every spec form yields exactly the documents it names."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data.sources import iter_documents, iter_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_txt_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first paragraph\n\nsecond paragraph é\n", encoding="utf-8")
    assert list(iter_documents(str(f))) == ["first paragraph\n\nsecond paragraph é\n"]


def test_jsonl_text_field_and_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one", "x": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    assert list(iter_documents(str(f))) == ["one", "two"]
    _write_jsonl(tmp_path / "q.jsonl", [{"question": "q1"}, {"question": "q2"}])
    assert list(iter_documents(str(tmp_path / "q.jsonl"), text_field="question")) == ["q1", "q2"]


def test_jsonl_gz(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write('{"text": "zipped"}\n')
    assert list(iter_documents(str(f))) == ["zipped"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken\n', encoding="utf-8")
    it = iter_documents(str(f))
    assert next(it) == "ok" and next(it) == "ok2"
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        next(it)


def test_jsonl_missing_field_names_field(tmp_path):
    f = tmp_path / "m.jsonl"
    _write_jsonl(f, [{"text": "a"}, {"body": "b"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: no field 'text'.*body"):
        list(iter_documents(str(f)))


def test_parquet_streams_row_groups(tmp_path):
    f = tmp_path / "d.parquet"
    texts = [f"doc {i}" for i in range(2500)]
    pq.write_table(pa.table({"content": texts, "id": list(range(2500))}), f, row_group_size=1000)
    assert pq.ParquetFile(f).num_row_groups == 3
    assert list(iter_documents(str(f), text_field="content")) == texts
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text'"):
        list(iter_documents(str(f)))


def test_folder_is_recursive_sorted_and_mixed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    _write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "c1"}, {"text": "c2"}])
    (tmp_path / "notes.csv").write_text("ignored: not a data file", encoding="utf-8")
    assert list(iter_documents(str(tmp_path))) == ["ay", "bee", "c1", "c2"]


def test_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("x1.txt", "x2.txt", "y.txt", "sub/x3.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert list(iter_documents(str(tmp_path / "x*.txt"))) == ["x1.txt", "x2.txt"]
    assert list(iter_documents(str(tmp_path / "**" / "x*.txt"))) == ["sub/x3.txt", "x1.txt", "x2.txt"]


def test_bad_specs_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        iter_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"matches no supported files"):
        iter_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported file type"):
        list(iter_documents(str(tmp_path / "x.csv")))
    with pytest.raises(ValueError, match=r"unknown built-in corpus 'arithmetic'; choose one of builtin:arith"):
        iter_documents("builtin:arithmetic?k=3")
    with pytest.raises(ValueError, match=r"unknown parameter.*'k'"):
        iter_documents("builtin:arith?k=3")


def test_builtin_corpus_is_seeded_and_takes_its_knobs():
    docs = list(iter_documents("builtin:arith?n=5&seed=3"))
    again = list(iter_documents("builtin:arith?n=5&seed=3"))
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)
    assert docs == again  # same seed, same corpus
    mixed = list(iter_documents("builtin:arith?n=60&seed=1&chat=0.5"))
    assert any(d.startswith("User: ") for d in mixed) and any(d.startswith("Q: ") for d in mixed)
    with pytest.raises(ValueError, match=r"unknown parameter.*'temp'.*known: n, seed, chat, tagged"):
        iter_documents("builtin:arith?temp=1")


def test_code_files_by_folder_and_glob_gz_too(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def a():\n    return 1\n", encoding="utf-8")
    (tmp_path / "pkg" / "b.rs").write_text("fn b() {}\n", encoding="utf-8")
    with gzip.open(tmp_path / "pkg" / "c.py.gz", "wt", encoding="utf-8") as g:
        g.write("C = 3\n")
    (tmp_path / "pkg" / "a.pyc").write_bytes(b"\x00\xff")  # not a source file: never read
    assert list(iter_documents(str(tmp_path))) == ["def a():\n    return 1\n", "fn b() {}\n", "C = 3\n"]
    assert list(iter_documents(str(tmp_path / "**" / "*.py*"))) == ["def a():\n    return 1\n", "C = 3\n"]
    assert [src for src, _ in iter_records(str(tmp_path / "pkg" / "a.py"))] == [str(tmp_path / "pkg" / "a.py")]


def test_bad_file_is_skipped_and_named_unless_strict(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    skipped = []
    assert list(iter_documents(str(tmp_path), skipped=skipped)) == ["x = 1\n"]
    assert [(p.rsplit("/", 1)[-1], why.split(" (")[0]) for p, why in skipped] == [
        ("broken.txt.gz", "cannot be read"), ("latin1.py", "not valid UTF-8")]
    with pytest.raises(ValueError, match=r"broken\.txt\.gz: cannot be read \(BadGzipFile"):
        list(iter_documents(str(tmp_path), strict=True))
    # a corpus in which nothing could be read is an error naming the first bad file
    with pytest.raises(ValueError, match=r"latin1\.py: not valid UTF-8"):
        list(iter_documents(str(tmp_path / "latin1.py")))


def test_builtin_stdlib_is_split_by_file_and_seeded():
    from nanoseek.data import stdlib

    train, val, every = (stdlib.files(split=s) for s in ("train", "validation", "all"))
    assert len(val) == round(len(every) * 0.05) and len(train) + len(val) == len(every) > 500
    assert not set(train) & set(val)  # disjoint by file
    assert every != sorted(every)  # a seeded order, not the alphabetical one
    assert stdlib.files(seed=1, split="validation") != val and stdlib.files(split="validation") == val
    assert not any("site-packages" in str(p) for p in every)
    recs = list(iter_records("builtin:stdlib?split=validation&n=3"))
    assert [src for src, _ in recs] == [str(p) for p in val[:3]]
    assert recs[0][1] == val[0].read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"builtin:stdlib\?split=test.*split='test'.*train, validation, all"):
        iter_records("builtin:stdlib?split=test")


def test_hf_dataset_saved_locally_streams_and_hub_names_fail_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": ["one", "two"], "id": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"code": ["a"]}),
                          "test": datasets.Dataset.from_dict({"code": ["b", "c"]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_records(f"hf:{tmp_path}/ds")) == [(f"hf:{tmp_path}/ds#0", "one"), (f"hf:{tmp_path}/ds#1", "two")]
    assert list(iter_documents(f"hf:{tmp_path}/dd?split=test", text_field="code")) == ["b", "c"]
    with pytest.raises(ValueError, match=r"no split 'valid'"):
        list(iter_documents(f"hf:{tmp_path}/dd?split=valid", text_field="code"))
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['code'\]\)"):
        list(iter_documents(f"hf:{tmp_path}/dd?split=test"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "pq" / "train.parquet")
    assert list(iter_documents(f"hf:{tmp_path}/pq")) == ["p1", "p2"]  # a folder of data files, no hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"hf:nobody/nothing.*cannot load the dataset.*needs the internet"):
        list(iter_documents("hf:nobody/nothing?split=train"))
