"""Which files of an HF template dir an export copies (when a checkpoint's recorded
`hf_source_dir` may serve as that template: megadiff.checkpoint.hf_source).

An export adds tokenizer, generation config, chat template and remote code to the weights. They
come from a template dir: the one the user names (`--hf-template`), else the HF dir the checkpoint
was converted or trained from, recorded in its megadiff.json. A received checkpoint controls that
record, so it is used only when the directory's config.json equals the model config recorded in
the checkpoint (it is then the model's own HF dir, or one just like it), and from any template
only an allow-list is copied, never whatever else lies there (keys, credentials, scripts).
"""

import os
import re
import shutil

from megadiff.checkpoint.hf_source import read_json_or_none
from megadiff.files.inside import check_links_inside

TEMPLATE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def auto_map_modules(*configs: dict) -> list[str]:
    """The remote-code files ('modeling_x.py') that `auto_map` entries of these configs name in the
    same directory ('modeling_x.Class'; 'repo--modeling_x.Class' lives in another repo: skipped)."""
    modules = set()
    for config in configs:
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            for ref in value if isinstance(value, (list, tuple)) else [value]:  # AutoTokenizer: [slow, fast]
                if isinstance(ref, str) and "--" not in ref and "." in ref:
                    module = ref.rsplit(".", 1)[0]
                    if _MODULE.match(module):
                        modules.add(module + ".py")
    return sorted(modules)


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import", re.M)


def with_relative_imports(template: str, modules: list[str]) -> list[str]:
    """`modules` and, transitively, the same-directory modules they import (`from .sampler import`),
    as transformers loads them: a modeling file without its companions does not load."""
    found, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        path = os.path.join(template, name)
        if name in found or not os.path.isfile(path):
            continue
        found.add(name)
        with open(path, encoding="utf-8", errors="replace") as f:
            todo += [m + ".py" for m in _RELATIVE_IMPORT.findall(f.read())]
    return sorted(found)


def copy_template_files(template: str, dst: str, config: dict) -> tuple[list[str], list[str]]:
    """Copy the allow-listed files of `template` and the remote-code modules that the output
    `config`'s (or the template tokenizer's) auto_map names, with the modules they import from
    beside them, none of them a link out of `template`. Returns (copied, left out)."""
    check_links_inside(template, "template directory")
    tokenizer_config = read_json_or_none(os.path.join(template, "tokenizer_config.json"))
    modules = with_relative_imports(template, auto_map_modules(config, tokenizer_config or {}))
    wanted = set(TEMPLATE_FILES) | set(modules)
    copied, left_out = [], []
    for name in sorted(os.listdir(template)):
        path = os.path.join(template, name)
        if not os.path.isfile(path) or name == "config.json":
            continue
        if name in wanted:
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
        elif not name.endswith((".safetensors", ".index.json")):
            left_out.append(name)
    return copied, left_out
