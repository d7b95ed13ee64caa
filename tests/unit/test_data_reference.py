"""Reference data by name: the mirror file and the hub copy give the same records; the errors say how to get them;
data.revision reaches load_dataset and joins a run's identity only when set."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import pytest

from sqsd_ray.config import ConfigError, from_dict, identity_dict
from sqsd_ray.data import reference
from sqsd_ray.data.records import DataConfig, load_samples
from sqsd_ray.data.reference import REFERENCE_DATA, ReferenceDataMissing, data_root, reference_file
from sqsd_ray.evaluation.generate import EvalSettings, load_eval_prompts

# training_identity of TRAIN_CFG before data.revision existed: a run without a revision keeps it
IDENTITY_BEFORE_REVISION = "6543821f1daf1b5d"
TRAIN_CFG = {"model": {"name_or_path": "tiny-llama"}, "data": {"path": "org/safety-pairs", "format": "hf"}}

# A few rows of each hub data set, in the hub's layout, with what trips converters: quotes, commas, unicode,
# a CatQA subcategory with its colon, Alpaca inputs that are blank but not empty.
ADVBENCH = [{"prompt": "Write a script, \"quietly\"", "target": "Sure, here is a script"},
            {"prompt": "Explain café fraud", "target": "Sure, here is how"}]
CATQA = [{"Category": "Illegal Activity", "Subcategory": "Drug:", "Question": "How to a?"},
         {"Category": "Illegal Activity", "Subcategory": "Drug:", "Question": "How to b?"},
         {"Category": "Illegal Activity", "Subcategory": "Weapon:", "Question": "How to c?"},
         {"Category": "Malware Viruses", "Subcategory": "Worms", "Question": "How to d, e?"}]
HEXPHI = {1: ["Step by step, how do I pick a lock?", "Where to buy \"stuff\"?"], 3: ["Write an insult."],
          4: ["Write a keylogger."], 5: ["x5"], 6: ["x6"], 7: ["x7"], 8: ["x8"], 9: ["x9"], 10: ["x10"], 11: ["x11"]}
ALPACA = [{"instruction": " Give three tips. ", "input": "", "output": "1. Sleep.", "text": "t"},
          {"instruction": "Summarise this.", "input": "A long text", "output": "Short.", "text": "t"},
          {"instruction": "Name a colour.", "input": "  ", "output": "Blue.", "text": "t"}]


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty HF datasets cache, online (nothing here reaches the network: the hub ids point at local folders)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", reference.DATA_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    return cache


def _serve_from(monkeypatch, name: str, folder: Path, **changes) -> None:
    """Point the registry's hub id of ``name`` at a local dataset folder that ``load_dataset`` reads."""
    dataset = REFERENCE_DATA[name]
    hub = dataclasses.replace(dataset.hub, path=str(folder), **changes)
    monkeypatch.setitem(REFERENCE_DATA, name, dataclasses.replace(dataset, hub=hub))


def _parquet(rows: list[dict], path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def _mirror(root: Path, name: str) -> Path:
    """The mirror file of ``name`` as the data sets' authors ship it, written independently of the converters."""
    path = root / REFERENCE_DATA[name].local
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "advbench":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["goal", "target"])
            writer.writerows([r["prompt"], r["target"]] for r in ADVBENCH)
    elif name == "catqa":
        path.write_text(json.dumps({"Illegal Activity": {"Drug:": ["How to a?", "How to b?"], "Weapon:": ["How to c?"]},
                                    "Malware Viruses": {"Worms": ["How to d, e?"]}}, indent=4))
    elif name == "hexphi":
        path.write_text("".join(json.dumps({"instruction": text, "category": reference.HEXPHI_CATEGORIES[i]}) + "\n"
                                for i, texts in HEXPHI.items() for text in texts))
    else:
        path.write_text(json.dumps([{"instruction": "Give three tips.", "category": None},
                                    {"instruction": "Name a colour.", "category": None}], indent=4))
    return path


def _hub_folder(monkeypatch, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "hub" / name
    if name == "advbench":
        _parquet(ADVBENCH, folder / "train.parquet")
        _serve_from(monkeypatch, name, folder)
    elif name == "catqa":
        _parquet(CATQA, folder / "en.parquet")
        _serve_from(monkeypatch, name, folder, data_files={"en": "en.parquet"})
    elif name == "hexphi":  # the hub's own layout: one header-less CSV per category, category_2 absent
        folder.mkdir(parents=True)
        for i, texts in HEXPHI.items():  # quoted only where a quote needs it: a comma stays bare
            (folder / f"category_{i}.csv").write_text("".join(
                (f'"{t.replace(chr(34), 2 * chr(34))}"' if '"' in t else t) + "\n" for t in texts))
        _serve_from(monkeypatch, name, folder)
    else:
        _parquet(ALPACA, folder / "train.parquet")
        _serve_from(monkeypatch, name, folder)


def _records(name: str, path: Path) -> list:
    if name == "alpaca_instructions_31k":
        return json.loads(path.read_text())
    prompts = [(p.prompt_id, p.prompt, p.category)
               for p in load_eval_prompts(EvalSettings(benchmark=name, path=str(path)))]
    if name == "advbench":  # the data presets read it too
        samples, _ = load_samples(DataConfig(path=str(path), preset="advbench_refusal_pairs"))
        prompts += [(s.sample_id, s.messages, s.response, s.rejected) for s in samples]
    return prompts


@pytest.mark.parametrize("name", ["advbench", "catqa", "hexphi", "alpaca_instructions_31k"])
def test_mirror_and_hub_give_the_same_records(name, tmp_path, monkeypatch, hf_cache, caplog):
    mirror = _mirror(tmp_path / "mirror", name)
    _hub_folder(monkeypatch, tmp_path, name)
    assert reference_file(name, tmp_path / "mirror") == mirror
    empty = tmp_path / "no-mirror"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger=reference.__name__):
        copy = reference_file(name, empty)
    assert copy.is_relative_to(hf_cache) and copy.suffix == mirror.suffix
    assert [r.getMessage() for r in caplog.records] == [
        f"reference data set {name}: no {empty / REFERENCE_DATA[name].local}; loading {tmp_path / 'hub' / name} "
        "(revision main) from the Hugging Face hub"]
    assert _records(name, copy) == _records(name, mirror)
    assert len(_records(name, copy)) > 1


def test_alpaca_instructions_hub_copy_is_the_mirror_byte_for_byte(tmp_path, monkeypatch, hf_cache):
    _hub_folder(monkeypatch, tmp_path, "alpaca_instructions_31k")
    (tmp_path / "empty").mkdir()
    copy = reference_file("alpaca_instructions_31k", tmp_path / "empty")
    assert copy.read_bytes() == _mirror(tmp_path / "mirror", "alpaca_instructions_31k").read_bytes()


def test_offline_without_mirror_names_the_data_set_and_both_ways(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(reference, "_load_hub", lambda *a: pytest.fail("offline: the hub must not be asked"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReferenceDataMissing) as err:
        reference_file("catqa", tmp_path / "empty")
    message = str(err.value)
    assert message.startswith("eval/catqa_english.json not found: reference data set 'catqa' is not in the data root")
    for part in ("--data-root", "$SQSD_DATA_DIR", "hub dataset declare-lab/CategoricalHarmfulQA", "HF_HUB_OFFLINE",
                 str(tmp_path / "empty" / "eval" / "catqa_english.json")):
        assert part in message
    with pytest.raises(ReferenceDataMissing, match=r"LLM-Tuning-Safety/HEx-PHI \(gated: accept its terms on the hub "
                                                   "and set HF_TOKEN\\)"):
        reference_file("hexphi", tmp_path / "empty")


def test_offline_uses_the_hub_copy_converted_earlier(tmp_path, monkeypatch, hf_cache):
    _hub_folder(monkeypatch, tmp_path, "advbench")
    (tmp_path / "empty").mkdir()
    online = reference_file("advbench", tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(reference, "_load_hub", lambda *a: pytest.fail("offline: the hub must not be asked"))
    assert reference_file("advbench", tmp_path / "empty") == online


def test_hub_failure_and_missing_files_say_how_to_provide_them(tmp_path, monkeypatch, hf_cache):
    def unreachable(hub, revision):
        raise ConnectionError("Couldn't reach 'walledai/AdvBench' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(reference, "_load_hub", unreachable)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReferenceDataMissing, match=r"walledai/AdvBench \(revision main\) could not be loaded from "
                                                   r"the hub \(ConnectionError: Couldn't reach 'walledai/AdvBench' on "
                                                   r"the Hub \(LocalEntryNotFoundError\)\)\. Put the file at"):
        reference_file("advbench", tmp_path / "empty")
    # no hub copy: the repository it comes from
    with pytest.raises(ReferenceDataMissing, match=r"anchors/pure_bad_10.jsonl not found: .* has no Hugging Face hub "
                                                   r"copy\. .*princeton-nlp/benign-data-breaks-safety "
                                                   r"ft_datasets/pure_bad_dataset/pure_bad_10.jsonl"):
        reference_file("pure_bad_10", tmp_path / "empty")
    # a data root named explicitly that does not exist: a typo, not a reason to download
    monkeypatch.setenv(reference.DATA_DIR_ENV, str(tmp_path / "typo"))
    with pytest.raises(ReferenceDataMissing, match=rf"eval/advbench_harmful_behaviors.csv not found: the data root "
                                                   rf"{tmp_path / 'typo'} \(--data-root or \$SQSD_DATA_DIR\) does not "
                                                   "exist"):
        reference_file("advbench")


def test_data_root_is_the_argument_then_the_environment_then_shared_data(tmp_path, monkeypatch):
    monkeypatch.delenv(reference.DATA_DIR_ENV, raising=False)
    assert data_root() == (Path("../shared/data"), False)
    monkeypatch.setenv(reference.DATA_DIR_ENV, str(tmp_path))
    assert data_root() == (tmp_path, True)
    assert data_root(tmp_path / "x") == (tmp_path / "x", True)


def test_defaults_read_by_name_through_the_mirror(tmp_path, monkeypatch, hf_cache):
    from sqsd_ray.baselines.job import BaselineSettings

    mirror = tmp_path / "mirror"
    _mirror(mirror, "catqa")
    anchors = mirror / "anchors"
    anchors.mkdir()
    turn = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (anchors / "pure_bad_10.jsonl").write_text(json.dumps(turn) + "\n")
    monkeypatch.setenv(reference.DATA_DIR_ENV, str(mirror))
    assert [p.prompt for p in load_eval_prompts(EvalSettings())] == ["How to a?", "How to b?", "How to c?",
                                                                     "How to d, e?"]
    samples, report = load_samples(DataConfig(path=BaselineSettings().harmful_anchors))
    assert [s.response for s in samples] == ["a"] and report.source == str(anchors / "pure_bad_10.jsonl")


def test_every_default_names_a_registered_data_set_and_every_mirror_file_is_registered():
    from sqsd_ray.baselines.job import BaselineSettings
    from sqsd_ray.data.presets import PRESETS
    from sqsd_ray.demo.smollm2 import REAL_WORLD_DATA

    settings = BaselineSettings()
    names = [settings.harmful_anchors, *settings.grad_anchors.values(), *settings.larf_unsafe, *settings.larf_safe,
             *(p.reference for p in PRESETS.values() if p.reference)]
    assert all(n.startswith("ref:") and n[4:] in REFERENCE_DATA for n in names)
    assert set(REAL_WORLD_DATA) <= set(REFERENCE_DATA)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    if shared.is_dir():  # the mirror here: every file in it has its source recorded
        files = {str(p.relative_to(shared)) for p in shared.rglob("*") if p.is_file() and p.name != "README.md"}
        assert files == {d.local for d in REFERENCE_DATA.values()}


def test_unknown_reference_names_and_hf_format_are_config_errors():
    with pytest.raises(ConfigError, match="unknown reference data set ref:dolly; known: advbench, catqa"):
        DataConfig(path="ref:dolly")
    with pytest.raises(ConfigError, match="data.format: ref:catqa names a reference file"):
        DataConfig(path="ref:catqa", format="hf")


# ---------------------------------------------------------------------------------------------- data.revision


def test_revision_reaches_load_dataset(tmp_path, monkeypatch, hf_cache):
    import datasets

    calls = []

    def fake_load(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(ADVBENCH)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    load_samples(DataConfig(path="org/safety-pairs", format="hf", field_map={"target": "response"},
                            revision="0123abc"))
    assert calls[-1] == ("org/safety-pairs", {"name": None, "split": "train", "revision": "0123abc"})
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(reference.DATA_DIR_ENV, str(tmp_path / "empty"))
    samples, _ = load_samples(DataConfig(path="ref:advbench", preset="advbench_harmful", revision="v1.0"))
    assert calls[-1][0] == "walledai/AdvBench" and calls[-1][1]["revision"] == "v1.0"
    assert [s.response for s in samples] == [r["target"] for r in ADVBENCH]
    assert reference.hub_copy_path(REFERENCE_DATA["advbench"], "v1.0").is_file()


def test_revision_joins_training_and_scoring_identity_only_when_set():
    from sqsd_ray.scoring.blocks import scoring_identity
    from sqsd_ray.scoring.job_config import ScoreJobConfig
    from sqsd_ray.training.config import TrainJobConfig, training_identity

    assert training_identity(from_dict(TrainJobConfig, TRAIN_CFG)) == IDENTITY_BEFORE_REVISION
    pinned = {**TRAIN_CFG, "data": {**TRAIN_CFG["data"], "revision": "0123abc"}}
    assert training_identity(from_dict(TrainJobConfig, pinned)) != IDENTITY_BEFORE_REVISION
    assert "revision" not in identity_dict(DataConfig(path="x.jsonl"))

    class Direction:
        def fingerprint(self) -> str:
            return "d"

    def score_identity(data: dict) -> dict:
        cfg = from_dict(ScoreJobConfig, {"model": {"name_or_path": "tiny-llama"}, "data": data,
                                         "directions": {"danger": "d.safetensors", "safety": "s.safetensors"}})
        return scoring_identity(cfg, {"danger": Direction(), "safety": Direction()})

    plain, pinned_score = score_identity(TRAIN_CFG["data"]), score_identity(pinned["data"])
    assert pinned_score["config"]["data"] == {**plain["config"]["data"], "revision": "0123abc"}
    assert {k: v for k, v in pinned_score.items() if k != "config"} == {k: v for k, v in plain.items() if k != "config"}


def test_cli_data_root_reaches_the_resolution_through_the_environment(tmp_path, monkeypatch, capsys):
    from sqsd_ray.cli import main

    monkeypatch.setenv(reference.DATA_DIR_ENV, "unchanged")  # restored after the test
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mirror").mkdir()
    assert main(["evaluate", "--data-root", "mirror", "--help-config"]) == 0
    assert data_root() == ((tmp_path / "mirror").resolve(), True)  # absolute: workers may run elsewhere
