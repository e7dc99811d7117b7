"""A received checkpoint cannot run code or leak local files: code planted in its pickles is
refused before anything runs (the marker file stays absent) by the exporter and the sampler's
loader, and --trust-checkpoint loads it; an export copies only allow-listed template files and
follows the checkpoint's recorded hf_source_dir only when that dir's config.json matches."""

import importlib.util
import json
import os
import pickle
import re
import shutil

import pytest

from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from megadiff.checkpoint import DistCheckpointReader
from megadiff.checkpoint.untrusted import unpickle_dcp_metadata, vet_checkpoint
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from tests import hostile_checkpoints as hostile
from tests.dist.launch import REPO

pytestmark = pytest.mark.slow  # the converted checkpoint comes from the suite's converter launch


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ck(single_process_run, tmp_path):
    """A private copy of the converter-made (1,1,1) checkpoint."""
    return hostile.copy_checkpoint(single_process_run["ck111"], str(tmp_path / "ck"))


def export_cli(ck, out, *extra):
    return load_tool("convert_mcore_to_hf").main(["--mcore-dir", ck, "--output", str(out), "--no-progress", *extra])


def test_converted_checkpoint_loads_by_default(ck):
    iter_dir = os.path.join(ck, "iter_0000000")
    assert vet_checkpoint(iter_dir) is not None  # every pickle passes the allow-lists
    assert "decoder.final_layernorm.weight" in DistCheckpointReader(iter_dir)


def test_export_refuses_code_in_metadata_without_running_it(ck, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    hostile.plant_in_metadata(ck, str(marker))
    assert export_cli(ck, tmp_path / "hf") == 2
    assert re.search(
        r"\.metadata: refused to unpickle it \('posix.system'.*--trust-checkpoint", capsys.readouterr().err
    )
    assert not marker.exists() and not (tmp_path / "hf").exists()
    assert export_cli(ck, tmp_path / "hf", "--trust-checkpoint") == 0
    assert marker.exists(), "the payload was live: trusting the checkpoint ran it"
    assert HFCheckpointReader(str(tmp_path / "hf")).names()


def test_export_refuses_code_in_extra_state_without_running_it(ck, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    key = hostile.plant_in_extra_state(ck, str(marker))
    assert export_cli(ck, tmp_path / "hf") == 2
    assert f"item '{key}': refused to unpickle it (it names exec" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()
    assert export_cli(ck, tmp_path / "hf", "--trust-checkpoint") == 0  # the export never unpickles it
    assert not marker.exists()


def test_sampler_loader_refuses_planted_code_and_trust_loads_it(ck, tmp_path, capsys):
    generate = load_tool("generate")
    args = [
        "--model",
        ck,
        "--prompt",
        "hi",
        "--gen-length",
        "8",
        "--block-length",
        "8",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    marker = tmp_path / "MARKER"
    hostile.plant_in_metadata(ck, str(marker))
    assert generate.main(args) == 2
    assert "refused to unpickle it ('posix.system'" in capsys.readouterr().err
    assert not marker.exists()
    assert generate.main(args + ["--trust-checkpoint"]) == 0
    assert marker.exists()


def test_fp8_like_extra_state_exports_but_is_refused_for_loading_into_a_model(ck, tmp_path):
    key = hostile.fp8_like_extra_state(ck)
    iter_dir = os.path.join(ck, "iter_0000000")
    DistCheckpointReader(iter_dir)  # the exporter never hands extra state to a model
    with pytest.raises(CheckpointError, match=f"item '{key}' is non-empty extra state.*--trust-checkpoint"):
        vet_checkpoint(iter_dir)  # what train resume / init_from_mcore / compare_logits run first
    assert vet_checkpoint(iter_dir, trust=True) is None


def test_data_file_outside_the_checkpoint_is_refused(ck, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    hostile.point_data_outside(ck, str(secret))
    with pytest.raises(CheckpointError, match="is not a file name inside the checkpoint directory"):
        DistCheckpointReader(os.path.join(ck, "iter_0000000"))


def test_metadata_pickle_cannot_rewrite_an_allowed_class():
    from torch.distributed.checkpoint.metadata import MetadataIndex

    # GLOBAL MetadataIndex; BUILD (None, {'__eq__': None}): sets a class attribute, runs nothing.
    data = b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadataIndex\nN}\x8c\x06__eq__\x94Ns\x86b."
    eq = MetadataIndex.__eq__
    with pytest.raises(CheckpointError, match="sets attributes of MetadataIndex"):
        unpickle_dcp_metadata(__import__("io").BytesIO(data), "crafted")
    assert MetadataIndex.__eq__ is eq and pickle.loads(pickle.dumps(MetadataIndex("a"))) == MetadataIndex("a")


# ---- the template of an export ---------------------------------------------------------------

HOSTILE_FILES = {
    "id_rsa": "PRIVATE KEY",
    "credentials": "[default]\naws_secret_access_key = x\n",
    "run.sh": "#!/bin/sh\nrm -rf ~\n",
    "evil.py": "import os\n",
    "README.md": "hi\n",
}


def record_source_dir(ck, source):
    path = os.path.join(ck, "iter_0000000", "megadiff.json")
    meta = json.load(open(path))
    meta["hf_source_dir"] = str(source)
    json.dump(meta, open(path, "w"))
    return meta


def hostile_dir(path, config=None, tokenizer_from=None):
    os.makedirs(path)
    for name, text in HOSTILE_FILES.items():
        (path / name).write_text(text)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer_from:
        shutil.copyfile(os.path.join(tokenizer_from, "tokenizer.json"), path / "tokenizer.json")
    return path


def test_recorded_source_dir_of_unrelated_files_exports_none_of_them(ck, tiny_hf, tmp_path):
    source = hostile_dir(tmp_path / "home", config={"model_type": "something_else"}, tokenizer_from=tiny_hf)
    record_source_dir(ck, source)
    lines = []
    out = convert_mcore_to_hf(ck, str(tmp_path / "hf"), progress=False, log=lines.append)
    files = set(os.listdir(out))
    assert not files & (set(HOSTILE_FILES) | {"tokenizer.json"}), files
    assert any("is not used: its config.json differs" in line for line in lines), lines
    assert (
        "remote code: megadiff's own configuration_llada2_moe.py, modeling_llada2_moe.py, sampler.py, editing.py"
        in lines
    )


def test_recorded_source_dir_with_a_matching_config_gives_only_allow_listed_files(ck, tiny_hf, tmp_path):
    meta = json.load(open(os.path.join(ck, "iter_0000000", "megadiff.json")))
    source = hostile_dir(tmp_path / "home", config=meta["hf_config"], tokenizer_from=tiny_hf)
    record_source_dir(ck, source)
    lines = []
    out = convert_mcore_to_hf(ck, str(tmp_path / "hf"), progress=False, log=lines.append)
    assert not set(os.listdir(out)) & set(HOSTILE_FILES)
    assert (
        f"files from {source} (recorded hf_source_dir {source} (its config.json matches the checkpoint's)): "
        "tokenizer.json" in lines
    )
    assert any(
        line.startswith(f"not copied from {source}") and "credentials, evil.py, id_rsa" in line for line in lines
    ), lines


def test_named_template_copies_the_allow_list_and_the_auto_map_modules(ck, tiny_hf, tmp_path):
    template = tmp_path / "template"
    shutil.copytree(tiny_hf, template)
    for name, text in HOSTILE_FILES.items():
        (template / name).write_text(text)
    (template / "modeling_llada2_moe.py").write_text(open(template / "modeling_llada2_moe.py").read() + "# edited\n")
    (template / "chat_template.jinja").write_text("{{ messages }}")
    lines = []
    out = convert_mcore_to_hf(ck, str(tmp_path / "hf"), hf_template=str(template), progress=False, log=lines.append)
    copied = next(line for line in lines if line.startswith(f"files from {template} (--hf-template): "))
    names = copied.split(": ", 1)[1].split(", ")
    expected = {
        "chat_template.jinja",
        "configuration_llada2_moe.py",
        "modeling_llada2_moe.py",
        "sampler.py",  # the modules modeling_llada2_moe.py imports from beside it (its generate())
        "editing.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } | ({"generation_config.json"} & set(os.listdir(tiny_hf)))
    assert set(names) == expected, names
    weights = {n for n in os.listdir(out) if n.endswith((".safetensors", ".index.json"))}
    assert set(os.listdir(out)) - {"config.json", "generation_config.json"} == (expected | weights) - {
        "generation_config.json"
    }
    assert (
        f"remote code from {template}, not megadiff's own: modeling_llada2_moe.py; trust_remote_code=True runs "
        "it, so check it before loading the model" in lines
    )


def test_export_and_sampler_refuse_a_link_out_of_the_checkpoint_even_trusted(ck, tmp_path, capsys):
    """A `.metadata` linked to a file elsewhere (here: one with a payload) is not even opened."""
    marker = tmp_path / "MARKER"
    os.makedirs(tmp_path / "elsewhere")
    hostile.move_outside_and_link(
        os.path.join(ck, "iter_0000000", ".metadata"), str(tmp_path / "elsewhere" / ".metadata")
    )
    hostile.plant_in_metadata(str(tmp_path / "elsewhere"), str(marker))
    assert export_cli(ck, tmp_path / "hf", "--trust-checkpoint") == 2
    assert (
        f".metadata: a link in the checkpoint directory resolves to {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    )
    generate = load_tool("generate")
    assert generate.main(["--model", ck, "--prompt", "hi", "--device", "cpu", "--trust-checkpoint"]) == 2
    assert "a link in the checkpoint directory resolves to" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("field", ["auto_map", "custom_pipelines"])
def test_export_drops_entries_naming_another_repositorys_code(ck, tiny_hf, tmp_path, field):
    """The recorded config names another repository's code (for one Auto class, or as a custom
    pipeline's impl) while the template has the modules of the others: the entry is dropped and
    named, not kept."""
    meta_path = os.path.join(ck, "iter_0000000", "megadiff.json")
    meta = json.load(open(meta_path))
    meta["hf_config"]["auto_map"] = {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
    }
    entry = hostile.plant_foreign_code(meta["hf_config"], field)
    json.dump(meta, open(meta_path, "w"))
    lines = []
    out = convert_mcore_to_hf(ck, str(tmp_path / "hf"), hf_template=tiny_hf, progress=False, log=lines.append)
    assert "evil-org" not in open(os.path.join(out, "config.json")).read()
    assert any(
        line.startswith("dropped auto_map / custom_pipelines entries naming code of another repository")
        and f"config.json: {entry}" in line
        for line in lines
    ), lines
