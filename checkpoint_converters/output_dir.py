"""Output directories that appear only when complete, and the non-weight files of an HF dir.

Every converter writes into `OUT.tmp-<nonce>` next to OUT and renames it to OUT at the end. An
exception or Ctrl-C removes the staging dir (a full disk is then reported as such, naming the file,
the disk and its free space: megadiff.files.disk_space); a hard kill leaves a `.tmp-` dir that
neither HF loaders (pointed at OUT) nor `latest_iteration` pick up, and that the next conversion to
OUT deletes once its writer (recorded in the nonce) is dead. Without `--overwrite` the final rename
claims OUT atomically (`rename_no_replace`): of two conversions racing to one OUT, the second to
finish fails instead of replacing the first one's output. `--overwrite` replaces OUT with
`megadiff.checkpoint.format.replace_dir`: at every moment OUT is the old or the new output. It
replaces only an empty dir or an earlier output of the same kind (`output_kind`): a mistyped
`--output` naming a dir of the user's files is refused, not deleted.

An output never overlaps an input (megadiff.files.outputs), files copied from an input dir never
come from outside it (megadiff.files.inside), and a config written out names no remote code of
another repository (`drop_foreign_code`).
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence

from megadiff.checkpoint.format import (
    BACKUP_MARK,
    ITER_NAME,
    STAGING_MARK,
    TRACKER_NAME,
    fsync_dir,
    owner_is_dead,
    remove_tree,
    rename_no_replace,
    replace_dir,
    restore_interrupted_replace,
    staging_path,
)
from megadiff.errors import CheckpointError
from megadiff.files.disk_space import disk_full_error
from megadiff.files.inside import check_links_inside
from megadiff.files.outputs import overlap
from megadiff.hf.remote_code import AUTO_MAP, REMOTE_CODE_FILES, remote_code_source
from megadiff.models.registry import family_for_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp")


def clean_stale_leftovers(output: str, log: Callable[[str], None] = print) -> list[str]:
    """Delete the `OUT.tmp-*` / `OUT.old-*` dirs next to OUT whose writer is dead (after putting an
    interrupted --overwrite's old copy back at OUT). Returns what was removed; others are named."""
    restored = restore_interrupted_replace(output)
    if restored:
        log(f"note: restored {output} from {restored} (a replace of it was interrupted)")
    parent, base = os.path.split(output)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        if not (name.startswith(base + STAGING_MARK) or name.startswith(base + BACKUP_MARK)):
            continue
        path = os.path.join(parent, name)
        if owner_is_dead(path):
            remove_tree(path)
            removed.append(path)
        else:
            log(
                f"note: {path} is left from another conversion to {output} (still running, or from another "
                f"host or an older megadiff); delete it yourself once nothing writes it"
            )
    if removed:
        log(f"removed {len(removed)} leftover(s) of interrupted conversions: {', '.join(removed)}")
    return removed


# What each kind of output dir looks like; `--overwrite` replaces nothing else.
OUTPUT_KINDS = {
    "mcore": "megatron checkpoint directory (latest_checkpointed_iteration.txt or iter_*)",
    "hf": "Hugging Face model directory (config.json and weights)",
}


def output_kind(path: str) -> str | None:
    """'mcore' or 'hf' when the dir `path` looks like that kind of output (see OUTPUT_KINDS), else None."""
    names = os.listdir(path)
    if TRACKER_NAME in names or any(ITER_NAME.match(n) for n in names):
        return "mcore"
    if "config.json" in names and any(is_weight_file(n) for n in names):
        return "hf"
    return None


def check_replaceable(output: str, kind: str) -> None:
    """--overwrite of an existing dir OUT: refuse unless it is empty or an earlier `kind` output
    (a dir of the user's files behind a mistyped --output would be deleted), naming what is in it."""
    names = sorted(os.listdir(output))
    found = output_kind(output) if names else kind
    if found == kind:
        return
    what = f"a {OUTPUT_KINDS[found]}" if found else "neither"
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    raise CheckpointError(
        f"{output}: --overwrite replaces only an empty directory or an earlier {OUTPUT_KINDS[kind]}, and this is "
        f"{what}: {names[0]}{more} is in the way; choose another output directory, or empty it yourself"
    )


def check_output_dir(
    output: str, overwrite: bool, inputs: Sequence[str] = (), log: Callable[[str], None] = print, *, kind: str
) -> str:
    """Refuse an existing OUT without --overwrite (with it, one that is not empty or an earlier
    `kind` output: `check_replaceable`), and an OUT that is (or contains) an input. Leftovers of
    interrupted conversions to OUT are cleaned first (`clean_stale_leftovers`)."""
    output = os.path.abspath(output)
    for src in inputs:
        how = overlap(output, src)
        if how:
            raise CheckpointError(
                f"{output}: output overlaps the input {os.path.realpath(src)} (it {how} it); a conversion never "
                f"writes over or into its input, so choose another output directory"
            )
    if os.environ.get("RANK", "0") == "0":  # one cleaner per conversion (ranks of one torchrun share OUT)
        clean_stale_leftovers(output, log)
    if os.path.exists(output) and not overwrite:
        raise CheckpointError(f"{output}: already exists; pass --overwrite to replace it")
    if os.path.exists(output) and not os.path.isdir(output):
        raise CheckpointError(f"{output}: exists and is not a directory")
    if os.path.isdir(output):
        check_replaceable(output, kind)
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: parent directory of the output does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent}: not writable")
    return output


def publish(staging: str, output: str, overwrite: bool = True) -> None:
    """Put a finished staging dir at `output`: atomically replacing an existing one (`overwrite`),
    or claiming the name atomically (else; CheckpointError when another conversion wrote `output`
    meanwhile: this one's staging dir is deleted, the other's output kept)."""
    fsync_dir(staging)
    if overwrite:
        replace_dir(staging, output)
        return
    try:
        rename_no_replace(staging, output)
    except FileExistsError:
        remove_tree(staging)
        raise CheckpointError(
            f"{output}: another conversion wrote it while this one ran; its output is kept and this one's "
            f"discarded (pass --overwrite to replace it)"
        ) from None
    fsync_dir(os.path.dirname(os.path.abspath(output)))


@contextlib.contextmanager
def staged_output(output: str, nonce: str | None = None, overwrite: bool = True) -> Iterator[str]:
    """Yield a fresh staging dir next to `output`; publish it on success (`publish`), delete it on
    failure (a full disk raises NoSpaceError, after the deletion)."""
    staging = staging_path(output, nonce)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException as e:
        remove_tree(staging)
        full = disk_full_error(output, e)
        if full is not None:
            raise full from e
        raise
    publish(staging, output, overwrite)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_non_weight_files(src: str, dst: str, skip: Sequence[str] = ()) -> list[str]:
    """Copy the top-level regular files of `src` that are not weights or weight indexes (config,
    tokenizer, remote code, generation config, README, ...), none of them a link out of `src`.
    Returns the names copied."""
    check_links_inside(src, "input directory")
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in skip or name.startswith(".") or is_weight_file(name) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def ensure_remote_code(out_dir: str, config: dict) -> list[str]:
    """Make the model classes of `config['auto_map']` loadable from `out_dir`: when a module they
    name is missing (or there is no auto_map), use megadiff's own LLaDA2 remote code for them (other
    entries, e.g. a tokenizer's, are kept). Returns the files copied. A family megadiff has no
    remote code for (LLaDA, LLaDA-MoE: their code comes with the template) gets none."""
    if not family_for_config(config, os.path.join(out_dir, "config.json")).hf_format.remote_code:
        return []
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    model_entries = [v for k, v in auto_map.items() if k == "AutoConfig" or k.startswith("AutoModel")]
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in model_entries if isinstance(v, str)}
    if model_entries and all(os.path.isfile(os.path.join(out_dir, m + ".py")) for m in modules):
        return []
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(remote_code_source(name), os.path.join(out_dir, name))
    config["auto_map"] = {k: v for k, v in auto_map.items() if not (k == "AutoConfig" or k.startswith("AutoModel"))}
    config["auto_map"].update(AUTO_MAP)
    return list(REMOTE_CODE_FILES)


def _refs(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def drop_foreign_code(config: dict) -> list[str]:
    """Remove from `config` (in place) every entry of a field that transformers resolves to dynamic
    code (`get_class_from_dynamic_module`) that names code in another repository
    (`org/repo--module.Class`): `auto_map` (the Auto classes of config.json, tokenizer_config.json,
    preprocessor_config.json, processor_config.json, ...) and `custom_pipelines[task]["impl"]`
    (config.json; `pipeline()`). With `trust_remote_code=True` the output would download and run
    that repository's code, which nobody looked at. Returns the entries dropped, as
    `Key -> reference` (`custom_pipelines.TASK.impl -> reference` for a pipeline)."""
    dropped = []
    auto_map = config.get("auto_map")
    for key, value in list(auto_map.items()) if isinstance(auto_map, dict) else []:
        if any(_foreign(ref) for ref in _refs(value)):
            dropped.append(f"{key} -> {', '.join(str(r) for r in _refs(value) if r)}")
            del auto_map[key]
    pipelines = config.get("custom_pipelines")
    for task, info in list(pipelines.items()) if isinstance(pipelines, dict) else []:
        impl = info.get("impl") if isinstance(info, dict) else None
        if _foreign(impl):
            dropped.append(f"custom_pipelines.{task}.impl -> {impl}")
            del pipelines[task]  # a pipeline entry without its impl is refused by transformers
    return dropped


def _foreign(ref) -> bool:
    """A class reference to code of another repository (`org/repo--module.Class`)."""
    return isinstance(ref, str) and "--" in ref


def _is_model_entry(key: str) -> bool:
    return key == "AutoConfig" or key.startswith("AutoModel")


# The JSON files of an HF dir whose `auto_map` (and config.json's custom_pipelines) transformers
# resolves to dynamic code: the config, the tokenizer, the processor / image / feature / video processor.
CODE_NAMING_FILES = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


def drop_foreign_code_files(staging: str, names=CODE_NAMING_FILES) -> tuple[list[str], list[str]]:
    """`drop_foreign_code` on the JSON files `names` of an HF output dir being written, rewriting
    only those it changes; a config.json whose model classes lost their entry gets megadiff's own
    remote code (`ensure_remote_code`). Returns (entries dropped, as `file: Key -> reference`;
    megadiff remote-code files written)."""
    dropped, megadiff_code = [], []
    for name in names:
        path = os.path.join(staging, name)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        gone = drop_foreign_code(data) if isinstance(data, dict) else []
        if not gone:
            continue
        if name == "config.json" and any(_is_model_entry(d.split(" -> ")[0]) for d in gone):
            megadiff_code = ensure_remote_code(staging, data)
        write_json(path, data)
        dropped += [f"{name}: {d}" for d in gone]
    return dropped, megadiff_code


def write_output_config(staging: str, config: dict) -> tuple[list[str], list[str]]:
    """Write `staging/config.json` of an HF output dir from `config`: auto_map and custom_pipelines
    entries naming another repository's code dropped (`drop_foreign_code`, also from the
    tokenizer/processor configs already in `staging`), megadiff's own remote code for the model classes whose modules are
    missing (`ensure_remote_code`). Returns (entries dropped; megadiff remote-code files written)."""
    dropped = [f"config.json: {d}" for d in drop_foreign_code(config)]
    megadiff_code = ensure_remote_code(staging, config)
    write_json(os.path.join(staging, "config.json"), config)
    others = [n for n in CODE_NAMING_FILES if n != "config.json"]
    return dropped + drop_foreign_code_files(staging, others)[0], megadiff_code


def foreign_code_note(dropped: list[str]) -> str:
    """The export report's line for `write_output_config`'s dropped entries."""
    return (
        f"dropped auto_map / custom_pipelines entries naming code of another repository (trust_remote_code=True "
        f"would download and run it): {'; '.join(dropped)}"
    )


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
