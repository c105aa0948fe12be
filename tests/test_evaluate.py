import math

import torch

from elo_ray.evaluate import format_table, perplexity
from elo_ray.tiny import tiny_config, tiny_model


def test_perplexity_equals_exp_of_the_models_own_mean_loss():
    model = tiny_model(tiny_config("llama", vocab_size=64, max_position_embeddings=64), seed=1)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 17)]
    with torch.no_grad():
        total, count = 0.0, 0
        for d in docs:
            ids = torch.tensor([d])
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len(d) - 1 predictions
            total += loss * (len(d) - 1)
            count += len(d) - 1
    got = perplexity(model, {"en": docs}, max_len=32)
    assert math.isclose(got["en"], math.exp(total / count), rel_tol=1e-5)


def test_long_documents_are_scored_in_windows_covering_every_token():
    model = tiny_model(tiny_config("llama", vocab_size=64, max_position_embeddings=64), seed=1)
    doc = list(range(40))
    with torch.no_grad():
        a = model(input_ids=torch.tensor([doc[:17]]), labels=torch.tensor([doc[:17]])).loss.item() * 16
        b = model(input_ids=torch.tensor([doc[16:33]]), labels=torch.tensor([doc[16:33]])).loss.item() * 16
        c = model(input_ids=torch.tensor([doc[32:]]), labels=torch.tensor([doc[32:]])).loss.item() * 7
    assert math.isclose(perplexity(model, {"ko": [doc]}, max_len=16)["ko"], math.exp((a + b + c) / 39), rel_tol=1e-5)


def test_table_has_a_row_per_model_and_a_column_per_language():
    table = format_table({"base": {"perplexity": {"en": 10.0, "ko": 50.25}}, "align": {"perplexity": {"en": 11.5}}})
    assert table.splitlines() == [
        "| model | ppl en | ppl ko |",
        "|---|---:|---:|",
        "| base | 10.00 | 50.25 |",
        "| align | 11.50 | - |",
    ]


def test_table_shows_each_task_by_its_primary_metric_beside_perplexity():
    results = {
        "base": {"perplexity": {"en": 10.0}, "tasks": {"kobest_copa": {"acc": 0.5, "acc_stderr": 0.02, "f1": 0.4},
                                                        "ja_leaderboard_jsquad": {"exact_match": 0.125}}},
        "align": {"perplexity": {"en": 9.5}, "tasks": {"kobest_copa": {"acc": 0.625, "acc_stderr": 0.02, "f1": 0.6}}},
    }
    assert format_table(results).splitlines() == [
        "| model | ppl en | acc kobest_copa | exact_match ja_leaderboard_jsquad |",
        "|---|---:|---:|---:|",
        "| base | 10.00 | 0.500 | 0.125 |",
        "| align | 9.50 | 0.625 | - |",
    ]
