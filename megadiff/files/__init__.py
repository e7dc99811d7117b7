"""The files megadiff reads and writes in directories a user names, handled as one class.

- `inside`: every file read from a checkpoint, model, tokenizer or template dir resolves (after
  following its links) inside that dir, so a received dir cannot make a tool read, copy or unpickle
  a file elsewhere on the machine;
- `outputs`: no tool writes over its own inputs, and files written into a named dir are never
  written through a link or a second name planted there;
- `disk_space`: a write that fails on a full disk names the file, the disk and its free space.
"""
