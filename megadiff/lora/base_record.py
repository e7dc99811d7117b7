"""The base checkpoint a LoRA run's adapters apply to: where it is, and a fingerprint of it.

An adapter-only checkpoint holds no base weight, so it means something only together with the
base it was trained on. It records that base (`BaseRecord`: kind, path, the config field that names
it, fingerprint), and every load compares the fingerprint with the base at hand before any weight
is read (`check_same_base`).

The fingerprint must be cheap for a 100B model and change when the base changes, so it hashes
what identifies the weights without reading them:
- an HF dir (`model.hf_dir`): config.json (parsed, so whitespace does not count), the header of
  every safetensors file (each tensor's name, dtype, shape and byte range) and the first
  `SAMPLE_BYTES` bytes of every tensor's data. An HF dir records nothing about when it was
  written, and a fine-tune of the same model has the same config and the same headers; its weights
  differ everywhere, so a few bytes of each tensor tell the two apart (one small read per tensor:
  about 24k reads for the 100B flash model, well under a second from a local disk).
- a megatron checkpoint (`model.init_from_mcore`): its megadiff.json (model config, layout,
  iteration and `saved_at`, written once per save) and torch DCP's `.metadata` (every tensor's
  key, shape and storage). Every save writes a new megadiff.json, so a retrained or re-converted
  base never matches, and a copied or moved checkpoint still does.
Neither hashes all weights (hundreds of GB). What they cannot see: an HF file edited in place past
the first bytes of each tensor without touching its header.
"""

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass

from megadiff.checkpoint import format as fmt
from megadiff.errors import CheckpointError

SAMPLE_BYTES = 64
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
KINDS = {"hf": "model.hf_dir", "mcore": "model.init_from_mcore"}  # kind -> the config field naming it


@dataclass(frozen=True)
class BaseRecord:
    """The base weights of a LoRA run: `kind` "hf" or "mcore", its absolute `path`, the config
    `field` that names it, and its `fingerprint` ("sha256:<hex>")."""

    kind: str
    path: str
    fingerprint: str

    @property
    def field(self) -> str:
        return KINDS[self.kind]

    def to_dict(self) -> dict:
        return {**asdict(self), "field": self.field}

    @classmethod
    def from_dict(cls, value, where: str) -> "BaseRecord":
        """The record stored in a checkpoint's megadiff.json (`where` names it in errors)."""
        ok = isinstance(value, dict) and value.get("kind") in KINDS
        ok = ok and all(isinstance(value.get(k), str) and value.get(k) for k in ("path", "fingerprint"))
        if not ok:
            raise CheckpointError(
                f"{where}: lora.base must be {{kind: hf|mcore, path, fingerprint}}, got {value!r}; "
                f"the checkpoint's metadata is damaged"
            )
        return cls(value["kind"], value["path"], value["fingerprint"])

    def describe(self) -> str:
        return f"{self.path} ({self.field}, fingerprint {self.fingerprint[:19]}...)"


def base_of_run(hf_dir: str | None, init_from_mcore: str | None) -> BaseRecord:
    """The base of a run whose initial weights come from `init_from_mcore` when set, else from the
    HF `hf_dir` (as megadiff.training.setup loads them)."""
    if init_from_mcore:
        path = fmt.resolve_checkpoint_dir(init_from_mcore)  # the iteration dir actually loaded
        adapter_only = fmt.adapter_only_error(path, fmt.read_meta(path), "the base of a LoRA run")
        if adapter_only:
            raise adapter_only
        return BaseRecord("mcore", path, mcore_fingerprint(path))
    if not hf_dir:
        raise CheckpointError("a LoRA run needs its base weights: set model.hf_dir or model.init_from_mcore")
    path = os.path.abspath(hf_dir)
    return BaseRecord("hf", path, hf_fingerprint(path))


def record_at(kind: str, path: str) -> BaseRecord:
    """The record of the base of kind `kind` at `path` now (fingerprint computed)."""
    if kind == "mcore":
        path = fmt.resolve_checkpoint_dir(path)
        return BaseRecord("mcore", path, mcore_fingerprint(path))
    return BaseRecord("hf", os.path.abspath(path), hf_fingerprint(path))


def check_same_base(recorded: BaseRecord, current: BaseRecord, ckpt_dir: str, fix: str) -> None:
    """Raise naming both bases when the adapters of `ckpt_dir` (trained on `recorded`) would be
    put on another base (`current`); `fix` says what to do. A base that only moved (same
    fingerprint) is fine."""
    if recorded.kind == current.kind and recorded.fingerprint == current.fingerprint:
        return
    raise CheckpointError(
        f"{ckpt_dir}: its LoRA adapters were trained on the base {recorded.describe()}, not on "
        f"{current.describe()}: another model. To go on, {fix}"
    )


def check_base_exists(recorded: BaseRecord, ckpt_dir: str, override: str) -> None:
    """Raise when the recorded base is gone; `override` says how to name its new place."""
    if os.path.exists(recorded.path):
        return
    raise CheckpointError(
        f"{ckpt_dir}: its LoRA adapters apply to the base {recorded.path} (megadiff.json lora.base.path), "
        f"which does not exist; an adapter checkpoint holds no base weights. If the base moved, {override}"
    )


# ---- fingerprints -------------------------------------------------------------------------------


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def hf_weight_files(hf_dir: str) -> list[str]:
    """The safetensors files of an HF dir: those its index lists, or the single model.safetensors."""
    index = os.path.join(hf_dir, HF_INDEX)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' entries")
        return sorted(set(weight_map.values()))
    if os.path.isfile(os.path.join(hf_dir, HF_SINGLE)):
        return [HF_SINGLE]
    raise CheckpointError(f"{hf_dir}: neither {HF_INDEX} nor {HF_SINGLE} found (not an HF model dir)")


def _hash_safetensors(h, path: str) -> None:
    """Feed `h` the header of one safetensors file and the first SAMPLE_BYTES of each tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (length,) = struct.unpack("<Q", raw)
            header_bytes = f.read(length)
            try:
                header = json.loads(header_bytes)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
            h.update(header_bytes)
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                f.seek(8 + length + begin)
                h.update(f.read(min(SAMPLE_BYTES, end - begin)))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: listed in the model's index but missing") from None


def hf_fingerprint(hf_dir: str) -> str:
    """sha256 of config.json, the safetensors headers and a sample of each tensor (module docstring)."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: model directory not found")
    h = hashlib.sha256(b"megadiff-base-hf-v1\0")
    h.update(_canonical(_read_json(os.path.join(hf_dir, "config.json"))))
    for name in hf_weight_files(hf_dir):
        h.update(name.encode() + b"\0")
        _hash_safetensors(h, os.path.join(hf_dir, name))
    return "sha256:" + h.hexdigest()


def mcore_fingerprint(ckpt_dir: str) -> str:
    """sha256 of a complete iteration dir's megadiff.json and DCP .metadata (module docstring)."""
    h = hashlib.sha256(b"megadiff-base-mcore-v1\0")
    h.update(_canonical(fmt.read_meta(os.path.join(ckpt_dir, fmt.META_NAME))))
    try:
        with open(os.path.join(ckpt_dir, fmt.DCP_METADATA_NAME), "rb") as f:
            h.update(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: {fmt.DCP_METADATA_NAME} missing (not a torch_dist checkpoint)") from None
    return "sha256:" + h.hexdigest()
