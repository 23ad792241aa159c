"""Preference pairs: every accepted layout, line-numbered errors, the HH-RLHF task over a 127.0.0.1
HF parquet server, the offline chatterbot pairs, rendering with the chat template's mask, the
crop-or-skip rule and the pair loader (interleaved rows, reference cache in the state)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_server import FaultServer

from nanochat_jax.data import preference as pref
from nanochat_jax.data.corpus import build_offline_pairs
from nanochat_jax.tasks.hub import SEED
from nanochat_jax.tokenizer import Tokenizer

OURS = {"messages": [{"role": "user", "content": "Hi there"}], "chosen": "Hello!", "rejected": "Go away."}
WANT = {"messages": [{"role": "user", "content": "Hi there"}], "chosen": "Hello!", "rejected": "Go away."}


@pytest.mark.parametrize("row", [
    OURS,
    {"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": [{"role": "user", "content": "Hi there"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": {"role": "assistant", "content": "Go away."}},
    {"chosen": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Go away."}]},
    {"prompt": "Hi there",  # UltraFeedback binarized
     "chosen": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Go away."}]},
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
])
def test_layouts_normalize_to_one_form(row):
    assert pref.normalize_pair(row) == WANT


def test_hh_multi_turn_and_system_prompts():
    c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good"
    r = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
    got = pref.normalize_pair({"chosen": c, "rejected": r})
    assert [m["role"] for m in got["messages"]] == ["user", "assistant", "user"]
    assert (got["chosen"], got["rejected"]) == ("good", "bad")
    sys_row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "x"}],
               "chosen": "y", "rejected": "z"}
    assert pref.normalize_pair(sys_row)["messages"][0]["role"] == "system"


@pytest.mark.parametrize("row, msg", [
    ({"messages": [{"role": "user", "content": "q"}], "chosen": "a"}, "missing field 'rejected'"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"}, "identical"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": "", "rejected": "b"}, "chosen is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "must end with a user turn"),
    ({"messages": [{"role": "assistant", "content": "q"}], "chosen": "x", "rejected": "y"}, "expected 'user'"),
    ({"prompt": "q", "chosen": 3, "rejected": "y"}, "chosen must be a string"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share every turn"),
    ({"chosen": "just text", "rejected": "more text"}, "unknown pair layout"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nHuman: c"}, "end with an assistant"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_pairs_get_one_clear_error(row, msg):
    with pytest.raises(ValueError, match=msg):
        pref.normalize_pair(row)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(OURS) + "\n\n" + json.dumps({**OURS, "rejected": "Hello!"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 3: chosen and rejected replies are identical"):
        pref.PreferenceJSONL(path)
    path.write_text(json.dumps(OURS) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 2: invalid JSON"):
        pref.PreferenceJSONL(path)
    with pytest.raises(FileNotFoundError, match="no such preference file"):
        pref.PreferenceJSONL(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(OURS) + "\n" + json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    task = pref.PreferenceJSONL(path)
    assert len(task) == 2 and task[1]["chosen"] == "c"
    mix = pref.parse_preference_mixture(f"jsonl={path}[1:]*3")
    assert len(mix) == 3 and all(p["chosen"] == "c" for p in mix)
    for bad, msg in (("nope", "unknown preference task"), (f"jsonl={path}[5:]", "empty"), ("x[1:", "bad preference")):
        with pytest.raises(ValueError, match=msg):
            pref.parse_preference_mixture(bad)


def _parquet(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


HH_ROWS = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
           for i in range(5)]
HH_BAD = [{"chosen": "\n\nHuman: x\n\nAssistant: same", "rejected": "\n\nHuman: x\n\nAssistant: same"},
          {"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: b"}]


def test_hh_rlhf_downloads_in_its_published_layout(tmp_path, monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with FaultServer() as srv:
        srv.routes["/files/a.parquet"] = _parquet(HH_ROWS[:3] + HH_BAD[:1])
        srv.routes["/files/b.parquet"] = _parquet(HH_ROWS[3:] + HH_BAD[1:])
        srv.routes["/api/datasets/Anthropic/hh-rlhf/parquet/default/test"] = json.dumps(
            [f"{srv.base}/files/a.parquet", f"{srv.base}/files/b.parquet"]).encode()
        srv.fail("/files/b.parquet", "drop", times=1)  # a torn transfer is retried
        task = pref.HHRLHF("test", cache_dir=tmp_path, base_url=srv.base,
                           download_kw={"progress": False, "sleep": lambda s: None})
        assert srv.hits["/files/b.parquet"] == 2
    assert (tmp_path / "Anthropic--hh-rlhf" / "default" / "test" / "manifest.json").is_file()
    all_rows = HH_ROWS[:3] + HH_BAD[:1] + HH_ROWS[3:] + HH_BAD[1:]
    perm = np.random.default_rng(SEED).permutation(len(all_rows))
    want = [int(all_rows[j]["chosen"].rsplit(" ", 1)[1]) for j in perm if all_rows[j] in HH_ROWS]
    assert [int(task[i]["chosen"].split()[1]) for i in range(len(task))] == want
    assert task[0]["messages"] == [{"role": "user", "content": f"q{want[0]}"}]
    assert sum(task.skipped.values()) == 2 and len(task) == 5
    # the same layout from a local folder (the --task-data-dir route)
    local = tmp_path / "local" / "hh-rlhf"
    local.mkdir(parents=True)
    (local / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    mix = pref.parse_preference_mixture("hh-rlhf@train[:2]", tmp_path / "local")
    assert len(mix) == 2 and all(p["chosen"].startswith("good") for p in mix)


CONVS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
         for i in range(30)]


def test_offline_pairs_use_an_unrelated_reply_and_align_with_sft(tmp_path, monkeypatch):
    pairs = build_offline_pairs(CONVS)
    assert len(pairs) == 30 and pairs == build_offline_pairs(CONVS)  # seeded
    for i, p in enumerate(pairs):
        assert p["messages"] == CONVS[i]["messages"][:1] and p["chosen"] == f"answer {i}"
        assert p["rejected"] != p["chosen"] and p["rejected"].startswith("answer ")
    with pytest.raises(ValueError, match="no unrelated reply"):
        build_offline_pairs(CONVS[:1])
    # the file follows the SFT file's order, so the same slice of both tasks has the same prompts
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
    from nanochat_jax.paths import offline_pref_path, offline_sft_path
    from nanochat_jax.tasks.spec import parse_mixture

    offline_sft_path().parent.mkdir(parents=True)
    offline_sft_path().write_text("".join(json.dumps(c) + "\n" for c in CONVS))
    assert pref.main(["offline"]) == 0
    assert offline_pref_path().is_file()
    sft, prefs = parse_mixture("chatterbot[-7:]"), pref.parse_preference_mixture("chatterbot-pairs[-7:]")
    assert [c["messages"][:-1] for c in sft] == [p["messages"] for p in prefs]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Hi there, hello! Go away. question answer good bad"] * 50, 300)


def test_render_pair_is_the_chat_template_with_the_reply_masked(tok):
    pair = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "Hi there"}], "chosen": "Hello!", "rejected": "Go away."}
    prompt, c, r = pref.render_pair(tok, pair)
    for reply, key in ((c, "chosen"), (r, "rejected")):
        ids, mask = tok.render_conversation({"messages": [*pair["messages"], {"role": "assistant", "content": pair[key]}]})
        assert prompt + reply == ids
        assert reply[-1] == tok.encode_special("<|assistant_end|>") and prompt[-1] == tok.encode_special("<|assistant_start|>")
        rows, masks = pref.pair_rows(prompt, c, r, len(ids) + 3, tok.bos_token_id)
        k = 0 if key == "chosen" else 1
        # only the final reply is supervised: the earlier assistant turn (mask 1 in SFT) is context here
        assert masks[k].tolist() == [0] * len(prompt) + [1] * len(reply) + [0] * (len(ids) + 3 - len(prompt) - len(reply))
        assert sum(mask) > len(reply)
        assert rows[k, :len(ids)].tolist() == ids and set(rows[k, len(ids):].tolist()) <= {tok.bos_token_id}


def test_crop_or_skip_rule():
    prompt, c, r = [0] + list(range(1, 20)), [50] * 5, [60] * 8
    assert pref.fit_pair(prompt, c, r, 40) == (prompt, "ok")
    got, status = pref.fit_pair(prompt, c, r, 20)  # room 12: BOS + the prompt's last 11 tokens
    assert status == "cropped" and got == [0] + list(range(9, 20))
    assert pref.fit_pair(prompt, c, r, 16) == (None, "skipped")  # only 7 prompt tokens would remain
    assert pref.fit_pair(prompt, c, r, 17)[1] == "cropped"  # exactly MIN_PROMPT_TOKENS
    assert pref.fit_pair([0, 1, 2], c, [60] * 20, 22) == (None, "skipped")  # the reply alone is too long
    assert pref.fit_pair([0, 1, 2], c, [60] * 20, 23) == ([0, 1, 2], "ok")


def test_loader_interleaves_counts_and_restores_its_cache():
    # pair i: prompt [0, i+1], chosen [100+i]*(1+i%3), rejected [200+i]; pair 3 has a 30-token reply: skipped
    def render(i):
        return [0, i + 1], [100 + i] * (30 if i == 3 else 1 + i % 3), [200 + i]
    it = iter(pref.PreferencePairIterDataset(render, 6, 2, 8, 0))
    b = next(it)
    assert b["inputs"].shape == (4, 8) and b["pair_ids"].tolist() == [0, 1] and b["ref_logps"] is None
    assert b["inputs"][0, :3].tolist() == [0, 1, 100] and b["targets"][0, :3].tolist() == [-1, 100, -1]
    assert b["inputs"][1, :3].tolist() == [0, 1, 200] and b["targets"][1, :2].tolist() == [-1, 200]
    it.remember([0, 1], [-1.0, -2.0, -3.0, -4.0])
    b = next(it)
    assert b["pair_ids"].tolist() == [2, 4] and b["skipped"] == 1
    it.remember([2, 4], [-5.0, -6.0, -7.0, -8.0])
    state = json.loads(json.dumps(it.get_state()))
    a = [next(it) for _ in range(2)]
    assert a[0]["pair_ids"].tolist() == [5, 0] and a[0]["ref_logps"] is None and a[0]["epoch"] == 1
    assert a[1]["pair_ids"].tolist() == [1, 2] and a[1]["ref_logps"].tolist() == [-3.0, -4.0, -5.0, -6.0]
    it.set_state(state)
    for x, y in zip(a, [next(it) for _ in range(2)]):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["pair_ids"], y["pair_ids"])
        assert (x["ref_logps"] is None) == (y["ref_logps"] is None) and x["skipped"] == y["skipped"] == 1
    assert next(it)["skipped"] == 2  # pair 3 again, in the second epoch
    with pytest.raises(ValueError, match="no preference pair fits"):
        next(iter(pref.PreferencePairIterDataset(lambda i: ([0], [5] * 40, [6]), 3, 1, 8, 0)))
