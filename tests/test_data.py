"""The data plane on a real local Ray (2 CPUs) and a real S3 endpoint: ratios, token accounting,
sharding across Ray Train workers, determinism and resume, held-out sets, chat labels, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import numpy as np
import pytest

from elo_ray import data, storage
from elo_ray.config import ChatDataConfig, DataConfig, SourceConfig
from elo_ray.data.budget import quotas
from ranks import each_rank

EN = "The quick brown fox jumps over the lazy dog . A model learns a new language from mixed text".split()
KO = "빠른 갈색 여우가 게으른 개를 뛰어넘는다 . 모델은 섞인 텍스트로 새로운 언어를 배운다".split()
SEQ = 64
CHAT_SEQ = 256


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def en_doc(rng, i):  # long documents
    return f"doc-en-{i} " + " ".join(rng.choice(EN) for _ in range(rng.randint(150, 450)))


def ko_doc(rng, i):  # short documents
    return f"doc-ko-{i} " + " ".join(rng.choice(KO) for _ in range(rng.randint(3, 25)))


def digest(row) -> str:
    return hashlib.sha1(np.asarray(row, dtype=np.int64).tobytes()).hexdigest()  # as in the Train loop below


def read_ranks(plan, micro_batch_size, skip=0, delays=None):
    """Every rank's batches and totals, the ranks read concurrently as Ray Train workers do."""
    readers = plan.local_readers()

    def read(rank):
        got = []
        for b in readers[rank].batches(micro_batch_size, skip=skip):
            got.append(b)
            if delays:
                time.sleep(delays[rank])
        return got, readers[rank].totals()

    return each_rank(len(readers), read)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """English: few long documents; Korean: many short ones, in two files (a directory source)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    en = [en_doc(rng, i) for i in range(140)]
    en.append(en[0])  # a duplicate of a held-out document, far from the head
    (root / "ko").mkdir()
    write_jsonl(root / "en.jsonl", ({"text": t} for t in en))
    write_jsonl(root / "ko" / "part-0.jsonl", ({"text": ko_doc(rng, i)} for i in range(0, 1500)))
    write_jsonl(root / "ko" / "part-1.jsonl", ({"text": ko_doc(rng, i)} for i in range(1500, 3000)))
    return root


def corpus_config(root: str, **kw) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(uri=storage.join(root, "en.jsonl"), language="en"),
                 SourceConfig(uri=storage.join(root, "ko"), language="ko")],
        seq_len=SEQ, heldout_docs=8, **kw,
    )


@pytest.fixture(scope="module")
def plan2(ray_local, corpus, tiny_tokenizer):
    return data.plan_pretrain_stream(corpus_config(str(corpus)), tiny_tokenizer, world_size=2)


@pytest.fixture(scope="module")
def stream2(plan2):
    return read_ranks(plan2, micro_batch_size=8)


# --------------------------------------------------------------------------- mixing and budget


def test_mix_order_hits_quotas_and_interleaves_every_prefix():
    order = list(data.mix_order({"en": 37, "ko": 333}))
    assert order.count("en") == 37 and order.count("ko") == 333
    for n in range(1, len(order) + 1):  # every prefix within one sequence of the asked share
        assert abs(order[:n].count("en") - n * 37 / 370) <= 1


def test_max_tokens_budget_splits_by_share():
    q, note = quotas({"en": 1000, "ko": 1000}, {"en": 0.1, "ko": 0.9}, total=100, repeat=False)
    assert q == {"en": 10, "ko": 90} and note is None


def test_stop_cuts_the_budget_to_the_scarcest_language_and_says_so():
    q, note = quotas({"en": 5, "ko": 1000}, {"en": 0.1, "ko": 0.9}, total=100, repeat=False)
    assert q == {"en": 5, "ko": 45}
    assert "cut to 50" in note and "en holds only 5" in note and "on_exhausted: repeat" in note
    # The plan's summary (the "data: stream" message) shows the note as one of its further
    # lines, indented like the languages' lines under the message.
    from elo_ray.data.plan import StreamPlan

    per_lang = {"docs": 3, "tokens": 900, "dropped": 4, "planned_tokens": 640, "no_text": 0, "bad_records": 0,
                "non_utf8": 0, "heldout": 1}
    plan = StreamPlan(datasets={}, dataset_config=None, reader=None, languages=["en", "ko"],
                      weights={"en": 0.1, "ko": 0.9}, quotas=q, world_size=2, seq_len=128,
                      report={"en": per_lang, "ko": per_lang}, notes=[note])
    first, *rest = plan.summary().splitlines()
    assert first == "stream: 2 worker(s) x 50 sequences of 128 tokens"
    assert [line[:6] for line in rest[:2]] == ["  en: ", "  ko: "] and rest[2] == f"  {note}"


def test_repeat_keeps_the_budget():
    q, note = quotas({"en": 5, "ko": 1000}, {"en": 0.1, "ko": 0.9}, total=100, repeat=True)
    assert q == {"en": 10, "ko": 90} and note is None


def test_one_epoch_is_one_pass_over_the_scarcest_language():
    q, _ = quotas({"en": 30, "ko": 100}, {"en": 0.5, "ko": 0.5}, total=None, repeat=False)
    assert q == {"en": 30, "ko": 30}


# --------------------------------------------------------------------------- the stream


def test_trained_shares_are_within_1pp_with_very_different_document_lengths(plan2, stream2):
    trained = {"en": 0, "ko": 0}
    for batches, _ in stream2:
        for b in batches:
            for lang, n in b["tokens"].items():
                trained[lang] += n
    total = sum(trained.values())
    assert abs(trained["en"] / total - 0.1) < 0.01
    assert abs(trained["ko"] / total - 0.9) < 0.01
    first_tenth = stream2[0][0][: len(stream2[0][0]) // 10]  # interleaved, not English at the end
    en = sum(b["tokens"].get("en", 0) for b in first_tenth) / sum(sum(b["tokens"].values()) for b in first_tenth)
    assert abs(en - 0.1) < 0.01
    assert stream2[0][1]["shares"]["en"] == pytest.approx(0.1, abs=0.01)


def test_dropped_tokens_stay_under_1_percent_and_every_token_is_accounted(plan2, stream2):
    for lang, r in plan2.report.items():
        assert r["dropped"] / r["tokens"] < 0.01, (lang, r)
        assert r["tokens"] == r["sequences"] * SEQ + r["dropped"]  # read = packed + tails
    for _, totals in stream2:
        for lang, t in totals["languages"].items():
            assert t["read"] == t["trained"] + t["dropped"]
            assert t["trained"] == t["sequences"] * SEQ


def test_every_worker_yields_the_same_number_of_micro_batches(plan2, stream2):
    counts = [len(batches) for batches, _ in stream2]
    assert counts == [plan2.micro_batches(8)] * 2
    assert all(b["input_ids"].shape == (8, SEQ) and b["labels"].equal(b["input_ids"]) for b in stream2[1][0])


def test_two_runs_give_bit_identical_batches_whatever_the_worker_speeds(plan2, stream2):
    again = read_ranks(plan2, micro_batch_size=8, delays=[0.002, 0.0])
    for (a, _), (b, _) in zip(stream2, again):
        assert len(a) == len(b)
        assert all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(a, b))


def test_skip_resumes_exactly_where_the_run_stopped(plan2, stream2):
    resumed = read_ranks(plan2, micro_batch_size=8, skip=100)
    for (full, _), (rest, totals) in zip(stream2, resumed):
        assert len(rest) == len(full) - 100
        assert all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(full[100:], rest))
        assert totals["micro_batches"] == len(full)  # the skipped ones count as trained


def test_ray_train_workers_get_disjoint_shards_that_cover_the_stream(plan2, stream2, tmp_path):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):  # pickled by value: names only what the workers can import
        import hashlib

        import ray.train

        reader = config["reader"]
        rows = [hashlib.sha1(r.numpy().tobytes()).hexdigest() for b in reader.batches(8) for r in b["input_ids"]]
        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump({"rows": rows, "totals": reader.totals()}, f)

    TorchTrainer(
        loop,
        train_loop_config={"reader": plan2.reader, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="shards", storage_path=str(tmp_path / "ray")),
        datasets=plan2.datasets,
        dataset_config=plan2.dataset_config,
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # The same rows in the same order as a run outside Ray Train: determinism across runs.
    for rank, (batches, _) in zip(ranks, stream2):
        assert rank["rows"] == [digest(r) for b in batches for r in b["input_ids"]]
    a, b = set(ranks[0]["rows"]), set(ranks[1]["rows"])
    assert not a & b  # disjoint
    every = {digest(r) for ds in plan2.datasets.values() for batch in ds.iter_batches(batch_format="numpy")
             for r in batch["input_ids"]}
    assert a | b <= every
    assert len(a | b) == plan2.micro_batches(8) * 8 * 2  # together: the whole planned stream
    # one epoch: the scarcest language is used up, all of it (but the < world_size split remainder)
    scarce = min(plan2.languages, key=lambda lang: plan2.report[lang]["sequences"] / plan2.weights[lang])
    assert plan2.report[scarce]["planned_sequences"] >= plan2.report[scarce]["sequences"] - 1


def test_local_disk_and_s3_give_the_same_batches(corpus, tiny_tokenizer, s3_bucket, stream2):
    storage.upload(str(corpus), s3_bucket + "/corpus")
    remote = data.plan_pretrain_stream(corpus_config(s3_bucket + "/corpus"), tiny_tokenizer, world_size=2)
    for (a, _), (b, _) in zip(stream2, read_ranks(remote, micro_batch_size=8)):
        assert len(a) == len(b)
        assert all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(a, b))


def test_heldout_documents_never_reach_training(plan2, corpus, tiny_tokenizer):
    cfg = corpus_config(str(corpus))
    held = data.heldout(cfg, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert {lang: len(docs) for lang, docs in held.items()} == {"en": 8, "ko": 8}
    assert all(doc[-1] == eos for docs in held.values() for doc in docs)
    for lang, name in plan2.reader.datasets.items():
        ds = plan2.datasets[name]
        ds.context.execution_options.preserve_order = True  # units in order: documents stay whole
        ids = np.concatenate([b["input_ids"].ravel() for b in ds.iter_batches(batch_format="numpy")])
        trained = tiny_tokenizer.decode(ids.tolist())
        for doc in held[lang]:
            text = tiny_tokenizer.decode(doc)  # with its EOS: "doc-en-3 ...<|endoftext|>"
            assert text not in trained
        others = [f"doc-{lang}-{i} " for i in range(8, 60)]
        assert sum(o in trained for o in others) >= 0.9 * len(others)  # the rest does train


def test_repeat_rereads_the_short_language_to_keep_budget_and_ratio(ray_local, tmp_path, tiny_tokenizer):
    rng = random.Random(1)
    en = write_jsonl(tmp_path / "en.jsonl", ({"text": en_doc(rng, i)} for i in range(12)))
    ko = write_jsonl(tmp_path / "ko.jsonl", ({"text": ko_doc(rng, i)} for i in range(3000)))
    cfg = DataConfig(sources=[SourceConfig(uri=en, language="en"), SourceConfig(uri=ko, language="ko")],
                     seq_len=SEQ, heldout_docs=0, max_tokens=SEQ * 1000, weights={"en": 1, "ko": 1},
                     on_exhausted="repeat")
    plan = data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)
    assert plan.report["en"]["sequences"] < plan.quotas["en"] == plan.quotas["ko"]
    [(batches, totals)] = read_ranks(plan, micro_batch_size=4)
    assert totals["languages"]["en"]["sequences"] == plan.quotas["en"]
    assert totals["shares"]["en"] == pytest.approx(0.5, abs=0.01)
    rows = [digest(r) for b in batches for r in b["input_ids"]]
    assert len(rows) - len(set(rows)) >= plan.quotas["en"] - plan.report["en"]["sequences"]  # re-read


def test_byte_range_units_read_every_line_exactly_once(tmp_path):
    from elo_ray.data.documents import Counts, read_documents
    from elo_ray.data.sources import list_files, make_units

    rng = random.Random(6)
    docs = [en_doc(rng, i)[: rng.randint(1, 3000)] for i in range(300)]
    src = SourceConfig(uri=write_jsonl(tmp_path / "en.jsonl", ({"text": t} for t in docs)), language="en")
    units = make_units("en", src, list_files(src), unit_bytes=4099)  # cuts fall inside lines
    assert len(units) > 50
    assert [d for u in units for d in read_documents(u, Counts(), "error")] == docs


def test_gzip_jsonl_text_and_parquet_sources_give_the_same_tokens(ray_local, tmp_path, tiny_tokenizer):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    docs = [en_doc(rng, i) for i in range(40)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in docs)
    (tmp_path / "b.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet", row_group_size=7)
    cfg = DataConfig(sources=[
        SourceConfig(uri=str(tmp_path / "a.jsonl.gz"), language="gz", text_field="body"),
        SourceConfig(uri=str(tmp_path / "b.txt"), language="txt", format="text"),
        SourceConfig(uri=str(tmp_path / "c.parquet"), language="pq", format="parquet"),
    ], seq_len=SEQ, heldout_docs=1)
    plan = data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)
    assert [plan.report[lang]["docs"] for lang in ("gz", "txt", "pq")] == [39, 39, 39]
    assert len({plan.report[lang]["tokens"] for lang in ("gz", "txt", "pq")}) == 1


def test_tokenizer_can_be_given_as_an_s3_location(corpus, tiny_tokenizer, tmp_path, s3_bucket):
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights are not needed for tokenizing")
    storage.upload(str(tmp_path / "model"), s3_bucket + "/model")
    cfg = corpus_config(str(corpus))
    assert data.heldout(cfg, s3_bucket + "/model") == data.heldout(cfg, tiny_tokenizer)


# --------------------------------------------------------------------------- chat


def test_chat_labels_are_the_assistant_tokens_only(ray_local, tmp_path, tiny_tokenizer):
    rng = random.Random(2)

    def conversation(lang, i, long=False):
        words = EN if lang == "en" else KO
        say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
        return {"messages": [
            {"role": "system", "content": f"S{i} {say(3)}"},
            {"role": "user", "content": f"Q{i} {say(60 if long else 5)}"},
            {"role": "assistant", "content": f"A{i} {say(4)}"},
            {"role": "user", "content": f"Q{i} {say(3)}"},
            {"role": "assistant", "content": f"B{i} {say(3)}"},
        ]}

    convs = {lang: [conversation(lang, i, long=i == 5) for i in range(40 if lang == "en" else 60)]
             for lang in ("en", "ko")}
    sources = [SourceConfig(uri=write_jsonl(tmp_path / f"{lang}.jsonl", rows), language=lang)
               for lang, rows in convs.items()]
    cfg = ChatDataConfig(sources=sources, seq_len=CHAT_SEQ, heldout_docs=2)
    assert cfg.sources[0].text_field == "messages"
    plan = data.plan_chat_stream(cfg, tiny_tokenizer, world_size=1)
    [(batches, totals)] = read_ranks(plan, micro_batch_size=4)
    assert totals["languages"]["en"]["sequences"] == totals["languages"]["ko"]["sequences"]  # 1:1 examples
    assert plan.report["en"]["truncated"] >= 1
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    checked = 0
    for b in batches:
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            n = len(ids) - next(k for k, t in enumerate(reversed(ids)) if t != pad)
            assert all(t == pad for t in ids[n:]) and all(label == -100 for label in labels[n:])
            assert all(label in (-100, t) for t, label in zip(ids, labels))
            kept = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
            assert "Q" not in kept and "S" not in kept and "|>" not in kept.replace(tiny_tokenizer.eos_token, "")
            text = tiny_tokenizer.decode(ids[:n])
            i = int(text.split("Q", 1)[1].split()[0])
            assert i >= 2  # conversations 0 and 1 are held out
            lang = "ko" if any("\uac00" <= c <= "\ud7a3" for c in text) else "en"
            if n < CHAT_SEQ:  # not truncated: the labels are exactly the assistant turns, each with its EOS
                msgs = convs[lang][i]["messages"]
                assert kept == "".join(m["content"] + tiny_tokenizer.eos_token for m in msgs if m["role"] == "assistant")
                assert ids[n - 1] == eos
                checked += 1
    assert checked > 20


# --------------------------------------------------------------------------- bad input


def test_missing_path_is_named(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path / "nope.jsonl"), language="en")])
    assert data.validate_sources(cfg) == [f"{tmp_path / 'nope.jsonl'}: no such file or directory; check the path "
                                          f"(and, for s3://, the bucket)"]


def test_missing_s3_object_is_named(s3_bucket):
    cfg = DataConfig(sources=[SourceConfig(uri=f"{s3_bucket}/none/x.jsonl", language="en")])
    [problem] = data.validate_sources(cfg)
    assert problem.startswith(f"{s3_bucket}/none/x.jsonl: no such file or directory")


def test_empty_glob_is_named(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path / "*.jsonl"), language="en")])
    [problem] = data.validate_sources(cfg)
    assert problem == f"{tmp_path / '*.jsonl'}: the glob matches no files; check the pattern and the bucket/prefix"


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path), language="en", format="parquet")])
    [problem] = data.validate_sources(cfg)
    assert problem.startswith(f"{bad}: not a readable parquet file")


def test_parquet_without_the_text_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path / "x.parquet"), language="en", format="parquet")])
    assert data.validate_sources(cfg) == [f"{tmp_path / 'x.parquet'}: parquet file has no column 'text' (columns: "
                                          f"body); set text_field to the column holding the text"]


def test_malformed_json_line_is_an_error_naming_file_and_line(ray_local, tmp_path, tiny_tokenizer):
    rng = random.Random(3)
    path = write_jsonl(tmp_path / "en.jsonl", [{"text": en_doc(rng, 0)}, {"text": en_doc(rng, 1)},
                                               '{"text": "cut off', {"text": en_doc(rng, 2)}])
    cfg = DataConfig(sources=[SourceConfig(uri=path, language="en")], seq_len=SEQ, heldout_docs=0)
    with pytest.raises(data.DataError, match=rf"^{path}:3: malformed JSON line \(Unterminated string.*on_bad_record: skip"):
        data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)


@pytest.fixture(scope="module")
def dirty_plan(ray_local, tmp_path_factory, tiny_tokenizer):
    """English with 2 malformed lines, 3 rows without text, 1 empty text, 1 line of invalid UTF-8."""
    root = tmp_path_factory.mktemp("dirty")
    rng = random.Random(4)
    rows = [{"text": en_doc(rng, i)} for i in range(30)]
    rows[3:3] = ["{not json", "[1, 2]", {"title": "no text"}, {"text": None}, {"text": 7}, {"text": "   "}]
    path = write_jsonl(root / "en.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"text": "caf\xe9 ' + " ".join(EN).encode() * 20 + b'"}\n')  # latin-1 byte, not UTF-8
    cfg = DataConfig(sources=[SourceConfig(uri=path, language="en")], seq_len=SEQ, heldout_docs=0,
                     on_bad_record="skip")
    return data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)


def test_malformed_json_lines_are_skipped_and_counted_when_asked(dirty_plan):
    assert dirty_plan.report["en"]["bad_records"] == 2


def test_rows_without_text_or_with_empty_text_are_skipped_and_counted(dirty_plan):
    assert dirty_plan.report["en"]["no_text"] == 4
    assert dirty_plan.report["en"]["docs"] == 31


def test_non_utf8_bytes_are_replaced_and_counted(dirty_plan):
    assert dirty_plan.report["en"]["non_utf8"] == 1
    [(batches, _)] = read_ranks(dirty_plan, micro_batch_size=2)
    assert batches


def test_language_without_tokens_is_an_error(ray_local, tmp_path, tiny_tokenizer):
    rng = random.Random(5)
    en = write_jsonl(tmp_path / "en.jsonl", ({"text": en_doc(rng, i)} for i in range(20)))
    ko = write_jsonl(tmp_path / "ko.jsonl", [{"text": ""}, {"body": "x"}])
    cfg = DataConfig(sources=[SourceConfig(uri=en, language="en"), SourceConfig(uri=ko, language="ko")],
                     seq_len=SEQ, heldout_docs=0)
    with pytest.raises(data.DataError, match=rf"language 'ko' has no tokens for one sequence of {SEQ} \(sources: "
                                             rf"{ko}\): 0 documents kept, 2 without text.*give ko weight 0"):
        data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)


def test_weights_that_do_not_sum_to_a_positive_number_are_an_error(corpus, tiny_tokenizer):
    cfg = corpus_config(str(corpus), weights={"en": 0, "ko": 0})
    assert data.validate_sources(cfg) == ["weights: weights must sum to a positive number, got {'en': 0.0, 'ko': 0.0}"]
    with pytest.raises(data.DataError, match="weights must sum to a positive number"):
        data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)


def test_tokenizer_without_eos_is_an_error(corpus, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    with pytest.raises(data.DataError, match="the tokenizer has no EOS token"):
        data.plan_pretrain_stream(corpus_config(str(corpus)), tok, world_size=1)


def test_text_format_is_refused_for_chat(tmp_path):
    path = write_jsonl(tmp_path / "c.txt", ["hello"])
    cfg = ChatDataConfig(sources=[SourceConfig(uri=path, language="en", format="text")])
    assert data.validate_sources(cfg) == [f"{path}: chat data must be jsonl or parquet rows with a 'messages' list, not text"]


# --------------------------------------------------------------------------- what a source must be (checked before Ray)


def test_records_without_the_text_field_stop_a_plan_naming_the_keys(tmp_path, tiny_tokenizer):
    rng = random.Random(8)
    path = write_jsonl(tmp_path / "en.jsonl", ({"id": i, "body": en_doc(rng, i)} for i in range(20)))
    cfg = DataConfig(sources=[SourceConfig(uri=path, language="en")], seq_len=SEQ, heldout_docs=0)
    with pytest.raises(data.DataError) as e:
        data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)
    assert str(e.value) == f"{path}: records have keys ['body', 'id'], not 'text' (first 20 records); set text_field: body"


def test_records_without_the_text_field_on_s3_stop_a_plan_naming_the_keys(s3_bucket, tiny_tokenizer):
    uri = f"{s3_bucket}/chat/en.jsonl"
    storage.write_text(uri, "".join(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n"
                                    for _ in range(3)))
    cfg = ChatDataConfig(sources=[SourceConfig(uri=uri, language="en")], seq_len=CHAT_SEQ)
    with pytest.raises(data.DataError) as e:
        data.plan_chat_stream(cfg, tiny_tokenizer, world_size=1)
    assert str(e.value) == f"{uri}: records have keys ['conversation'], not 'messages' (first 3 records); set text_field: conversation"


def test_seq_len_longer_than_a_language_holds_says_to_lower_it(ray_local, tmp_path, tiny_tokenizer):
    rng = random.Random(9)
    path = write_jsonl(tmp_path / "en.jsonl", ({"text": en_doc(rng, i)} for i in range(20)))
    cfg = DataConfig(sources=[SourceConfig(uri=path, language="en")], seq_len=10_000_000, heldout_docs=0)
    with pytest.raises(data.DataError, match=rf"^language 'en' has [\d,]+ tokens in 20 documents \(sources: {path}\), "
                                             rf"fewer than one sequence of seq_len 10000000; lower seq_len \(at most the "
                                             rf"model's max_position_embeddings\) or add en data$"):
        data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=1)


def test_a_text_source_holding_json_lines_is_named(tmp_path):
    path = write_jsonl(tmp_path / "en.txt", [{"text": "one"}, {"text": "two"}])
    cfg = DataConfig(sources=[SourceConfig(uri=path, language="en", format="text")])
    assert data.validate_sources(cfg) == [f"{path}: every line of its first 2 is a JSON object (keys ['text']); for "
                                          f"JSON lines set format: jsonl and text_field to the key holding the text"]


def test_a_compressed_file_must_be_named_for_its_codec(tmp_path):
    import gzip

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "plain.jsonl.gz").write_text(json.dumps({"text": "one"}) + "\n")
    (tmp_path / "a" / "zipped.jsonl").write_bytes(gzip.compress(json.dumps({"text": "two"}).encode() + b"\n"))
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path / "a"), language="en")])
    assert data.validate_sources(cfg) == [
        f"{tmp_path / 'a' / 'plain.jsonl.gz'}: its name ends in .gz but it is not compressed; rename the file to what it holds",
        f"{tmp_path / 'a' / 'zipped.jsonl'}: is gzip-compressed, but its name does not say so; add .gz to its name so "
        f"that it is decompressed",
    ]


def test_a_zstd_source_is_sampled_decompressed(tmp_path):
    import zstandard

    path = tmp_path / "en.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps({"body": f"doc {i}"}).encode() + b"\n"
                                                                  for i in range(4))))
    cfg = DataConfig(sources=[SourceConfig(uri=str(path), language="en")])
    assert data.validate_sources(cfg) == [f"{path}: records have keys ['body'], not 'text' (first 4 records); "
                                          f"set text_field: body"]


def test_a_parquet_text_column_must_hold_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2], "body": ["a", "b"]}), tmp_path / "x.parquet")
    cfg = DataConfig(sources=[SourceConfig(uri=str(tmp_path / "x.parquet"), language="en", format="parquet")])
    assert data.validate_sources(cfg) == [f"{tmp_path / 'x.parquet'}: parquet column 'text' holds int64, not text; "
                                          f"set text_field: body"]


def test_chat_messages_of_the_wrong_shape_are_named_with_their_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hello"}])
    cfg = ChatDataConfig(sources=[SourceConfig(uri=path, language="en")])
    assert data.validate_sources(cfg) == [f"{path}:2: 'messages' must be a list of {{role, content}} string pairs; fix "
                                          f"the record, or set on_bad_record: skip to skip and count such records"]


def test_checking_an_s3_source_reads_a_megabyte_of_it_not_the_file(s3_bucket):
    line = (json.dumps({"text": "word " * 200}) + "\n").encode()
    uri = f"{s3_bucket}/big/en.jsonl"
    storage.write_bytes(uri, line * (12 * (1 << 20) // len(line)))  # 12 MB
    fs, _ = storage.filesystem(uri)
    fs.connect()
    fetched = []
    fs.s3.meta.events.register("after-call.s3.GetObject", lambda parsed, **_: fetched.append(parsed["ContentLength"]))
    assert data.validate_sources(DataConfig(sources=[SourceConfig(uri=uri, language="en")])) == []
    assert 1 << 20 <= sum(fetched) < 2 << 20  # the sample and the file's first bytes
