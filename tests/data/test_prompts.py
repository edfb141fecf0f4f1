"""Prompt files and built-in datasets."""
import json
import os

import pytest

from diffusion_opd.data.prompts import (
    PromptDataset,
    PromptFileNotFoundError,
    load_prompt_file,
    load_task_prompts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_txt_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a cat \n\n\t\nA sign that says \"hi\"\nlast line without newline")
    ds = load_prompt_file(path)
    assert ds.prompts == ["a cat", 'A sign that says "hi"', "last line without newline"]
    assert ds.metadata == [{}, {}, {}]
    assert ds[1] == {"prompt": 'A sign that says "hi"', "metadata": {}}


def test_jsonl_keeps_whole_row_as_metadata(tmp_path):
    rows = [{"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"},
            {"tag": "single_object", "include": [{"class": "bed", "count": 1}], "prompt": "a photo of a bed"}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_prompt_file(path)
    assert ds.prompts == ["a photo of two cups", "a photo of a bed"]
    assert ds.metadata == rows


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"no_prompt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a 'prompt'"):
        load_prompt_file(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompt_file(broken)
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        load_prompt_file(tmp_path / "x.csv")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(empty)


def test_official_geneval_metadata(shared_datasets):
    ds = load_task_prompts("geneval", "test", root=shared_datasets)
    raw = [json.loads(line) for line in (shared_datasets / "geneval/test_metadata.jsonl").read_text().splitlines()]
    assert len(ds) == len(raw) == 2212  # 553 prompts x 4 rows
    assert ds.metadata == raw
    assert ds.prompts == [r["prompt"] for r in raw]


@pytest.mark.parametrize("name,count", [("ocr", 1018), ("pickscore", 2048), ("drawbench", 1000)])
def test_builtin_text_datasets(shared_datasets, name, count):
    ds = load_task_prompts(name, "test", root=shared_datasets)
    assert len(ds) == count
    assert all(p and p == p.strip() for p in ds.prompts)


def test_folder_and_file_paths(shared_datasets):
    by_name = load_task_prompts("ocr", "test", root=shared_datasets)
    by_folder = load_task_prompts(shared_datasets / "ocr", "test")
    by_file = load_task_prompts(str(shared_datasets / "ocr" / "test.txt"))
    assert by_name.prompts == by_folder.prompts == by_file.prompts


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_task_prompts("ocr", "test", root=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, PromptFileNotFoundError)
    assert str((tmp_path / "ocr" / "test.txt").resolve()) in msg
    assert "python scripts/download_data.py --dataset ocr" in msg
    with pytest.raises(FileNotFoundError, match="geneval_generator"):
        load_task_prompts("geneval", "train", root=tmp_path)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid datasets: drawbench, geneval, ocr, pickscore, video_motion"):
        load_task_prompts("genevals", "test")
    with pytest.raises(ValueError, match="valid splits: test, train"):
        load_task_prompts("ocr", "val")
    with pytest.raises(ValueError, match="dataset 'video_motion' has no split 'val'; valid splits: test, train"):
        load_task_prompts("video_motion", "val")


def test_builtin_video_set_needs_no_download_and_holds_out_its_test_prompts(tmp_path):
    """``video_motion`` ships with the package (an empty data root is enough), is selected by name
    from a config task like the downloaded sets, and its test prompts are not training prompts."""
    from diffusion_opd.config import load_config
    from diffusion_opd.data.prompts import task_prompts

    train, test = (load_task_prompts("video_motion", split, root=tmp_path) for split in ("train", "test"))
    assert len(train) == 32 and len(test) == 8 and not set(train.prompts) & set(test.prompts)
    assert len(set(train.prompts)) == len(train) and all(p == p.strip() and p for p in train.prompts + test.prompts)
    assert train.metadata == [{}] * 32 and "video_motion (train, built in)" == train.source
    config = load_config(os.path.join(ROOT, "config", "nft.py") + ":tiny_wan_t2v", [f"data_root={tmp_path}"])
    assert config.tasks.bright.prompts == config.tasks.bright.eval_prompts == "video_motion"
    assert task_prompts(config, "bright", "train").prompts == train.prompts
    assert task_prompts(config, "bright", "eval").prompts == test.prompts


def test_dataset_rows_select_and_slice():
    ds = PromptDataset.from_prompts(["a", "b", "c", "d"], source="mem")
    assert ds.select([3, 0]).prompts == ["d", "a"]
    assert ds[1:3].prompts == ["b", "c"]
    with pytest.raises(ValueError, match="row 0 has no 'prompt' string"):
        PromptDataset([{"text": "x"}])
