import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from babyllama.data.pretrain import PrepareConfig, is_validation, load_manifest, prepare_pretrain
from babyllama.corpus.readers import DataError, iter_documents


def read_split(directory, split):
    m = load_manifest(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


def test_token_stream_decodes_to_documents_joined_by_eos(data_dir, corpus_dir, tokenizer):
    documents = list(iter_documents(corpus_dir / "news.txt")) + list(iter_documents(corpus_dir / "reviews.txt"))
    for split, want_val in (("train", False), ("val", True)):
        expected = [d for d in documents if is_validation(d, 0.05) == want_val]
        stream = read_split(data_dir, split)
        eos = tokenizer.eos_id
        assert stream[-1] == eos
        pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
        decoded = [tokenizer.decode(p[:-1].tolist()) for p in pieces]
        assert decoded == expected
    m = load_manifest(data_dir)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(documents)
    assert m["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert m["dtype"] == "uint16"


def test_parallel_and_serial_give_identical_shards(corpus_dir, tokenizer_dir, tmp_path):
    inputs = [str(corpus_dir / "news.txt"), str(corpus_dir / "reviews.txt")]
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_pretrain(PrepareConfig(inputs=inputs, tokenizer=str(tokenizer_dir), out=str(out), workers=workers,
                                       chunk_bytes=20_000, shard_tokens=50_000, progress=False))
        outs.append(out)
    files = sorted(p.name for p in outs[0].glob("*.bin"))
    assert len(files) > 2  # several shards were written
    assert files == sorted(p.name for p in outs[1].glob("*.bin"))
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_shards_never_split_a_document(data_dir, tokenizer, corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "small"
    prepare_pretrain(PrepareConfig(inputs=[str(corpus_dir / "news.txt")], tokenizer=str(tokenizer_dir), out=str(out),
                                   shard_tokens=10_000, progress=False))
    m = load_manifest(out)
    for shard in m["splits"]["train"]["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype=m["dtype"])
        assert tokens[-1] == tokenizer.eos_id
        assert shard["documents"] == int((tokens == tokenizer.eos_id).sum())


def test_bad_input_stops_with_file_and_line_and_leaves_no_output(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "一"}\n{"text": \n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad.jsonl: line 2"):
        prepare_pretrain(PrepareConfig(inputs=[str(bad)], tokenizer=str(tokenizer_dir), out=str(out), progress=False))
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    m = prepare_pretrain(PrepareConfig(inputs=[str(bad)], tokenizer=str(tokenizer_dir), out=str(out),
                                       on_error="skip", progress=False, val_fraction=0.0))
    assert m["sources"][0]["skipped"] == 1 and m["splits"]["train"]["documents"] == 1


def test_bad_input_in_a_worker_is_reported_the_same(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"第{i}行"}, ensure_ascii=False) for i in range(3000)]
    lines[2500] = "{oops"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2501: malformed JSON"):
        prepare_pretrain(PrepareConfig(inputs=[str(bad)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "o"),
                                       workers=2, chunk_bytes=4096, progress=False))


def test_empty_corpus_is_an_error(tmp_path, tokenizer_dir):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        prepare_pretrain(PrepareConfig(inputs=[str(blank)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "o"),
                                       progress=False))


def test_exclusions_keep_texts_out(tmp_path, tokenizer_dir):
    src = tmp_path / "c.txt"
    src.write_text("保留这一句\n去掉这一句\n也保留\n", encoding="utf-8")
    ex = tmp_path / "ex.txt"
    ex.write_text("去掉这一句\n", encoding="utf-8")
    m = prepare_pretrain(PrepareConfig(inputs=[str(src)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "o"),
                                       exclude=[str(ex)], val_fraction=0.0, progress=False))
    assert m["splits"]["train"]["documents"] == 2 and m["sources"][0]["excluded"] == 1


MEMORY_PROBE = textwrap.dedent("""
    import sys
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain
    path, tok, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prepare_pretrain(PrepareConfig(inputs=[path], tokenizer=tok, out=out, workers=workers, progress=False))
    # VmHWM: this process's peak resident memory (ru_maxrss would include the forking parent's)
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from /proc (Linux)")
def test_memory_stays_flat_as_the_corpus_grows(tmp_path, tokenizer_dir, corpus_dir):
    """A corpus larger than the whole process's peak memory is prepared, and its peak RSS is
    within a few MB of a run on a corpus 100x smaller."""
    block = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n"
                    for line in (corpus_dir / "news.txt").read_text(encoding="utf-8").splitlines())
    peaks = {}
    for copies in (3, 300):
        path = tmp_path / f"c{copies}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(block)
        size_mb = path.stat().st_size / 2**20
        res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tokenizer_dir),
                              str(tmp_path / f"o{copies}"), "2"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        peaks[copies] = (int(res.stdout.strip().splitlines()[-1]), size_mb)
        path.unlink()
    (small_rss, _), (big_rss, big_mb) = peaks[3], peaks[300]
    assert big_mb > 1.2 * big_rss, peaks  # the corpus does not fit in what the process used
    assert big_rss - small_rss < 15, peaks  # MB: flat in corpus size


def test_large_vocabulary_uses_uint32(tmp_path):
    """A Hugging Face tokenizer.json with more than 65,536 ids: shards switch to uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({"[UNK]": 70_000, "</s>": 70_001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>", "[UNK]"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    src = tmp_path / "c.txt"
    src.write_text("w69999 w1\nw65536 w7\n", encoding="utf-8")
    m = prepare_pretrain(PrepareConfig(inputs=[str(src)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "o"),
                                       val_fraction=0.0, progress=False))
    assert m["dtype"] == "uint32"
    assert read_split(tmp_path / "o", "train").tolist() == [69999, 1, 70_001, 65536, 7, 70_001]
