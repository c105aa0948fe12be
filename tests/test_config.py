import pytest

from elo_ray.config import JobSpec, SpecError, load_spec, resolve_weights, spec_to_yaml

MINIMAL = """\
storage:
  root: /tmp/runs
model:
  base: /models/base
pretrain:
  data:
    sources:
      - {uri: /data/en.jsonl, language: en}
      - {uri: /data/ko.jsonl, language: ko}
"""


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text, overrides=()):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text), overrides)
    return e.value.problems


def test_minimal_spec_fills_paper_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.pretrain.layers == [0, -1]
    assert spec.pretrain.train.method == "elo"
    assert spec.pretrain.train.lr == 5e-6
    assert spec.align.train.method == "full" and spec.align.enabled
    assert spec.instruct.enabled is False


def test_unknown_key_names_line_and_suggests(tmp_path):
    text = MINIMAL.replace("pretrain:\n", "pretrain:\n  layerz: [0, 1]\n")
    assert problems(tmp_path, text) == ["line 6: pretrain.layerz: unknown key; did you mean 'layers'?"]


def test_every_problem_is_listed_once(tmp_path):
    text = MINIMAL + "  train:\n    lr: -1\n    micro_batch_size: two\n"
    lines = problems(tmp_path, text)
    assert len(lines) == 2
    assert lines[0].startswith("line 11: pretrain.train.lr: Input should be greater than 0")
    assert lines[1].startswith("line 12: pretrain.train.micro_batch_size: Input should be a valid integer")


def test_missing_required_key(tmp_path):
    assert problems(tmp_path, MINIMAL.replace("model:\n  base: /models/base\n", "")) == [
        "model: required key is missing"
    ]


def test_overrides_set_nested_values_and_lists(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL), ["pretrain.train.lr=1e-4", "pretrain.layers=[0,2,3]",
                                                 "pretrain.data.sources.1.language=ja"])
    assert spec.pretrain.train.lr == 1e-4
    assert spec.pretrain.layers == [0, 2, 3]
    assert spec.pretrain.data.sources[1].language == "ja"


def test_override_without_equals_is_an_error(tmp_path):
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(write(tmp_path, MINIMAL), ["pretrain.train.lr"])


def test_repeated_layers_rejected(tmp_path):
    lines = problems(tmp_path, MINIMAL, ["pretrain.layers=[1,1]"])
    assert lines == ["--set pretrain.layers: layer indices must be distinct, got [1, 1]"]


def test_method_belongs_to_its_stage(tmp_path):
    assert "method must be elo here" in problems(tmp_path, MINIMAL, ["pretrain.train.method=lora"])[0]
    assert "use full, lora, layers or lora_layers here" in problems(tmp_path, MINIMAL, ["align.train.method=elo"])[0]


def test_instruct_sft_needs_data(tmp_path):
    lines = problems(tmp_path, MINIMAL, ["instruct.enabled=true"])
    assert lines == ["(top level): instruct.data is required when instruct.sft_enabled is true"]


def test_invalid_yaml_names_the_line(tmp_path):
    lines = problems(tmp_path, "storage:\n  root: [unclosed\nmodel: x\n")
    assert lines[0].startswith("line 3: not valid YAML")


def test_spec_cannot_execute_code(tmp_path):
    # safe_load refuses Python tags instead of constructing objects
    lines = problems(tmp_path, "storage: !!python/object/apply:os.system ['echo hi']\n")
    assert "not valid YAML" in lines[0]


def test_resolved_spec_round_trips(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    import yaml
    assert JobSpec.model_validate(yaml.safe_load(spec_to_yaml(spec))) == spec


@pytest.mark.parametrize(
    "weights, languages, expected",
    [
        (None, ["en", "ko"], {"en": 0.1, "ko": 0.9}),
        (None, ["en", "ja", "ko"], {"en": 0.1, "ja": 0.45, "ko": 0.45}),
        (None, ["ko"], {"ko": 1.0}),
        ({"en": 1, "ko": 1}, ["en", "ko"], {"en": 0.5, "ko": 0.5}),
    ],
)
def test_weights_resolve_to_shares(weights, languages, expected):
    assert resolve_weights(weights, languages) == pytest.approx(expected)


@pytest.mark.parametrize(
    "weights, message",
    [({"en": 0, "ko": 0}, "must sum to a positive number"), ({"fr": 1}, "no source: ['fr']"),
     ({"en": -1, "ko": 2}, "must not be negative")],
)
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_weights(weights, ["en", "ko"])


def test_an_empty_search_candidates_list_is_refused_not_read_as_the_defaults(tmp_path):
    lines = problems(tmp_path, MINIMAL + "search:\n  candidates: []\n")
    assert any("search.candidates" in line and "at least 1 item" in line for line in lines), lines
    assert load_spec(write(tmp_path, MINIMAL + "search:\n  candidates: [[0, -1]]\n")).search.candidates == [[0, -1]]
