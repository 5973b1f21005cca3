"""Data sources: every spec form yields exactly the documents it names."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data.sources import iter_documents


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
    (tmp_path / "notes.md").write_text("ignored: not a data file", encoding="utf-8")
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
