"""A directory someone else made (a checkpoint, an HF model dir) cannot make a tool read, copy,
unpickle or allocate anything beyond what lies inside it: links and index entries that lead out are
refused before anything is read (megadiff.files.inside), a `.metadata` may not claim more bytes
than the files hold, truncation and missing parts are named, and a dir of the wrong kind names the
right flag. Cheap: a small torch DCP checkpoint written in-process (no megatron-core)."""

import io
import json
import os
import pickle
import resource
import shutil
import struct

import pytest
import torch
from safetensors import safe_open

from checkpoint_converters.moe import convert_expert_layout
from megadiff.checkpoint import DistCheckpointReader
from megadiff.checkpoint.format import resolve_checkpoint_dir
from megadiff.checkpoint.untrusted import check_common_state, unpickle_dcp_metadata, vet_checkpoint
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config
from megadiff.hf.reference import load_reference_model
from tests import hostile_checkpoints as hostile

QUIET = dict(progress=False, log=lambda *a: None)
KEY = "decoder.final_layernorm.weight"


@pytest.fixture
def small(tmp_path):
    """(checkpoint root, its iteration dir)."""
    return str(tmp_path / "ck"), hostile.small_checkpoint(str(tmp_path / "ck"))


def every_reader(root, it_dir):
    """What export, generate, resume, init_from_mcore and compare_logits run first, trusted or not."""
    return {
        "resolve": lambda: resolve_checkpoint_dir(root),
        "reader": lambda: DistCheckpointReader(it_dir),
        "reader_trusted": lambda: DistCheckpointReader(it_dir, trust=True),
        "vet": lambda: vet_checkpoint(it_dir),
        "vet_trusted": lambda: vet_checkpoint(it_dir, trust=True),
    }


# ---- links out of a checkpoint -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "common.pt", "megadiff.json"])
def test_a_link_out_of_a_received_checkpoint_is_refused_by_every_reader_before_reading(small, tmp_path, name):
    root, it_dir = small
    os.makedirs(tmp_path / "elsewhere")
    outside = str(tmp_path / "elsewhere" / name)
    hostile.move_outside_and_link(os.path.join(it_dir, name), outside)
    marker = tmp_path / "MARKER"
    if name == ".metadata":  # what a trusting reader would unpickle: it must not even be opened
        hostile.plant_in_metadata(os.path.join(tmp_path, "elsewhere"), str(marker))
    for what, read in every_reader(root, it_dir).items():
        with pytest.raises(CheckpointError, match=rf"{name}: a link in the checkpoint directory resolves to {outside}"):
            read()
            raise AssertionError(f"{what} read through the link")
    assert not marker.exists()


def test_an_iteration_dir_linked_out_of_the_root_is_refused(small, tmp_path):
    root, it_dir = small
    hostile.move_outside_and_link(it_dir, str(tmp_path / "other_run_iter"))
    with pytest.raises(CheckpointError, match=r"iter_0000000: a link in the checkpoint directory resolves to"):
        resolve_checkpoint_dir(root)


def test_links_that_stay_inside_and_a_linked_checkpoint_dir_are_fine(small, tmp_path):
    root, it_dir = small
    os.rename(os.path.join(it_dir, "common.pt"), os.path.join(it_dir, "common.real"))
    os.symlink("common.real", os.path.join(it_dir, "common.pt"))  # inside: allowed
    elsewhere = tmp_path / "big_disk"
    shutil.move(root, elsewhere)
    os.symlink(elsewhere, root)  # the whole checkpoint kept on another disk: what counts is where it leads
    for read in every_reader(root, it_dir).values():
        read()
    check_common_state(it_dir)


# ---- what a .metadata may claim ----------------------------------------------------------------


def test_metadata_claiming_more_bytes_than_stored_is_refused_before_any_allocation(small):
    root, it_dir = small
    hostile.claim_larger_chunks(it_dir, KEY, 10**7)  # 2.56 GB claimed from a 1.8 kB record
    for read in list(every_reader(root, it_dir).values())[1:]:
        with pytest.raises(CheckpointError, match=rf"tensor '{KEY}' at \[0\] claims \[640000000\] torch.float32"):
            read()


def test_metadata_whose_items_alias_one_record_is_refused(small):
    """Chunks that each fit their record but share it: in all they claim more than the files hold."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    _, it_dir = small
    metadata = hostile._load_metadata(it_dir)
    item, info = metadata.state_dict_metadata[KEY], metadata.storage_data[MetadataIndex(KEY, torch.Size([0]))]
    for i in range(8):
        metadata.state_dict_metadata[f"alias{i}"] = item
        metadata.storage_data[MetadataIndex(f"alias{i}", torch.Size([0]))] = info
    hostile._save_metadata(it_dir, metadata)
    with pytest.raises(CheckpointError, match=r"its tensors claim 2304 bytes in all, but .* data files hold 1833"):
        DistCheckpointReader(it_dir)


@pytest.mark.parametrize(
    "pickled, match",
    [
        (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x2f\x68\x59\x85R.", "bytearray\\(1500000000\\) asks for"),
        (b"\x80\x04\x95" + struct.pack("<Q", 1_500_000_000) + b"N.", "truncated"),
        (b"\x80\x04\x8e" + struct.pack("<Q", 1_500_000_000) + b"x.", "truncated"),
    ],
    ids=["bytearray_of_a_length", "huge_frame", "huge_bytes"],
)
def test_a_metadata_pickle_cannot_ask_for_a_huge_allocation(pickled, match, small):
    _, it_dir = small
    with open(os.path.join(it_dir, ".metadata"), "wb") as f:
        f.write(pickled)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=match):
        DistCheckpointReader(it_dir)
    with pytest.raises(CheckpointError, match=match):
        unpickle_dcp_metadata(io.BytesIO(pickled), "crafted")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: nothing near 1.5 GB


# ---- truncated and missing parts -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "common.pt"])
def test_a_truncated_file_is_named_as_truncated_trusted_or_not(small, name):
    _, it_dir = small
    path = os.path.join(it_dir, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for trust in (False, True):
        if name == "common.pt" and trust:
            continue  # trusted: megatron-core reads it (no vetting); the untrusted path names it
        with pytest.raises(CheckpointError, match=rf"{name}: truncated"):
            vet_checkpoint(it_dir, trust=trust)  # before megatron-core's load (EOFError before)


def test_a_deleted_common_pt_is_named_before_megatron_core_loads(small):
    _, it_dir = small
    os.remove(os.path.join(it_dir, "common.pt"))
    with pytest.raises(CheckpointError, match=r"common.pt: missing; megatron-core's metadata.json says"):
        check_common_state(it_dir)


# ---- HF dirs: index entries, links, hub cache ---------------------------------------------------


def hf_copy_with_index(tiny_hf, tmp_path, entry_for):
    """A copy of tiny_hf whose model.safetensors moved to tmp_path/elsewhere, listed in an index by
    `entry_for(moved path, hf dir)`."""
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    os.makedirs(tmp_path / "elsewhere")
    moved = shutil.move(hf / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    with safe_open(str(moved), "pt") as f:
        names = list(f.keys())
    entry = entry_for(str(moved), hf)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, entry)}))
    return str(hf)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_an_index_entry_leading_out_of_the_hf_dir_is_refused(tiny_hf, tmp_path, kind):
    def entry_for(moved, hf):
        if kind == "link":
            os.symlink(moved, hf / "model-00001-of-00001.safetensors")
            return "model-00001-of-00001.safetensors"
        return "../elsewhere/model.safetensors" if kind == "dotdot" else moved

    hf = hf_copy_with_index(tiny_hf, tmp_path, entry_for)
    match = "resolves to .*elsewhere" if kind == "link" else "is not a plain file name inside the directory"
    with pytest.raises(CheckpointError, match=match):
        HFCheckpointReader(hf)
    with pytest.raises(CheckpointError, match=match):
        convert_expert_layout(hf, str(tmp_path / "merged"), "merge", **QUIET)
    assert not (tmp_path / "merged").exists()


def test_a_hub_cache_snapshot_whose_files_link_to_its_blobs_loads(tiny_hf, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    os.makedirs(snapshot)
    os.makedirs(blobs)
    for name in os.listdir(tiny_hf):
        shutil.copyfile(os.path.join(tiny_hf, name), blobs / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    reference, model = load_reference_model(tiny_hf).state_dict(), load_reference_model(str(snapshot)).state_dict()
    assert model.keys() == reference.keys() and all(torch.equal(model[k], reference[k]) for k in model)


def test_moe_convertor_never_copies_a_link_target_from_outside(tiny_hf, tmp_path):
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    os.symlink(tmp_path / "id_rsa", hf / "notes.txt")
    with pytest.raises(CheckpointError, match=r"notes.txt: a link in the model directory resolves to .*id_rsa"):
        convert_expert_layout(str(hf), str(tmp_path / "merged"), "merge", **QUIET)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("field", ["auto_map", "custom_pipelines"])
def test_entries_naming_another_repositorys_code_are_dropped_and_named(tiny_hf, tmp_path, field):
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    entry = hostile.plant_foreign_code(config, field)
    (hf / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil-org/tools--tok.Slow", "evil-org/tools--tok.Fast"]}
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    lines = []
    out = convert_expert_layout(str(hf), str(tmp_path / "merged"), "merge", progress=False, log=lines.append)
    written = json.loads(open(os.path.join(out, "config.json")).read())
    assert "evil-org" not in json.dumps(written) + open(os.path.join(out, "tokenizer_config.json")).read()
    assert written["auto_map"]["AutoModel"] == config["auto_map"]["AutoModel"]  # the dir's own code stays
    if field == "custom_pipelines":
        assert written["custom_pipelines"] == {"fill-mask": hostile.LOCAL_PIPE}
    assert (
        "dropped auto_map / custom_pipelines entries naming code of another repository (trust_remote_code=True would "
        f"download and run it): config.json: {entry}; "
        "tokenizer_config.json: AutoTokenizer -> evil-org/tools--tok.Slow, evil-org/tools--tok.Fast" in lines
    ), lines


# ---- config.json that is not an object; dirs of the wrong kind; merged experts -------------------


def test_a_config_json_that_is_a_list_is_named(tiny_hf, tmp_path):
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    (hf / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list, expected a JSON object"):
        read_hf_config(str(hf))
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list"):
        load_reference_model(str(hf))


def test_a_dir_of_the_other_kind_names_the_right_flag(tiny_hf, small):
    root, _ = small
    with pytest.raises(CheckpointError, match=r"a Hugging Face model directory .* pass it as --hf-dir .*convert_hf_to"):
        resolve_checkpoint_dir(tiny_hf)  # --mcore-dir HF_DIR
    with pytest.raises(CheckpointError, match=r"a megadiff megatron checkpoint, .*pass it as --mcore-dir .*mcore_to"):
        read_hf_config(root)  # --hf-dir CKPT
    with pytest.raises(CheckpointError, match=r"a megadiff megatron checkpoint, .*pass it as --mcore-dir"):
        HFCheckpointReader(root)


def test_a_merged_expert_dir_loads_as_the_same_model(tiny_hf, tiny_hf_merged):
    split, merged = load_reference_model(tiny_hf).state_dict(), load_reference_model(tiny_hf_merged).state_dict()
    assert split.keys() == merged.keys() and all(torch.equal(split[k], merged[k]) for k in split)


def test_the_bytearray_pickle_in_the_test_is_what_it_says():
    assert pickle.loads(b"\x80\x02cbuiltins\nbytearray\nJ\x00\x10\x00\x00\x85R.") == bytearray(4096)
