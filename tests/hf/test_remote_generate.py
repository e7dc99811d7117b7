"""megadiff's remote code (written beside every model megadiff makes) has the LLaDA2 model card's
`generate()`, giving tools/generate.py's tokens, without megadiff installed; a `--peft-adapter`
export loads as a PeftModelForCausalLM whose generate() decodes with the adapters on."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megadiff.hf.checkpoint_reader import read_hf_config
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, encode_prompt, generate, load_model
from megadiff.lora.peft_format import to_peft, write_peft_adapter
from megadiff.seeding import stable_seed
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODE = dict(gen_length=16, block_length=8, steps=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model_dir(str(tmp_path_factory.mktemp("remote") / "tiny"), seed=3)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, tokenizer, tokenizer.convert_tokens_to_ids("<|mask|>"), tokenizer.eos_token_id


def remote_model(model_dir):
    """The model as a user loads it. In this process megadiff has registered its own class for
    llada2_moe, which transformers then prefers: the same file as the dir's remote code (the
    subprocess test below loads the dir's copy, with megadiff unimportable)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()


@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=0.9, top_k=20, seed=5), dict(editing_threshold=0.0, max_post_steps=2)],
    ids=["greedy", "sampled", "editing"],
)
def test_remote_generate_gives_the_samplers_tokens_for_a_padded_batch(tiny, options):
    model_dir, tokenizer, mask_id, eos_id = tiny
    prompts = [encode_prompt(text, tokenizer) for text in ("Hi", "Ann has 2 cups and gets 3 more. How many?")]
    width = max(map(len, prompts))
    inputs = torch.tensor([[eos_id] * (width - len(p)) + p for p in prompts])  # left-padded, as tokenizers do
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = remote_model(model_dir).generate(inputs=inputs, attention_mask=mask, **DECODE, **options)
    expected = generate(load_model(model_dir), prompts, DecodingOptions(**DECODE, **options), mask_id, eos_id)
    for row, tokens in enumerate(expected.tokens):
        assert out[row, : len(tokens)].tolist() == tokens and set(out[row, len(tokens) :].tolist()) <= {eos_id}
    assert out.shape == (2, max(map(len, expected.tokens)))


@pytest.mark.slow  # three processes; stack (b) runs it too: its transformers loads remote code differently
def test_remote_generate_equals_tools_generate_without_megadiff_installed(tiny, tmp_path):
    """On an export (HF -> megatron -> HF, its remote code copied from the source dir; the tools
    run in their own processes, as a user runs them), loaded where megadiff cannot be imported."""
    source_dir, tokenizer, mask_id, eos_id = tiny
    model_dir = str(tmp_path / "hf")
    for tool, args in (
        ("convert_hf_to_mcore.py", ["--hf-dir", source_dir, "--output", tmp_path / "ck"]),
        ("convert_mcore_to_hf.py", ["--mcore-dir", tmp_path / "ck", "--output", model_dir]),
    ):
        proc = subprocess.run([sys.executable, f"tools/{tool}", *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, env=worker_env())  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"modeling_llada2_moe.py", "sampler.py", "editing.py"} <= set(os.listdir(model_dir))
    text = "Ann has 2 cups and gets 3 more. How many cups does Ann have?"
    # what tools/generate.py --prompt TEXT decodes (tests/tools/test_editing_cli.py holds the CLI to
    # this library call): the chat-templated prompt through megadiff.inference.generate
    prompt_ids = encode_prompt(text, tokenizer)
    from_cli = generate(load_model(model_dir), [prompt_ids], DecodingOptions(**DECODE), mask_id, eos_id).tokens[0]
    script = (
        "import json, sys, torch\n"
        "sys.modules['megadiff'] = None  # any import of megadiff fails, as on a machine without it\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = torch.tensor([json.loads(sys.argv[2])])\n"
        "print(type(model).__module__)\n"
        "print(json.dumps(model.generate(inputs=ids, gen_length=16, block_length=8, steps=8)[0].tolist()))\n"
    )
    prompt = json.dumps(prompt_ids)
    alone = subprocess.run(
        [sys.executable, "-c", script, model_dir, prompt],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=worker_env(),
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    module, tokens = alone.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.") and json.loads(tokens) == from_cli


def test_sampler_row_seed_is_megadiffs_stable_seed():
    from megadiff.inference.sampler import row_seed

    assert all(row_seed(s, r) == stable_seed(s, r) for s in (0, 1, 12345) for r in (0, 1, 7, 10**6))


def test_peft_adapter_export_loads_for_causal_lm_and_generates_with_the_adapters(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    from tests.lora.peft_reference import merged_reference, random_full_adapter

    model_dir, tokenizer, mask_id, eos_id = tiny
    lora = dict(
        rank=4, alpha=8.0, dropout=0.0, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    lora |= dict(experts=False, init="kaiming", seed=0)
    full = random_full_adapter(lora, read_hf_config(model_dir), seed=1)
    state, adapter_config = to_peft(full, lora, read_hf_config(model_dir), base_model_name_or_path=model_dir)
    adapter_dir = write_peft_adapter(str(tmp_path / "adapter"), state, adapter_config)
    assert json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())["task_type"] == "CAUSAL_LM"
    with_adapter = peft.PeftModel.from_pretrained(remote_model(model_dir), adapter_dir).eval()
    assert isinstance(with_adapter, peft.PeftModelForCausalLM)
    prompt = encode_prompt("Hi", tokenizer)
    out = with_adapter.generate(inputs=torch.tensor([prompt]), **DECODE)[0].tolist()
    merged = generate(merged_reference(model_dir, full, lora, read_hf_config(model_dir)), [prompt],
                      DecodingOptions(**DECODE), mask_id, eos_id)  # fmt: skip
    plain = generate(load_model(model_dir), [prompt], DecodingOptions(**DECODE), mask_id, eos_id)
    assert out == merged.tokens[0] != plain.tokens[0]  # the adapters decode, and they change the answer
