"""`curate export` of the session's seeded project (round 0: imported labels, round 1: a loop round; see
tests/seeded_fixture.py): the folder loads with `datasets.load_from_disk` and `load_dataset("parquet", …)` (and
through the card's configs), TRL's DPOTrainer and RewardTrainer train on it as it is, the card parses with valid Hub
metadata and says what it must; an existing folder is refused without --force."""

from __future__ import annotations

import shutil

import pytest
from seeded_fixture import UNPAIRED, curate

from curation.export import PAIR_COLUMNS, UNPAIRED_COLUMNS, parse_rounds, size_category, split_of
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_rows

pytestmark = pytest.mark.xdist_group("seeded")


@pytest.fixture(scope="module")
def exported(seeded, tmp_path_factory):
    project, args, _ = seeded
    out = tmp_path_factory.mktemp("export") / "ds"
    done = curate("export", *args, "--out", out, "--test-share", "0.3")  # a test split of a few prompts
    assert done.returncode == 0, done.stderr[-2000:]
    return out, project, args, done


def test_export_loads_and_holds_every_round_deduplicated_and_split_by_prompt(exported):
    import datasets

    out, project, _, done = exported
    info = read_json(out / "export.json")
    r0 = read_rows(project / "round-0000" / "labels" / "pairs.parquet")
    r1 = read_rows(project / "round-0001" / "pull" / "pairs.parquet")
    assert info["rounds"] == [0, 1] and f"from rounds 0, 1 → {out}" in done.stdout
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "test"} and list(dd["train"].features) == list(PAIR_COLUMNS)
    total = len(dd["train"]) + len(dd["test"])
    assert total == len(r0) + len(r1) - info["duplicates_removed"] and info["sizes"]["pairs"]["test"] == len(dd["test"])
    parquet = datasets.load_dataset("parquet", data_files={s: str(out / "data" / "pairs" / f"{s}.parquet")
                                                           for s in ("train", "test")})
    assert parquet["train"].to_list() == dd["train"].to_list()
    assert datasets.load_dataset(str(out))["train"].num_rows == len(dd["train"])  # the card's configs
    rows = dd["train"].to_list() + dd["test"].to_list()
    assert {r["round"] for r in rows} == {0, 1} and {r["stage"] for r in rows if r["round"] == 0} == {"imported"}
    imported = [r for r in rows if r["round"] == 0]
    assert all(r["source"].startswith("imported:") and r["arm"] is None for r in imported)
    loop = [r for r in rows if r["round"] == 1]
    selected = {s["prompt_id"]: s for s in read_rows(project / "round-0001" / "select" / "selected.parquet")}
    assert all(r["arm"] == selected[r["prompt_id"]]["arm"] and r["random_arm"] == (r["arm"] == "random")
               and r["annotator_count"] == len(r["annotators"]) > 0 for r in loop)
    assert any(r["agreement"] is not None for r in loop)
    for name in ("train", "test"):  # every prompt in one split, the one its hash says
        assert all(split_of(r["prompt"], 0.3) == name for r in dd[name].to_list())
    unpaired = datasets.load_from_disk(str(out / "unpaired"))
    assert list(unpaired["train"].features) == list(UNPAIRED_COLUMNS)
    assert sum(len(split) for split in unpaired.values()) == UNPAIRED


def test_trl_trainers_accept_the_export_as_it_is(exported, tiny_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    out = exported[0]
    train = datasets.load_from_disk(str(out))["train"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                  save_strategy="no", logging_steps=1)
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), processing_class=tokenizer,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=256, **common), train_dataset=train)
    assert dpo.train().global_step == 1
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    reward = RewardTrainer(model=rm, processing_class=tokenizer, train_dataset=train,
                           args=RewardConfig(output_dir=str(tmp_path / "rm"), max_length=None, **common))
    assert reward.train().global_step == 1


def test_the_card_parses_with_hub_metadata_and_says_what_it_must(exported):
    import yaml
    from huggingface_hub import DatasetCard

    out = exported[0]
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == ["cc-by-4.0", "mit", "unknown"]  # seed sources' licences; the tiny pool names none
    assert data["size_categories"] == [size_category(sum(sum(v.values()) for v in read_json(out / "export.json")
                                                         ["sizes"].values()))] == ["n<1K"]
    assert data["task_categories"] == ["text-generation", "text-classification"]
    assert data["annotations_creators"] == ["found", "machine-generated"]  # imported labels, simulated reviewers
    assert [c["config_name"] for c in data["configs"]] == ["default", "unpaired"]
    assert yaml.safe_load(card.content.split("---")[1]) == data  # the header is plain YAML
    text = card.text
    for needed in ("## Sources and licences", "`last-quarter`", "| imported labels | mit |", "## Models",
                   "generator (candidate answers): dummy-a", "reward (base model): tiny-llama",
                   "## Rounds: selection, reviewers, agreement", "`reward_disagreement\\|kcenter` (champion)",
                   "## Harm flags", "## Known limitations", "simulated reviewers", "`stage: imported`"):
        assert needed in text, needed


def test_existing_folder_needs_force_and_rounds_select(exported, tmp_path):
    out, _, args, _ = exported
    again = curate("export", *args, "--out", out)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: export folder {out} already exists; choose another --out, or pass --force to replace it")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    only = curate("export", *args, "--out", copy, "--force", "--rounds", "1")
    assert only.returncode == 0 and read_json(copy / "export.json")["rounds"] == [1]
    none = curate("export", *args, "--out", tmp_path / "x", "--rounds", "5-7")
    assert none.returncode == 2 and "none of [5, 6, 7] has labels" in none.stderr
    assert parse_rounds("0-2,5") == [0, 1, 2, 5] and parse_rounds("all") is None
    with pytest.raises(CurateError, match="expected all, a round"):
        parse_rounds("two")
