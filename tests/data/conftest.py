import pytest

from megadiff.hf.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
