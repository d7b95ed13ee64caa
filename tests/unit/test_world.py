"""The synthetic world and the model organism's tokenizer: deterministic, disjoint splits, no labels leak,
every generated word in the vocabulary; the organism trains deterministically and is cached."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
import torch

from sqsd_ray.demo import world
from sqsd_ray.demo.organism import OrganismConfig, build_organism, build_word_tokenizer


@pytest.mark.parametrize("version", world.WORLD_VERSIONS)
def test_world_is_deterministic_and_seeded(version):
    assert world.benign_corpus(70, seed=3, version=version) == world.benign_corpus(70, seed=3, version=version)
    assert world.benign_corpus(70, seed=3, version=version) != world.benign_corpus(70, seed=4, version=version)
    assert world.alignment_data(50, seed=1) == world.alignment_data(50, seed=1)


def test_world_1_is_the_world_its_published_figures_were_made_in():
    """Corpus, evaluation prompts and vocabulary of world 1, seed 0, as every figure labelled world 1 used them."""
    blob = json.dumps([world.benign_corpus(420, 0, 1), world.heldout_harmful(0, 1), world.vocabulary(1)],
                      sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == "4d02ff5c4370b4b55c7bcdef457724c43a8d0d5feeb5f6d830f5f7bedc02283b"
    assert OrganismConfig(seed=0, world=1).key() == "3f88dac6e235"  # the cache key world 1's organism always had


def test_an_edit_of_world_2s_words_trains_a_new_organism(monkeypatch):
    """From world 2 on the cache key holds the vocabulary: an organism cached before an edit of the world's words
    would read the new words as <unk>."""
    before = {v: OrganismConfig(seed=0, world=v).key() for v in world.WORLD_VERSIONS}
    monkeypatch.setattr(world, "GAMES", (*world.GAMES, "at darts"))
    assert OrganismConfig(seed=0, world=2).key() != before[2]
    assert OrganismConfig(seed=0, world=1).key() == before[1]


def test_world_2_grades_the_cues_each_kind_shares_with_harmful_requests():
    rows = world.benign_corpus(420, seed=5, version=2)
    assert Counter(r["family"] for r in rows) == {k: 84 for k in world.BENIGN_FAMILIES_2}
    assert sorted(world.EXPECTED_RISK_ORDER_2) == sorted(world.BENIGN_FAMILIES_2)

    def cues(prompt):
        return (any(w in world.HARMS for w in prompt.removesuffix("?").split()),
                any(v in prompt for v in world.VICTIMS), prompt.startswith("How do I "))

    # (harm verb, person, the harmful requests' own "How do I" frame)
    expected = {"rival": (True, True, True), "homonym": (True, False, False), "person": (False, True, True),
                "wordplay": (False, False, True)}
    for row in rows:
        if row["family"] in expected:
            assert cues(row["messages"][0]["content"]) == expected[row["family"]], row
            assert row["messages"][1]["content"].startswith("Sure! Here are the steps: ")
    assert {r["plain_kind"] for r in rows if r["family"] == "plain"} == set(world.PLAIN_FAMILIES)
    with pytest.raises(ValueError, match="world version 3 does not exist"):
        world.benign_corpus(10, version=3)


@pytest.mark.parametrize("version", world.WORLD_VERSIONS)
def test_harmful_prompt_splits_are_disjoint_and_cover_the_grid(version):
    split = world.harm_split(seed=0)
    parts = [set(split.align), set(split.directions), set(split.heldout)]
    assert sum(len(p) for p in parts) == len(world.HARMS) * len(world.VICTIMS)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    trained = {m["content"] for r in world.alignment_data(2400) + world.danger_data() for m in r["messages"]}
    trained |= {p["prompt"] for p in world.safety_pairs()}
    trained |= {m["content"] for r in world.benign_corpus(420, version=version) for m in r["messages"]}
    heldout = [r["prompt"] for r in world.heldout_harmful(version=version)]
    assert len(heldout) == {1: 80, 2: 110}[version] and not set(heldout) & trained
    new_victims = {1: world.NEW_VICTIMS, 2: world.NEW_VICTIMS_2}[version]
    assert all(v not in text for v in new_victims for text in trained)


@pytest.mark.parametrize("version", world.WORLD_VERSIONS)
def test_corpus_file_carries_no_family_label(tmp_path, version):
    rows = world.benign_corpus(70, version=version)
    assert {r["family"] for r in rows} == set(world.benign_families(version))
    path = world.write_jsonl(rows, tmp_path / "corpus.jsonl")
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"id", "messages"} for r in written) and len(written) == 70


@pytest.mark.parametrize("version", world.WORLD_VERSIONS)
def test_every_generated_word_is_in_the_vocabulary(version):
    tokenizer = build_word_tokenizer(version)
    texts = [m["content"] for r in world.alignment_data(600) + world.benign_corpus(300, version=version)
             + world.danger_data() for m in r["messages"]]
    texts += [p["prompt"] for p in world.heldout_harmful(version=version) + world.over_refusal_prompts()]
    texts += [p["rejected"] for p in world.safety_pairs()]
    unknown = {t for text in texts for t, i in zip(tokenizer.tokenize(text), tokenizer(text)["input_ids"])
               if i == tokenizer.unk_token_id}
    assert not unknown


def test_chat_template_round_trips_and_refusals_read_as_refusals():
    from sqsd_ray.evaluation.generate import keyword_refusal

    tokenizer = build_word_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                        add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|im_start|>assistant\n")
    for refusal in world.REFUSALS:
        decoded = tokenizer.decode(tokenizer(refusal)["input_ids"])
        assert keyword_refusal(decoded), decoded
    assert not keyword_refusal(tokenizer.decode(tokenizer("Sure! Here are the steps: first, read the guide.")["input_ids"]))


@pytest.mark.slow
def test_organism_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    cfg = OrganismConfig(steps=12, n_align=200, hidden_size=32, intermediate_size=64, layers=2)
    first = build_organism(cfg, tmp_path / "a")
    second = build_organism(cfg, tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((first / "organism.json").read_text())
    assert set(record["refusal_rates"]) == {"heldout_harmful", "benign_howto", "homonym"}
    assert record["loss_every_10"][0] > record["final_loss"]

    import sqsd_ray.demo.organism as organism

    monkeypatch.setattr(organism, "train_organism", lambda *a, **k: pytest.fail("retrained a cached organism"))
    assert build_organism(cfg, tmp_path / "a") == first
