"""Continued-pretraining data: fixed-length samples of Megatron indexed datasets, blended by weight,
served as rows of packed documents for the diffusion trainer.

Samples come from megatron-core's BlendedMegatronDatasetBuilder + GPTDataset (`build_gpt_datasets`):
S tokens each, cut across document boundaries (a sample may start or end inside a document), no label
shift (add_extra_token_to_sequence=False); megatron-core honours the blend's weights and the split and
caches its sample indices in the run's index cache dir. `data.mock` uses its MockGPTDataset instead.
`PretrainDataset` turns sample g into a row in packing.py's layout:

    input_ids    the sample's tokens
    doc_ids      0, 1, ...: a document ends at (and includes) its EOD token
    position_ids 0.. restarting at each document (megatron-core's reset_position_ids rule)
    loss_mask    True on every token: each is a diffusion target (pretraining has no prompt)
    sample_ids   g * S + the column where the document starts: one key per document of the run,
                 from which it draws its own noise (megadiff.diffusion.noising), whatever the layout

Order contract (as the SFT dataset's): global batch k is samples [k*G, (k+1)*G) of the split; rank r
takes rows [r*G/dp, (r+1)*G/dp) of it, in micro-batches of B consecutive rows. The state is the number
of samples consumed by finished global batches, so a run resumes at the next global sample, at the
same or another data-parallel size.
"""

import warnings
from collections.abc import Iterator

import torch

from megadiff.data.dataset import check_batch_split
from megadiff.data.packing import collate_rows
from megadiff.data.rows import DataError
from megadiff.platform.dataset_helpers import ensure_dataset_helpers


def document_row(tokens: torch.Tensor, eod_id: int, sample_index: int) -> dict:
    """The row dict (module docstring) of one [S] sample. Ids < 0 (megatron-core's padding of a
    short last validation sample) become fill: their own document, no loss, sample id -1."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    seq_len = tokens.shape[0]
    fill = tokens < 0
    eod = (tokens == eod_id) | (fill & ~torch.roll(fill, 1))  # the token before the fill closes a document
    eod[-1] = True
    starts = torch.zeros(seq_len, dtype=torch.bool)
    starts[0] = True
    starts[1:] = eod[:-1]
    column = torch.arange(seq_len)
    start = torch.cummax(torch.where(starts, column, 0), dim=0).values
    doc_ids = torch.cumsum(starts.long(), dim=0) - 1
    return {
        "input_ids": torch.where(fill, torch.full_like(tokens, eod_id), tokens),
        "position_ids": column - start,
        "doc_ids": doc_ids,
        "loss_mask": ~fill,
        "sample_ids": torch.where(fill, torch.full_like(tokens, -1), sample_index * seq_len + start),
    }


class PretrainDataset:
    """Rows of one split's samples served as micro-batches for one data-parallel rank (module
    docstring). `samples[g]` returns sample g's [S] token ids (see `GPTSamples`)."""

    def __init__(
        self,
        samples,
        *,
        eod_id: int,
        max_seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int = 1,
        dp_rank: int = 0,
    ):
        check_batch_split(global_batch_size, micro_batch_size, dp_size, dp_rank)
        self.samples = samples
        self.eod_id = eod_id
        self.max_seq_len = max_seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.accumulation_steps = global_batch_size // (micro_batch_size * dp_size)
        self.consumed_samples = 0

    @property
    def steps_available(self) -> int:
        return len(self.samples) // self.global_batch_size

    def row(self, index: int) -> dict:
        tokens = self.samples[index]
        if len(tokens) != self.max_seq_len:
            raise DataError(f"sample {index} has {len(tokens)} tokens, expected data.max_seq_len={self.max_seq_len}")
        return document_row(tokens, self.eod_id, index)

    def rows_batch(self, indices) -> dict:
        batch = collate_rows([self.row(i) for i in indices])
        batch["epoch"] = torch.zeros(len(indices), dtype=torch.long)  # every sample index is used once
        return batch

    def global_batch(self, epoch: int, batch_index: int) -> dict:
        """Global batch `batch_index` as one [G, S] batch (for checks and tests; epoch is always 0)."""
        if epoch != 0:
            raise IndexError("pretraining samples have no epochs: megatron-core's index already repeats the data")
        G = self.global_batch_size
        return self.rows_batch(range(batch_index * G, (batch_index + 1) * G))

    def __iter__(self) -> Iterator[dict]:
        """This rank's micro-batches, from the current state on."""
        G, B = self.global_batch_size, self.micro_batch_size
        per_rank = G // self.dp_size
        while True:
            if self.consumed_samples + G > len(self.samples):
                raise DataError(
                    f"the dataset holds {len(self.samples)} samples, fewer than the {self.consumed_samples + G} "
                    f"this run asks for; megatron-core built it for another train.steps or global_batch_size"
                )
            first = self.consumed_samples + self.dp_rank * per_rank
            for j in range(self.accumulation_steps):
                batch = self.rows_batch(range(first + j * B, first + (j + 1) * B))
                if j == self.accumulation_steps - 1:  # the step is done once its last micro-batch is out
                    self.consumed_samples += G
                yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        if "consumed_samples" not in state:
            raise DataError(f"the checkpoint's data state {state} is not a pretraining one (data.blend / data.mock)")
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= len(self.samples) or consumed % self.global_batch_size:
            raise DataError(
                f"the checkpoint consumed {consumed} samples, which is not a whole number of global batches of "
                f"{self.global_batch_size} within this dataset's {len(self.samples)} samples"
            )
        self.consumed_samples = consumed


# ---- megatron-core's datasets ----------------------------------------------------------------


class TokenizerFacts:
    """What megatron-core's GPTDataset asks of a tokenizer: the vocabulary size, the EOD id, a pad id
    (-1: no real token is ever taken for padding and rewritten) and identifiers for its cache key."""

    pad = -1

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "megadiff.data.pretrain.TokenizerFacts", "vocab_size": self.vocab_size, "eod": self.eod}


class GPTSamples:
    """Sample g of a megatron-core GPTDataset / BlendedDataset as its [S] token ids."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index]["tokens"]


def build_gpt_datasets(
    blend: tuple[list[str], list[float] | None] | None,
    split: str,
    seq_len: int,
    seed: int,
    vocab_size: int,
    eod_id: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | None,
):
    """(train, valid) sample sources (GPTSamples; valid None without a valid split or samples) from
    megatron-core's builder; `blend` None builds its mock datasets. Collective under torch.distributed:
    rank 0 builds the index cache first, the others then read it."""
    ensure_dataset_helpers()  # megatron-core's compiled index builders, or a NumPy stand-in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's import-time notes about TE / apex
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=TokenizerFacts(vocab_size, eod_id),
        reset_position_ids=True,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    sizes = [train_samples, valid_samples, 0]
    cls = MockGPTDataset if blend is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return GPTSamples(train), (GPTSamples(valid) if valid is not None and valid_samples else None)
