"""Pairwise judges: TRL's contracts, verdict parsing, shuffled order mapped back, rule / reward-model / LLM /
PairRM judges (offline stand-ins)."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import types

import pytest
import torch

from posttrain.online.judge_llm import LLMPairwiseJudge, OpenAIPairwiseJudge, parse_verdict
from posttrain.online.judges import (AllTrueJudge, BaseBinaryJudge, BasePairwiseJudge, PairRMJudge,
                                     RewardFunctionJudge, RewardModelJudge, judge_pairs)


@pytest.mark.parametrize("reply,expected", [
    ("0", 0), ("1", 1), (" 1.\n", 1), ('"0"', 0), ("A", 0), ("b", 1), ("[[A]]", 0), ("[[B]]", 1),
    ("After weighing both, the better answer is 1.", 1), ("Answer: 0", 0), ("Output (b)", 1),
    ("Response A is wordy; verdict: B", 1), ("The first one.", 0), ("I prefer the second", 1),
    ("It's a tie.", -1), ("Both are equally good", -1), ("[[C]]", -1), ("", -1), ("I cannot decide", -1),
    ("0 or 1, hard to say", -1),
])
def test_parse_verdict_formats(reply, expected):
    assert parse_verdict(reply) == expected


class _ScriptedJudge(LLMPairwiseJudge):
    """An LLM judge whose 'model' always names the answer containing 'good', in the verdict format given."""

    def __init__(self, fmt, **kw):
        super().__init__("scripted", base_url="http://unused", **kw)
        self.fmt, self.seen = fmt, []

    def complete(self, chats):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            self.seen.append(text)
            first = text.split("Answer 0:\n")[1].split("\n\nAnswer 1:")[0]
            out.append(self.fmt(0 if "good" in first else 1))
        return out


@pytest.mark.parametrize("fmt", [str, lambda k: f"[[{'AB'[k]}]]", lambda k: f"The better response is {k}."])
def test_shuffled_order_is_mapped_back(fmt):
    judge = _ScriptedJudge(fmt, seed=3)
    prompts = [f"q{i}" for i in range(40)]
    pairs = [["good answer", "bad answer"] if i % 2 else ["bad answer", "good answer"] for i in range(40)]
    verdicts = judge.judge(prompts, pairs)
    assert verdicts == [0 if i % 2 else 1 for i in range(40)]
    firsts = [t.split("Answer 0:\n")[1].startswith("good") for t in judge.seen]
    assert 5 < sum(firsts) < 35  # the judge did see both orders (shuffled), yet every verdict maps back
    judge.seen.clear()
    assert judge.judge(prompts, pairs, shuffle_order=False) == verdicts
    assert [t.split("Answer 0:\n")[1].startswith("good") for t in judge.seen] == [i % 2 == 1 for i in range(40)]


def test_llm_judge_template_must_have_placeholders_and_custom_parser():
    with pytest.raises(ValueError, match="response1"):
        LLMPairwiseJudge("m", base_url="http://x", template="{prompt} {response0}")
    judge = _ScriptedJudge(lambda k: "WIN" if k == 0 else "LOSE", parse_verdict=lambda r: 0 if r == "WIN" else 1,
                           template="Q: {prompt}\nAnswer 0:\n{response0}\n\nAnswer 1:\n{response1}\nsay WIN or LOSE")
    assert judge.judge(["q"], [["good", "bad"]], shuffle_order=False) == [0]
    assert judge.judge(["q"], [["bad", "good"]], shuffle_order=False) == [1]


class _ChatHandler(http.server.BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        content = body["messages"][-1]["content"]
        first = content.split("Answer 0:\n")[1].split("\n\nAnswer 1:")[0]
        reply = {"choices": [{"message": {"role": "assistant", "content": "0" if "good" in first else "1"}}]}
        if "broken" in content:
            reply = {"error": "no"}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_endpoint_judge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        judge = OpenAIPairwiseJudge("local-judge", base_url=url, api_key="k", max_requests=3, system_prompt="be fair")
        got = judge.judge(["a", "b", "c", "d"], [["good", "bad"], ["bad", "good"], ["broken good", "bad"],
                                                 ["good", "bad"]])
        assert got[:2] == [0, 1]
        assert got[2] == -1 and judge.errors  # an unreadable reply is a failed verdict, recorded
        assert got[3] == -1  # past max_requests
        path, body, auth = _ChatHandler.requests[0]
        assert path == "/v1/chat/completions" and body["model"] == "local-judge" and auth == "Bearer k"
        assert body["messages"][0] == {"role": "system", "content": "be fair"}
    finally:
        server.shutdown()
    dead = LLMPairwiseJudge("m", base_url=url, timeout=2)
    assert dead.judge(["a"], [["x", "y"]]) == [-1] and dead.errors


def test_in_process_llm_judge_runs_through_the_engine():
    from posttrain.models import build_tiny

    model, tok = build_tiny("nano")
    judge = LLMPairwiseJudge(model, tok, max_new_tokens=4)
    verdicts = judge.judge(["What is 1 + 1?"] * 3, [["2", "3"]] * 3, shuffle_order=False)
    assert len(judge.replies) == 3 and all(isinstance(r, str) for r in judge.replies)
    assert verdicts == [parse_verdict(r) for r in judge.replies]
    assert len(set(judge.replies)) == 1  # greedy: the same chat gets the same reply


def test_rule_judge_uses_reward_and_dataset_columns_and_ties():
    judge = RewardFunctionJudge("arithmetic")
    prompts = ["What is 2 + 3?\n"] * 3
    pairs = [["<answer>5</answer>", "<answer>6</answer>"], ["<answer>4</answer>", "<answer>5</answer>"],
             ["<answer>1</answer>", "<answer>2</answer>"]]
    assert judge.judge(prompts, pairs, answer=["5"] * 3) == [0, 1, -1]
    probs = judge.judge(prompts, pairs, return_scores=True, answer=["5"] * 3)
    assert probs == pytest.approx([torch.sigmoid(torch.tensor(1.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item(), 0.5])
    with pytest.raises(ValueError, match="exactly 2"):
        judge.judge(["p"], [["a", "b", "c"]], answer=["1"])
    assert judge_pairs(judge, prompts, pairs, {"answer": ["5"] * 3}).tolist() == [1.0, 0.0, 0.5]


def test_reward_model_judge_is_bradley_terry_on_scores():
    from posttrain.models import load_model, load_tokenizer
    from posttrain.online.rewards import RewardModelScorer

    model, tok = load_model("tiny:nano", task="seq-cls", num_labels=1), load_tokenizer("tiny:nano")
    scorer = RewardModelScorer(model, tokenizer=tok)
    judge = RewardModelJudge(scorer)
    prompts, pairs = ["p1", "p2"], [["alpha", "beta gamma"], ["x", "yy"]]
    s = scorer(["p1", "p1", "p2", "p2"], ["alpha", "beta gamma", "x", "yy"])
    assert judge.judge(prompts, pairs) == [0 if s[0] > s[1] else 1, 0 if s[2] > s[3] else 1]
    probs = judge.judge(prompts, pairs, return_scores=True)
    assert probs == pytest.approx([torch.sigmoid(torch.tensor(s[0] - s[1])).item(),
                                   torch.sigmoid(torch.tensor(s[2] - s[3])).item()], abs=1e-5)


class _Blender:
    """A local stand-in for llm_blender.Blender: ranks by length (longer is better), as PairRM's API does
    (1-based ranks per candidate, or logits with return_scores)."""

    loaded = None

    def loadranker(self, name, device=None):
        type(self).loaded = (name, device)

    def rank(self, prompts, candidates, return_scores=False, disable_tqdm=False):
        import numpy as np

        scores = np.array([[float(len(c)) for c in cands] for cands in candidates])
        if return_scores:
            return scores
        return np.argsort(np.argsort(-scores, axis=1), axis=1) + 1


def test_pairrm_judge_loads_through_llm_blender(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_blender", types.SimpleNamespace(Blender=_Blender))
    judge = PairRMJudge(device="cpu")
    assert _Blender.loaded == ("llm-blender/PairRM", "cpu")
    pairs = [["short", "much longer"], ["much longer", "short"]] * 10
    assert judge.judge(["p"] * 20, pairs) == [1, 0] * 10
    probs = judge.judge(["p"] * 2, pairs[:2], return_scores=True)
    assert probs == pytest.approx([1 / (1 + torch.exp(torch.tensor(6.0)).item()), 1 / (1 + torch.exp(torch.tensor(-6.0)).item())])


def test_pairrm_judge_without_llm_blender_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_blender", None)
    with pytest.raises(ImportError, match="llm-blender.*RewardModelJudge"):
        PairRMJudge()


class _Const(BaseBinaryJudge):
    def __init__(self, values):
        self.values = values

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        return self.values


def test_all_true_judge_combines_binary_judges():
    judge = AllTrueJudge([_Const([1, 1, 0, 1]), _Const([1, 0, 0, -1])])
    assert judge.judge(["p"] * 4, ["c"] * 4) == [1, 0, 0, -1]
    with pytest.raises(ValueError, match="returned 2"):
        AllTrueJudge([_Const([2])]).judge(["p"], ["c"])


def test_trl_style_custom_pairwise_judge_plugs_in():
    class PreferShorter(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [0 if len(a) < len(b) else 1 for a, b in completions]

    assert judge_pairs(PreferShorter(), ["p", "p"], [["a", "bb"], ["ccc", "d"]]).tolist() == [1.0, 0.0]
