"""SupportRetentionRatio against independent computations: brute force, a hand-checkable model, 2-process DDP."""

import math
import os

import numpy as np
import pytest
import torch
from conftest import run_on_gloo_ranks
from torch import nn

from cappo_pl.metrics import SupportRetentionRatio, threshold_key
from cappo_pl.models import build_char_tokenizer
from cappo_pl.references import SRRConfig, build_reference_set, encode_references, reference_logprobs

THRESHOLDS = (0.1, 0.01, 0.001)


def _brute(logp, mask, sft, ids, thresholds=THRESHOLDS, rel=0.1):
    """Plain-Python SRR over lists (one reference per row)."""
    means = [sum(lp[t] for t in range(len(lp)) if m[t]) / sum(m) for lp, m in zip(logp, mask, strict=True)]
    sft_means = [sum(lp[t] for t in range(len(lp)) if m[t]) / sum(m) for lp, m in zip(sft, mask, strict=True)]
    out = {}
    for tau in thresholds:
        out[f"srr@{threshold_key(tau)}"] = sum(v >= math.log(tau) for v in means) / len(means)
    out["srr"] = out[f"srr@{threshold_key(thresholds[0])}"]
    out["srr_rel"] = sum(a - b >= math.log(rel) for a, b in zip(means, sft_means, strict=True)) / len(means)
    per_prompt = {}
    for v, i in zip(means, ids, strict=True):
        per_prompt.setdefault(i, []).append(v >= math.log(thresholds[0]))
    out["srr_per_prompt"] = sum(sum(h) / len(h) for h in per_prompt.values()) / len(per_prompt)
    return out


def _data(seed, n=40, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 8  # means spread over the thresholds
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    sft = -torch.rand(n, t, generator=g, dtype=torch.float64) * 6
    ids = torch.arange(n) // 5  # 8 prompts x 5 references; the last prompts have fewer after splits
    return logp, mask, sft, ids


def test_matches_brute_force_over_several_updates():
    logp, mask, sft, ids = _data(0)
    metric = SupportRetentionRatio(THRESHOLDS, relative_threshold=0.1)
    for rows in (slice(0, 15), slice(15, 25), slice(25, 40)):  # splits on prompt boundaries
        metric.update(logp[rows], mask[rows], sft[rows], ids[rows])
    got = {k: float(v) for k, v in metric.compute_all().items()}
    want = _brute(logp.tolist(), mask.tolist(), sft.tolist(), ids.tolist())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert float(metric.compute()) == pytest.approx(want["srr"])
    assert 0 < want["srr"] < 1 and 0 < want["srr@1e-03"] <= 1  # the data exercises both outcomes


def test_per_prompt_weights_prompts_equally():
    # prompt 0: 1 of 1 retained; prompt 1: 0 of 3 retained -> pooled 1/4, per-prompt mean (1 + 0) / 2
    logp = torch.tensor([[-0.1], [-9.0], [-9.0], [-9.0]])
    metric = SupportRetentionRatio((0.1,))
    metric.update(logp, torch.ones(4, 1), prompt_ids=torch.tensor([0, 1, 1, 1]))
    out = metric.compute_all()
    assert float(out["srr"]) == 0.25 and float(out["srr_per_prompt"]) == 0.5


def test_boundary_is_inclusive_and_bad_input_is_refused():
    metric = SupportRetentionRatio((0.5,))
    metric.update(torch.full((1, 2), math.log(0.5), dtype=torch.float64), torch.ones(1, 2))
    assert float(metric.compute()) == 1.0
    with pytest.raises(ValueError, match="no tokens"):
        metric.update(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="thresholds"):
        SupportRetentionRatio((0.0,))
    assert math.isnan(float(SupportRetentionRatio().compute()))


class UnigramLM(nn.Module):
    """A causal LM whose next-token distribution ignores the context: ``p(y) = probs[y]``.

    ``base_model`` returns a constant hidden state 1 and the head's weight column is ``log probs``,
    so ``softmax(logits) = probs`` exactly and every logprob is checkable by hand.
    """

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.head = nn.Linear(1, probs.numel(), bias=False)
        self.head.weight.data = probs.log().float()[:, None]

    def base_model(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return type("Out", (), {"last_hidden_state": torch.ones(*input_ids.shape, 1)})()

    def get_output_embeddings(self):
        return self.head


def test_teacher_forced_srr_on_a_hand_checkable_model():
    tok = build_char_tokenizer()
    v = len(tok)
    probs = torch.full((v,), 0.5 / (v - 3))
    digit1, plus, eos = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("+"), tok.eos_token_id
    probs[digit1], probs[plus], probs[eos] = 0.3, 0.1, 0.1
    model = UnigramLM(probs / probs.sum())
    p = (probs / probs.sum()).double()
    refs = ["1+1", "1+9", "99+9"]
    # by hand: mean over the completion's tokens and EOS of log p(token)
    want = [
        (3 * math.log(p[digit1]) - 0 + math.log(p[plus]) + math.log(p[eos]) - math.log(p[digit1])) / 4,
        (math.log(p[digit1]) + math.log(p[plus]) + math.log(p[tok.convert_tokens_to_ids("9")]) + math.log(p[eos])) / 4,
        (3 * math.log(p[tok.convert_tokens_to_ids("9")]) + math.log(p[plus]) + math.log(p[eos])) / 5,
    ]
    (logp, mask), *_ = reference_logprobs(model, tok, ["12=", "10=", "108="], refs, 1.0, 8, 3, "cpu")
    got = (logp.double() * mask).sum(-1) / mask.sum(-1)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    metric = SupportRetentionRatio((0.1, 0.02))
    metric.update(logp, mask)
    out = metric.compute_all()
    assert float(out["srr"]) == pytest.approx(np.mean([w >= math.log(0.1) for w in want]))
    assert float(out["srr@2e-02"]) == pytest.approx(np.mean([w >= math.log(0.02) for w in want]))


def test_encoding_is_the_sft_layout():
    tok = build_char_tokenizer()
    ids, attn, t = encode_references(tok, ["7=", "10="], ["3+4", "5+5"], "cpu")
    assert t == 4  # three characters + EOS
    assert ids[0, -t:].tolist() == [*tok("3+4", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert attn[:, -t:].sum().item() == 8 and attn[0, 0].item() == 0  # the shorter prompt is left-padded


def test_reference_set_uses_data_then_samples_once():
    from cappo_pl.data.records import Record

    calls = []

    def sampler(prompts):
        calls.append(prompts)
        return [["a", "b", "c"] for _ in prompts]

    records = [Record("1=", ["x", "y"]), Record("2="), Record("3=", ["z"])]
    refs = build_reference_set(records, SRRConfig(max_per_prompt=2), sampler)
    assert refs.texts == [["x", "y"], ["a", "b"], ["z"]] and refs.sampled == 1 and calls == [["2="]]


def _srr_on_rank(rank):
    logp, mask, sft, ids = _data(1)
    rows = slice(0, 25) if rank == 0 else slice(25, 40)  # uneven shards, split on a prompt boundary
    metric = SupportRetentionRatio(THRESHOLDS)
    metric.update(logp[rows], mask[rows], sft[rows], ids[rows])
    return {k: float(v) for k, v in metric.compute_all().items()}


def test_two_process_ddp_equals_one_process():
    logp, mask, sft, ids = _data(1)
    single = SupportRetentionRatio(THRESHOLDS)
    single.update(logp, mask, sft, ids)
    want = {k: float(v) for k, v in single.compute_all().items()}
    results = run_on_gloo_ranks(_srr_on_rank)
    for rank in (0, 1):
        per_prompt = results[rank].pop("srr_per_prompt")  # a float sum of fractions: order-dependent rounding
        assert per_prompt == pytest.approx(want["srr_per_prompt"], abs=1e-15)
        assert results[rank] == {k: v for k, v in want.items() if k != "srr_per_prompt"}  # exact: sums of counts
    shard = SupportRetentionRatio(THRESHOLDS)
    shard.update(logp[:25], mask[:25], sft[:25], ids[:25])
    assert float(shard.compute()) != want["srr"]  # the shards really differ, so the sync mattered


def test_prompts_without_references_get_sampled_ones_kept_in_the_checkpoint(cli_args, tmp_path):
    import glob
    import json

    from cappo_pl.cli import main

    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"{n}=", "references": [f"1+{n - 1}"]}) + "\n" for n in range(10, 30))
    )
    val.write_text("".join(json.dumps({"prompt": f"{n}="}) + "\n" for n in range(40, 44)))  # no references
    args = cli_args(steps=2, extra=[
        "--data.task=cappo_pl.data.FileTask", f"--data.task.train_file={train}", f"--data.task.val_file={val}",
        "--data.task.reward=cappo_pl.rewards:exact_match", "--trainer.logger.init_args.name=sampled",
        "--model.srr.sampled_per_prompt=4",
    ])  # fmt: skip
    main(args)
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "sampled" / "version_*"))
    (ckpt,) = glob.glob(f"{log_dir}/checkpoints/last.ckpt")
    refs = torch.load(ckpt, map_location="cpu", weights_only=False)["cappo_srr_references"]
    assert refs["sampled"] == 4 and len(refs["texts"]) == 4
    assert all(len(t) == len(s) for t, s in zip(refs["texts"], refs["sft_scores"], strict=True))
    assert sum(len(t) for t in refs["texts"]) > 0  # EOS-terminated samples of the tiny SFT policy
    with open(f"{log_dir}/metrics.csv") as f:
        header = f.readline()
    assert "val/srr" in header and "val/srr_rel" in header


def test_a_bad_threshold_is_a_one_line_error_naming_the_key(capsys):
    from cappo_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cappo.yaml")
        main(["fit", "--config", config, "--model.srr.thresholds=[0]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: command line: model.srr.thresholds[0]: must be > 0, got 0"
