"""The converters' byte-copy engine: tensors moved as file byte ranges, never made tensors.

- `byte_spans`: a tensor as byte ranges of files (`Spans`), and row addresses the parameter
  table's transforms run on (`RowAddresses`).
- `span_copy`: output files written front to back from memory and from those ranges (O_DIRECT
  with read-ahead threads, or copy_file_range).
- `dcp_records`: torch.save records of a dist checkpoint written and parsed by hand (private
  torch DCP writer APIs, the record's zip layout).

Here, under megadiff, because megadiff.checkpoint (the lazy dist-checkpoint writer and the reader)
uses it and megadiff never imports checkpoint_converters. The plain path (safe_open / safetensors'
save, torch DCP's own FileSystemWriter and load) needs none of this package; the converters'
`--io` option picks the path (README, "Converters").
"""
