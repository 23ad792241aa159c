"""CORE (docs/numerics.md#core): prompts, seeds, spans, hand-computed scores, bundle files, the downloader,
base_eval's CLI and the in-training hook."""

import csv
import io
import json
import math
import os
import random
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fault_server import FaultServer
from helpers import communicate_all
from test_base_train import argv as train_argv
from test_base_train import data  # noqa: F401  (module fixture: parquet shards + a 320-token tokenizer)
from xla_flags import cpu_devices_flags

from nanochat_jax.download import DownloadError
from nanochat_jax.evals import core, core_tasks
from nanochat_jax.evals.core_tasks import CoreDataError, TaskSpec

# The real CORE task files, where a machine has them: NANOCHAT_CORE_DATA=DIR (DIR/eval_data/...).
SHARED_CORE = Path(os.environ.get("NANOCHAT_CORE_DATA", "/nonexistent"))
V = 128  # the char tokenizer's vocab: ASCII, BOS = 0


class CharTok:
    """One token per ASCII char, BOS = 0; `merges` maps a string to one extra token id."""

    bos_token_id = 0

    def __init__(self, merges=None):
        self.merges = merges or {}

    def _one(self, text):
        out, i = [], 0
        while i < len(text):
            for m, tid in self.merges.items():
                if text.startswith(m, i):
                    out.append(tid)
                    i += len(m)
                    break
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def encode(self, text, prepend=None):
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self._one(text)
        return [head + self._one(t) for t in text]


# ---- a bigram "model" whose preferences are known: logits[t] = W[token[t]] -----------------

BOOST = 4.0
PREFS = {" ": "b", "b": "a", "y": " ", "a": " "}  # after ' ' it expects 'b', after 'b' 'a', ...
W = np.zeros((V, V), np.float32)
for prev, nxt in PREFS.items():
    W[ord(prev), ord(nxt)] = BOOST
L_HIT = math.log(V - 1 + math.exp(BOOST)) - BOOST  # CE of the preferred next char
L_MISS = math.log(V - 1 + math.exp(BOOST))  # CE of any other char after a char with a preference
L_FLAT = math.log(V)  # CE after a char with no preference


def bigram_scorer(**kw):
    w = jnp.asarray(W)
    return core.logits_scorer(lambda tokens: w[tokens], **kw)


MC_ITEMS = [  # the model picks 'b' after ' ', 'bz' over 'a', and 'ba' over 'bb'
    {"query": "q", "choices": ["a", "b", "c", "d"], "gold": 1},  # right
    {"query": "q", "choices": ["a", "b", "c", "d"], "gold": 0},  # wrong
    {"query": "q", "choices": ["bz", "a"], "gold": 0},  # right: mean (L_HIT + L_MISS)/2 < L_MISS
    {"query": "q", "choices": ["ba", "bb"], "gold": 1},  # wrong: common prefix 'b', then 'a' is preferred
]
SCHEMA_ITEMS = [  # 'y' is followed by ' ' (the common suffix " zz" starts there), 'x' is not
    {"context_options": ["x", "y"], "continuation": "zz", "gold": 1},
    {"context_options": ["x", "y"], "continuation": "zz", "gold": 0},
    {"context_options": ["y", "x"], "continuation": "zz", "gold": 0},
]
LM_ITEMS = [  # argmax must give ' ' after the context and then the continuation
    {"context": "a", "continuation": "b"},  # right
    {"context": "a", "continuation": "bb"},  # wrong: after 'b' comes 'a'
    {"context": "c", "continuation": "b"},  # wrong: nothing preferred after 'c' (argmax = 0)
    {"context": " a ", "continuation": "b"},  # right: the context is trimmed
]
FIXTURE = {  # label: (type, uri, K, delimiter, baseline %, items)
    "mc_task": ("multiple_choice", "mc/mc.jsonl", 1, " ", 25.0, MC_ITEMS),
    "schema_task": ("schema", "schema.jsonl", 0, " ", 50.0, SCHEMA_ITEMS),
    "lm_task": ("language_modeling", "lm/lm.jsonl", 0, " ", 0.0, LM_ITEMS),
}
EXPECTED = {"mc_task": (0.5, 1 / 3), "schema_task": (2 / 3, 1 / 3), "lm_task": (0.5, 0.5)}


def write_bundle(root: Path, tasks=FIXTURE, yaml_file=True, meta_csv=True) -> Path:
    """A bundle directory in eval_bundle.zip's layout."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["icl_tasks:"]
    for label, (kind, uri, k, delim, _, items) in tasks.items():
        f = root / "eval_data" / uri
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{k}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
    if yaml_file:
        (root / "core.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if meta_csv:
        rows = ["Eval Task,Task Category,Random baseline,Centered Metric?"]
        rows += [f"{label},misc,{t[4]},yes" for label, t in tasks.items()]
        (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def spec_of(label, tasks=FIXTURE):
    kind, uri, k, delim, base, _ = tasks[label]
    return TaskSpec(label, kind, uri, k, delim, base)


# ---- (a) prompts, seeds, spans ---------------------------------------------------------------

def test_rendered_prompts_are_exact():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f g"], "gold": 0}
    assert core.render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f g"]
    assert core.render_prompts_mc(item, " ") == ["Q3 e", "Q3 f g"]

    shots = [{"context_options": ["A1", "A2"], "continuation": "c1.", "gold": 1}]
    item = {"context_options": ["B1", "B2"], "continuation": "c2.", "gold": 0}
    assert core.render_prompts_schema(item, " ", shots) == ["A2 c1.\n\nB1 c2.", "A2 c1.\n\nB2 c2."]

    shots = [{"context": "  ctx1 \n", "continuation": "cont1"}, {"context": "ctx2", "continuation": " cont2 "}]
    item = {"context": "\tctx3 ", "continuation": "cont3"}
    assert core.render_prompts_lm(item, "\nAnswer: ", shots) == [
        "ctx1\nAnswer: cont1\n\nctx2\nAnswer:  cont2 \n\nctx3\nAnswer:",  # `without` is stripped
        "ctx1\nAnswer: cont1\n\nctx2\nAnswer:  cont2 \n\nctx3\nAnswer: cont3"]
    assert core.render_prompts_lm({"context": " x ", "continuation": "y"}, " ") == ["x", "x y"]


def test_prompts_match_jinja_templates():
    """The plain string building equals Jinja templates written from upstream's prompt description."""
    jinja2 = pytest.importorskip("jinja2")
    loop = "{%- for ex in shots -%}\n"
    mc = jinja2.Template(loop + "{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}\n\n{% endfor -%}\n"
                          "{{ item.query }}{{ d }}{{ choice }}")
    sc = jinja2.Template(loop + "{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}\n\n{% endfor -%}\n"
                          "{{ ctx }}{{ d }}{{ item.continuation }}")
    lm = jinja2.Template(loop + "{{ ex.context | trim }}{{ d }}{{ ex.continuation }}\n\n{% endfor -%}\n"
                          "{{ item.context | trim }}{{ d }}{% if full %}{{ item.continuation }}{% endif %}")
    rng = random.Random(0)
    words = ["a", " b", "c ", "\n", "Q:", "x\ny", "  "]
    txt = lambda: "".join(rng.choice(words) for _ in range(rng.randint(1, 4)))  # noqa: E731
    for _ in range(50):
        d = rng.choice([" ", "\nAnswer: ", ""])
        k = rng.randint(0, 3)
        mcs = [{"query": txt(), "choices": [txt(), txt()], "gold": rng.randint(0, 1)} for _ in range(k + 1)]
        assert core.render_prompts_mc(mcs[0], d, mcs[1:]) == [
            mc.render(shots=mcs[1:], d=d, item=mcs[0], choice=c) for c in mcs[0]["choices"]]
        scs = [{"context_options": [txt(), txt()], "continuation": txt(), "gold": rng.randint(0, 1)}
               for _ in range(k + 1)]
        assert core.render_prompts_schema(scs[0], d, scs[1:]) == [
            sc.render(shots=scs[1:], d=d, item=scs[0], ctx=c) for c in scs[0]["context_options"]]
        lms = [{"context": txt(), "continuation": txt()} for _ in range(k + 1)]
        assert core.render_prompts_lm(lms[0], d, lms[1:]) == [
            lm.render(shots=lms[1:], d=d, item=lms[0], full=False).strip(),
            lm.render(shots=lms[1:], d=d, item=lms[0], full=True)]


@pytest.mark.parametrize("n", [2, 7, 60, 85, 86, 500, 3000])
def test_shuffle_and_fewshot_follow_the_seeds(n):
    items = [{"i": i} for i in range(n)]
    ref = list(items)
    random.Random(1337).shuffle(ref)
    for m in (-1, 5, n + 3):
        got, lines = core.shuffle_and_truncate(items, m, list(range(n)))
        assert got == (ref[:m] if m > 0 else ref)
        assert [items[i] for i in lines] == got  # side lists get the same permutation
    for k in (1, 3, 10):
        if k > n - 1:
            with pytest.raises(CoreDataError, match=f"{k}-shot needs at least {k + 1}"):
                core.fewshot_indices(n, 0, k)
            continue
        for idx in {0, 1, n // 2, n - 1}:
            direct = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
            assert core.fewshot_indices(n, idx, k) == direct
    assert core.fewshot_indices(n, 0, 0) == []


def test_answer_spans():
    rows, s, e = core.answer_spans("multiple_choice", [[0, 1, 2, 3], [0, 1, 2, 4, 5], [0, 1, 9]])
    assert (s, e) == ([2, 2, 2], [4, 5, 3])
    rows, s, e = core.answer_spans("schema", [[0, 7, 8, 9], [0, 6, 5, 8, 9]])
    assert (s, e) == ([2, 3], [4, 5])
    rows, s, e = core.answer_spans("language_modeling", [[0, 1, 2], [0, 1, 2, 3, 4]])
    assert (rows, s, e) == ([[0, 1, 2, 3, 4]], [3], [5])
    assert core.find_common_length([[1, 2], [1, 2, 3]], "left") == 2
    assert core.find_common_length([[1, 2], [1, 2]], "right") == 2


def test_lm_prefix_property_violation_is_a_clear_error():
    tok = CharTok(merges={"ab": 100})  # "a" alone is [a] but "ab..." starts with the merged token
    prompts = core.render_prompts_lm({"context": "a", "continuation": "bc"}, "")
    toks = tok.encode(prompts, prepend=0)
    assert toks == [[0, 97], [0, 100, 99]]
    with pytest.raises(CoreDataError, match="not a strict token prefix"):
        core.answer_spans("language_modeling", toks, "x.jsonl, line 3")
    with pytest.raises(CoreDataError, match="x.jsonl, line 3"):
        core.answer_spans("language_modeling", [[0, 1], [0, 1]], "x.jsonl, line 3")  # empty continuation
    spec = TaskSpec("lm", "language_modeling", "lm.jsonl", 0, "")
    with pytest.raises(CoreDataError, match=r"task lm: f\.jsonl, line 7.*strict token prefix"):
        core.evaluate_task(bigram_scorer(), tok, [{"context": "a", "continuation": "bc"}], spec, progress=False,
                           where=["f.jsonl, line 7"])


@pytest.mark.parametrize("text, match", [
    ('{"query": "q", "choices": ["a"], "gold": 0}\n\n{"query": "q", "choices": ["a"], "gold": 0\n',
     r"bad\.jsonl, line 3: invalid JSON"),
    ('{"query": "q", "gold": 0}\n', r"line 1: missing field 'choices'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}\n', r"line 1: field 'gold' must be a int, got str"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}\n', r"line 1: field 'gold' must be a int, got bool"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}\n', r"line 1: gold 2 is out of range for 2 choices"),
    ('{"query": "q", "choices": ["a", 3], "gold": 0}\n', r"line 1: 'choices'\[1\] must be a string"),
    ('{"query": "q", "choices": [], "gold": 0}\n', r"line 1: 'choices' is empty"),
    ('["q"]\n', r"line 1: expected a JSON object"),
    ("\n\n", r"bad\.jsonl: no examples"),
])
def test_bad_task_files_name_file_and_line(tmp_path, text, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(CoreDataError, match=match):
        core_tasks.load_task_file(f, "multiple_choice")


def test_bad_schema_and_lm_files(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"context_options": ["a"], "continuation": 5, "gold": 0}\n')
    with pytest.raises(CoreDataError, match="s.jsonl, line 1: field 'continuation' must be a str"):
        core_tasks.load_task_file(f, "schema")
    f.write_text('{"context": "a"}\n')
    with pytest.raises(CoreDataError, match="line 1: missing field 'continuation'"):
        core_tasks.load_task_file(f, "language_modeling")
    f.write_text('\n{"context": "a", "continuation": "b", "extra": 1}\n')
    assert core_tasks.load_task_file(f, "language_modeling") == ([{"context": "a", "continuation": "b", "extra": 1}], [2])


# ---- (a) scores against hand-computed numbers --------------------------------------------------

def test_hand_computed_accuracies_and_core(tmp_path):
    bundle = core_tasks.load_bundle(write_bundle(tmp_path / "b"))
    assert bundle.source == "core.yaml + eval_meta_data.csv" and not bundle.missing
    assert [t.label for t in bundle.tasks] == list(FIXTURE)
    assert bundle.tasks[0] == spec_of("mc_task")
    logs = []
    out = core.evaluate_core(bigram_scorer(), CharTok(), bundle, progress=False, log=logs.append)
    for label, (acc, centered) in EXPECTED.items():
        assert out["results"][label] == pytest.approx(acc, abs=1e-7), label
        assert out["centered_results"][label] == pytest.approx(centered, abs=1e-7), label
    assert out["core_metric"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert (out["num_tasks"], out["total_tasks"], out["skipped"]) == (3, 3, [])
    assert "CORE over 3/3 tasks: 0.3889" in logs[-1]
    assert logs[0].startswith("Evaluating: mc_task (1-shot, type: multiple_choice)... accuracy: 0.5000")


def test_mean_ce_is_the_span_mean_and_batching_does_not_matter():
    spec = spec_of("mc_task")
    shuffled = core.shuffle_and_truncate(MC_ITEMS)
    big = core.evaluate_task(bigram_scorer(), CharTok(), shuffled, spec, progress=False)
    one = core.evaluate_task(bigram_scorer(), CharTok(), shuffled, spec, progress=False, batch_tokens=1)
    assert big.mean_losses == one.mean_losses and list(big.correct) == list(one.correct)
    i = shuffled.index(MC_ITEMS[2])  # ["bz", "a"]: (CE(b|' ') + CE(z|b)) / 2 vs CE(a|' ')
    np.testing.assert_allclose(big.mean_losses[i], [(L_HIT + L_MISS) / 2, L_MISS], rtol=1e-6)
    i = shuffled.index(MC_ITEMS[0])  # single chars after ' '
    np.testing.assert_allclose(big.mean_losses[i], [L_MISS, L_HIT, L_MISS, L_MISS], rtol=1e-6)
    i = shuffled.index(MC_ITEMS[3])  # span is the last char only (after the common 'b')
    np.testing.assert_allclose(big.mean_losses[i], [L_HIT, L_MISS], rtol=1e-6)
    sch = core.evaluate_task(bigram_scorer(), CharTok(), SCHEMA_ITEMS, spec_of("schema_task"), progress=False)
    # span " zz": x→' ' (flat) or y→' ' (hit), then ' '→'z' (miss), 'z'→'z' (flat)
    np.testing.assert_allclose(sch.mean_losses[0], [(L_FLAT + L_MISS + L_FLAT) / 3, (L_HIT + L_MISS + L_FLAT) / 3],
                               rtol=1e-6)


def test_process_striding_partitions_the_examples():
    spec = spec_of("lm_task")
    full = core.evaluate_task(bigram_scorer(), CharTok(), LM_ITEMS, spec, progress=False)
    parts = [core.evaluate_task(bigram_scorer(), CharTok(), LM_ITEMS, spec, progress=False, process_index=p,
                                process_count=3) for p in range(3)]
    assert list(full.correct) == [1, 0, 0, 1]
    np.testing.assert_array_equal(sum(r.correct for r in parts), full.correct)
    for p, r in enumerate(parts):  # each process filled only its own examples
        assert set(np.flatnonzero(r.correct)) <= set(range(p, 4, 3))


def test_row_multiple_and_buckets():
    assert [core.seq_bucket(n) for n in (1, 128, 129, 257, 385, 513, 769, 1025, 1537)] == [
        128, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    plan = core.plan_batches([5, 300, 7, 130, 6], batch_tokens=1024, row_multiple=8)
    assert [(B, T) for B, T, _ in plan] == [(8, 128), (8, 256), (8, 384)]
    assert sorted(i for _, _, rows in plan for i in rows) == [0, 1, 2, 3, 4]
    plan = core.plan_batches([10] * 20, batch_tokens=128 * 16)  # 16 rows per full batch, tail of 4
    assert [(B, len(r)) for B, _, r in plan] == [(16, 16), (4, 4)]
    res = core.evaluate_task(bigram_scorer(row_multiple=8), CharTok(), SCHEMA_ITEMS, spec_of("schema_task"),
                             progress=False, batch_tokens=128)
    assert list(res.correct) == [1, 0, 1]


def _random_gpt(vocab=V, seed=0):
    from nanochat_jax import model
    from nanochat_jax.config import GPTConfig

    cfg = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    params = model.init_params(cfg, jax.random.key(seed), jnp.float32)
    leaves, tree = jax.tree.flatten(params)  # spread every weight so the logits really differ
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return cfg, jax.tree.unflatten(tree, leaves)


def test_model_scores_match_a_torch_reference():
    """Per-example mean CE of the JAX path vs F.cross_entropy on unbucketed, upstream-style batches."""
    torch = pytest.importorskip("torch")
    from nanochat_jax import model

    cfg, params = _random_gpt()
    spec = TaskSpec("mc", "multiple_choice", "mc.jsonl", 2, "\nAnswer: ", 25)
    items = [{"query": f"Question {i}: pick", "choices": ["one", "two words", "three of them"][: 2 + i % 2],
              "gold": i % 2} for i in range(6)]
    shuffled = core.shuffle_and_truncate(items)
    tok = CharTok()
    res = core.evaluate_task(core.model_scorer(params, cfg, dtype=jnp.float32, backend="xla"), tok, shuffled, spec,
                             progress=False, batch_tokens=512)
    fwd = jax.jit(lambda p, t: model.forward(p, t, cfg, dtype=jnp.float32, backend="xla"))
    for idx in range(len(shuffled)):
        rows, starts, ends = core.answer_spans(spec.task_type, tok.encode(core.example_prompts(shuffled, idx, spec), 0))
        T = 160  # one (3, 160) compile: causal attention makes padding rows and length irrelevant
        assert max(map(len, rows)) <= T
        batch = np.zeros((3, T), np.int32)
        for r, row in enumerate(rows):
            batch[r, :len(row)] = row
        logits = torch.from_numpy(np.array(fwd(params, jnp.asarray(batch))))[:len(rows)]
        ids = torch.from_numpy(batch[:len(rows)]).long()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                                               reduction="none").view(len(rows), T - 1)
        want = [ce[r, s - 1:e - 1].mean().item() for r, (s, e) in enumerate(zip(starts, ends))]
        np.testing.assert_allclose(res.mean_losses[idx], want, rtol=2e-5)
        assert res.correct[idx] == float(want.index(min(want)) == shuffled[idx]["gold"])


# ---- (a) the bundle directory -----------------------------------------------------------------

def test_bundle_without_yaml_uses_the_builtin_table_and_skips_missing(tmp_path):
    root = tmp_path / "b"
    f = root / "eval_data" / "commonsense_reasoning" / "copa.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    bundle = core_tasks.load_bundle(root)
    assert bundle.source == "built-in task table"
    assert [t.label for t in bundle.tasks] == ["copa"] and len(bundle.missing) == 21
    assert bundle.tasks[0] == TaskSpec("copa", "multiple_choice", "commonsense_reasoning/copa.jsonl", 0, " ", 50)
    logs = []
    out = core.evaluate_core(bigram_scorer(), CharTok(), bundle, progress=False, log=logs.append)
    assert logs[0].startswith("CORE: 21 of 22 tasks have no data file and are skipped: hellaswag_zeroshot "
                              "(language_understanding/hellaswag.jsonl), jeopardy")
    assert "CORE over 1/22 tasks" in logs[-1]
    assert out["results"]["copa"] == 0.5 and out["core_metric"] == 0.0  # (0.5 - 0.5) / 0.5
    assert (out["num_tasks"], out["total_tasks"], len(out["skipped"])) == (1, 22, 21)
    assert [t.label for t in core_tasks.BUILTIN_TASKS][:3] == ["hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata"]
    assert core_tasks.BUILTIN_BASELINES["bigbench_language_identification"] == 9.1
    assert core_tasks.BUILTIN_BASELINES["boolq"] == 62


def test_bundle_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no CORE eval bundle at .*--download"):
        core_tasks.load_bundle(tmp_path / "nothing")
    root = write_bundle(tmp_path / "b")
    (root / "core.yaml").write_text("icl_tasks:\n- label: x\n  icl_task_type: multiple_choice\n")
    with pytest.raises(CoreDataError, match=r"core.yaml: icl_tasks\[0\] \(x\): missing 'dataset_uri'"):
        core_tasks.load_bundle(root)
    (root / "core.yaml").write_text("icl_tasks:\n- {label: mc_task, icl_task_type: essay, dataset_uri: a, "
                                    "num_fewshot: [0]}\n")
    with pytest.raises(CoreDataError, match="icl_task_type 'essay' is not one of"):
        core_tasks.load_bundle(root)
    (root / "core.yaml").write_text("icl_tasks:\n- {label: new_task, icl_task_type: schema, dataset_uri: a, "
                                    "num_fewshot: [0]}\n")
    with pytest.raises(CoreDataError, match="no random baseline for 'new_task'"):
        core_tasks.load_bundle(root)
    (root / "core.yaml").write_text("icl_tasks: [\n")
    with pytest.raises(CoreDataError, match="invalid YAML"):
        core_tasks.load_bundle(root)
    write_bundle(root)
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_task,lots\n")
    with pytest.raises(CoreDataError, match=r"eval_meta_data.csv, line 2: random baseline 'lots'"):
        core_tasks.load_bundle(root)
    (root / "eval_meta_data.csv").write_text("Task,Baseline\n")
    with pytest.raises(CoreDataError, match="no 'Eval Task' column"):
        core_tasks.load_bundle(root)
    with pytest.raises(CoreDataError, match=r"unknown task\(s\) \['nope'\]"):
        core_tasks.load_bundle(write_bundle(tmp_path / "c")).select(["nope"])
    spec = spec_of("mc_task")
    with pytest.raises(CoreDataError, match="1-shot needs at least 2 examples, there are 1"):
        core.evaluate_task(bigram_scorer(), CharTok(), MC_ITEMS[:1], spec, progress=False)


def test_bundle_for_training_notice(tmp_path):
    logs = []
    assert core_tasks.bundle_for_training(tmp_path / "none", logs.append) is None
    assert len(logs) == 1 and logs[0].startswith("note: CORE is skipped: no CORE eval bundle at")
    logs.clear()
    b = core_tasks.bundle_for_training(write_bundle(tmp_path / "b"), logs.append)
    assert b is not None and logs == [f"CORE: 3/3 tasks from {tmp_path / 'b'} (core.yaml + eval_meta_data.csv)"]


# ---- (c) the real task files (NANOCHAT_CORE_DATA, when set) --------------------------------------

@pytest.mark.skipif(not (SHARED_CORE / "eval_data").is_dir(),
                    reason="set NANOCHAT_CORE_DATA to a CORE bundle directory (with eval_data/) to run this")
def test_real_bundle_tasks(data):  # noqa: F811
    from nanochat_jax.tokenizer import Tokenizer

    bundle = core_tasks.load_bundle(SHARED_CORE)
    assert len(bundle.tasks) == 18 and sorted(t.label for t in bundle.missing) == [
        "coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    for spec in bundle.tasks:  # every shipped file parses under its task type
        items, _ = core_tasks.load_task_file(bundle.data_path(spec), spec.task_type)
        assert len(items) >= 32
    tok = Tokenizer.load(data / "tok")
    cfg, params = _random_gpt(vocab=tok.vocab_size)
    sub = bundle.select(["copa", "winograd", "lambada_openai"])
    logs = []
    out = core.evaluate_core(core.model_scorer(params, cfg, dtype=jnp.float32), tok, sub, max_per_task=8,
                             progress=False, log=logs.append)
    assert set(out["results"]) == {"copa", "winograd", "lambada_openai"}
    for label, acc in out["results"].items():
        assert 0 <= acc <= 1 and (acc * 8) == int(acc * 8), (label, acc)
    assert "CORE over 3/3 tasks" in logs[-1]


# ---- (d) the downloader ---------------------------------------------------------------------------

def bundle_zip(tmp_path, top="eval_bundle/", with_yaml=True) -> bytes:
    src = write_bundle(tmp_path / f"zipsrc_{with_yaml}", yaml_file=with_yaml)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, top + f.relative_to(src).as_posix())
    return buf.getvalue()


class ZipServer(FaultServer):
    """Serves /eval_bundle.zip; `queue` takes one-shot faults in order (drop, corrupt, 404, 500)."""

    def __init__(self, body: bytes):
        super().__init__()
        self.routes = {"/eval_bundle.zip": body}
        self.url = f"{self.base}/eval_bundle.zip"


def _leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_download_installs_a_valid_bundle_once(tmp_path):
    dest = tmp_path / "home" / "eval_bundle"
    with ZipServer(bundle_zip(tmp_path)) as srv:
        assert core_tasks.download_bundle(dest, srv.url, progress=False) == dest
        assert core_tasks.download_bundle(dest, srv.url, progress=False) == dest  # already there: no request
        assert srv.hits["/eval_bundle.zip"] == 1
    b = core_tasks.load_bundle(dest)
    assert [t.label for t in b.tasks] == list(FIXTURE) and b.source == "core.yaml + eval_meta_data.csv"
    assert _leftovers(dest.parent) == []


def test_download_retries_truncated_and_garbage_responses(tmp_path):
    dest = tmp_path / "eval_bundle"
    sleeps = []
    with ZipServer(bundle_zip(tmp_path, top="")) as srv:  # a zip without the top folder works too
        srv.queue = ["drop", "corrupt", "500"]
        core_tasks.download_bundle(dest, srv.url, progress=False, sleep=sleeps.append, backoff=2.0)
        assert srv.hits["/eval_bundle.zip"] == 4
    assert sleeps == [2.0, 4.0, 8.0]
    assert core_tasks.load_bundle(dest).tasks and _leftovers(tmp_path) == []


def test_failed_downloads_leave_nothing_that_reads_as_a_bundle(tmp_path):
    dest = tmp_path / "eval_bundle"
    with ZipServer(bundle_zip(tmp_path)) as srv:
        srv.queue = ["drop"] * 3
        with pytest.raises(DownloadError, match="failed after 3 attempt.*connection dropped"):
            core_tasks.download_bundle(dest, srv.url, retries=3, progress=False, sleep=lambda s: None)
        assert not dest.exists() and _leftovers(tmp_path) == []
        srv.queue = ["corrupt"] * 2
        with pytest.raises(DownloadError, match="not a valid zip"):
            core_tasks.download_bundle(dest, srv.url, retries=2, progress=False, sleep=lambda s: None)
        srv.queue = ["404"]
        n = srv.hits["/eval_bundle.zip"]
        with pytest.raises(DownloadError, match="failed after 1 attempt"):
            core_tasks.download_bundle(dest, srv.url, progress=False, sleep=lambda s: None)
        assert srv.hits["/eval_bundle.zip"] == n + 1  # a 404 is not retried
        assert not dest.exists() and _leftovers(tmp_path) == []
    with ZipServer(bundle_zip(tmp_path, with_yaml=False)) as srv, \
            pytest.raises(DownloadError, match="no core.yaml"):
        core_tasks.download_bundle(dest, srv.url, retries=2, progress=False, sleep=lambda s: None)
    assert not dest.exists() and _leftovers(tmp_path) == []
    (dest / "eval_data").mkdir(parents=True)  # someone's own partial directory is never touched
    with pytest.raises(DownloadError, match="exists but is not a complete eval bundle"):
        core_tasks.download_bundle(dest, "http://127.0.0.1:9/unused", progress=False)
    assert (dest / "eval_data").is_dir()


# ---- (b) base_eval's CLI ------------------------------------------------------------------------

def _tiny_checkpoint(path: Path, vocab: int, step: int = 3):
    from nanochat_jax import checkpoint, optim, sharding, train_step
    from nanochat_jax.config import GPTConfig

    cfg = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    tx = optim.make_optimizer(cfg, num_iterations=10)
    state = train_step.init_train_state(cfg, tx, sharding.make_mesh("data=8"), jax.random.key(0))
    with checkpoint.Checkpointer(path, async_save=False) as ckpt:
        ckpt.save(step, state, meta={"step": step, "model_config": cfg.to_dict()})
    return cfg


WORD_TASKS = {  # text the 320-token test tokenizer knows
    "mc_words": ("multiple_choice", "w/mc.jsonl", 2, "\nAnswer: ", 25.0,
                 [{"query": f"the king went to the {w}", "choices": ["sea", "land", "town", "hills"], "gold": i % 4}
                  for i, w in enumerate(["sea", "land", "town", "ship", "hills", "rivers"])]),
    "schema_words": ("schema", "w/schema.jsonl", 0, " ", 50.0,
                     [{"context_options": ["the king", "the queen"], "continuation": "sang songs", "gold": i % 2}
                      for i in range(4)]),
    "lm_words": ("language_modeling", "w/lm.jsonl", 1, " ", 0.0,
                 [{"context": f"the sun rose over the {w}", "continuation": "and the men sang"}
                  for w in ["hills", "sea", "town", "land"]]),
}


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_base_eval_cli_on_a_tiny_checkpoint(data, tmp_path, capsys):  # noqa: F811
    from nanochat_jax.tokenizer import Tokenizer
    from train import base_eval

    tok = Tokenizer.load(data / "tok")
    _tiny_checkpoint(tmp_path / "run" / "checkpoints", tok.vocab_size)
    bundle = write_bundle(tmp_path / "bundle", WORD_TASKS)
    common = ["--checkpoint", str(tmp_path / "run"), "--tokenizer-dir", str(data / "tok"),
              "--bundle-dir", str(bundle), "--out-dir", str(tmp_path / "out")]
    assert base_eval.main([*common, "--data-dir", str(data), "--split-tokens", "1024",
                           "--device-batch-size", "1"]) == 0
    log = capsys.readouterr().out
    for needle in ("CORE metric:", "over 3/3 tasks", "train bpb:", "val bpb:", "greedy completions:",
                   "The capital of France is", "unconditional samples:"):
        assert needle in log, needle
    with open(tmp_path / "out" / "base_model_000003.csv", newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f)]
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert [r[0] for r in rows[1:]] == [*WORD_TASKS, "CORE"]
    centered = []
    for (label, acc, cen), spec in zip(rows[1:4], WORD_TASKS.values()):
        b = spec[4] / 100
        assert float(cen) == pytest.approx((float(acc) - b) / (1 - b), abs=2e-6)
        centered.append(float(cen))
    assert rows[4][1] == "" and float(rows[4][2]) == pytest.approx(sum(centered) / 3, abs=2e-6)

    with pytest.raises(SystemExit, match="checkpoint directory .*missing does not exist"):
        base_eval.main(["--checkpoint", str(tmp_path / "missing"), "--tokenizer-dir", str(data / "tok"),
                        "--eval", "sample"])
    with pytest.raises(SystemExit, match=r"no CORE eval bundle at .*--download"):
        base_eval.main([*common[:4], "--bundle-dir", str(tmp_path / "nobundle"), "--eval", "core"])
    with pytest.raises(SystemExit, match="one of --checkpoint"):
        base_eval.main(["--eval", "core", "--bundle-dir", str(bundle)])
    with pytest.raises(SystemExit, match=r"unknown --eval \['coer'\]"):
        base_eval.main([*common, "--eval", "coer"])


# ---- (e) CORE inside base_train ------------------------------------------------------------------

def test_base_train_logs_core_metric(data, tmp_path, capsys):  # noqa: F811
    from nanochat_jax.report import read_metrics
    from train import base_train

    out = tmp_path / "run"
    bundle = write_bundle(tmp_path / "bundle", WORD_TASKS)
    base_train.main(train_argv(data, out, "--num-iterations", "4", "--eval-every", "-1", "--core-metric-every", "2",
                               "--bundle-dir", str(bundle), "--core-metric-max-per-task", "3"))
    log = capsys.readouterr().out
    assert f"CORE: 3/3 tasks from {bundle}" in log
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "core_metric" in r]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        cen = [r[f"core/{k}"] for k in WORD_TASKS]
        assert r["core_metric"] == pytest.approx(sum(cen) / 3)
    report = (out / "report.md").read_text()
    assert "| core_metric |" in report and "final_core_metric" in report


# ---- two processes: striding + the sum across processes, params sharded over both -----------------

MULTIPROC_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp
from nanochat_jax import optim, sharding, train_step
from nanochat_jax.config import GPTConfig
from nanochat_jax.evals import core, core_tasks
from jax.experimental import multihost_utils

coordinator, pid, bundle_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sharding.initialize_distributed(coordinator, 2, pid)

class CharTok:
    bos_token_id = 0
    def encode(self, texts, prepend=None):
        return [[prepend] + [ord(c) for c in t] for t in texts]

cfg = GPTConfig(sequence_len=64, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
mesh = sharding.make_mesh("data=2,fsdp=2")
state = train_step.init_train_state(cfg, optim.make_optimizer(cfg, 10), mesh, jax.random.key(0))
params = jax.tree.map(lambda x: x * 30.0 if x.ndim == 2 else x, state.params)  # make the logits differ
bundle = core_tasks.load_bundle(bundle_dir)
out = core.evaluate_core(core.model_scorer(params, cfg, dtype=jnp.float32, backend="xla", mesh=mesh), CharTok(),
                         bundle, progress=False, log=lambda s: None)
# reference: this process alone scores every example on one device with the gathered params
host = multihost_utils.process_allgather(params, tiled=True)
alone = core.model_scorer(jax.device_put(host, jax.local_devices()[0]), cfg, dtype=jnp.float32, backend="xla")
ref = {}
for spec in bundle.tasks:
    items, _ = core_tasks.load_task_file(bundle.data_path(spec), spec.task_type)
    ref[spec.label] = core.evaluate_task(alone, CharTok(), core.shuffle_and_truncate(items), spec, progress=False,
                                         process_index=0, process_count=1).accuracy
print("RESULT " + json.dumps({"results": out["results"], "ref": ref}), flush=True)
'''


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_two_processes_stride_and_sum(tmp_path):
    import os
    import subprocess
    import sys

    import portpicker

    script = tmp_path / "mp_core.py"
    script.write_text(MULTIPROC_SCRIPT)
    bundle = write_bundle(tmp_path / "bundle")
    port = portpicker.pick_unused_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": cpu_devices_flags(2), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(bundle)], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [out for out, _ in communicate_all(procs, timeout=240)]
    outs = []
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
        outs.append(json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:]))
    assert outs[0] == outs[1]  # both processes hold the summed results
    assert outs[0]["results"] == outs[0]["ref"]
    assert set(outs[0]["results"]) == set(FIXTURE)
