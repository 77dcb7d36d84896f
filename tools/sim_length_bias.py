"""Which pair score is length-fair? A simulation on the shipped claim pairs' real GPT-2 token sequences.

    PYTHONPATH=. python tools/sim_length_bias.py [--claims experiments/claims/antivax_six.yaml]

Fine-tuning changes a model in ways that have nothing to do with a claim's content, and a pair score should
not move with them. Three changes between a reference and a fine-tuned model are simulated on every pair:
  fluency  +0.2 nats on every token (the model got better at the language);
  opening  +1 nat on the first token of every statement (it expects messages to start differently);
  content  +0.05 nats on each token of the false claim's own continuation, with token-level noise (SD 0.5,
           independent between the two models): the effect a score should detect.
For each measure the table gives the mean paired difference (fine-tuned - reference) over pairs under each
content-free change (its bias: 0 is fair), that bias as a share of the measure's response to the content
change (so that measures in different units compare), and, under the content change, the mean over 400 draws
of the detection statistic mean / standard error over claims (higher is more sensitive).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fakegpt.data.tokenizer import get_encoding
from fakegpt.measure.prompts import DEFAULT_CLAIMS, load_claims, resolve_path
from fakegpt.measure.score import pair_measures
from fakegpt.models.codec import Codec

MEASURES = ("score", "score_sum", "score_per_byte", "score_full_mean")
ROOT = Path(__file__).resolve().parents[1]


def pairs_of(claims: Path) -> list[tuple[str, list[int], list[int]]]:
    """(claim id, false ids, true ids) of every pair's first statements."""
    enc = get_encoding()
    sides: dict[str, dict[str, object]] = {}
    for s in load_claims(claims):
        if s.pair_id and s.variant == 0:
            sides.setdefault(s.pair_id, {"claim": s.claim_id})[s.role] = enc.encode(s.text)
    return [(v["claim"], v["false"], v["true"]) for v in sides.values() if "false" in v and "true" in v]


def paired(pairs, change, rng) -> dict[str, np.ndarray]:
    """Per pair and measure: the fine-tuned model's score minus the reference's under `change`."""
    out = {m: [] for m in MEASURES}
    for _, ids_f, ids_t in pairs:
        bytes_f, bytes_t = (Codec().token_bytes(ids) for ids in (ids_f, ids_t))
        base = {k: rng.normal(-4.0, 1.5, len(ids)) for k, ids in (("f", ids_f), ("t", ids_t))}
        shared = pair_measures(ids_f, [0.0] * len(ids_f), ids_t, [0.0] * len(ids_t), bytes_f, bytes_t)["shared_tokens"]
        base["t"][:shared] = base["f"][:shared]  # the same context gives the same log-probabilities
        tuned = {k: v.copy() for k, v in base.items()}
        if change == "fluency":
            for v in tuned.values():
                v += 0.2
        elif change == "opening":
            for v in tuned.values():
                v[0] += 1.0
        else:  # content: the false continuation gains, both models measured with independent noise
            tuned["f"][shared:] += 0.05
            for d in (base, tuned):
                for k in d:
                    d[k] = d[k] + rng.normal(0.0, 0.5, d[k].size)
                d["t"][:shared] = d["f"][:shared]
        a = pair_measures(ids_f, base["f"].tolist(), ids_t, base["t"].tolist(), bytes_f, bytes_t)
        b = pair_measures(ids_f, tuned["f"].tolist(), ids_t, tuned["t"].tolist(), bytes_f, bytes_t)
        for m in MEASURES:
            out[m].append(b[m] - a[m])
    return {m: np.asarray(v) for m, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", default=DEFAULT_CLAIMS)
    args = parser.parse_args()
    pairs = pairs_of(resolve_path(args.claims))
    rng = np.random.default_rng(0)
    lengths = np.array([len(t) - len(f) for _, f, t in pairs])
    print(f"{len(pairs)} pairs; correction - claim tokens: mean {lengths.mean():+.2f}, max |.| {np.abs(lengths).max()}")
    bias = {c: paired(pairs, c, rng) for c in ("fluency", "opening")}
    z = {m: [] for m in MEASURES}
    effect = {m: [] for m in MEASURES}
    claims = np.array([c for c, _, _ in pairs])
    for _ in range(400):
        d = paired(pairs, "content", rng)
        for m in MEASURES:
            per_claim = np.array([d[m][claims == c].mean() for c in np.unique(claims)])
            z[m].append(per_claim.mean() / (per_claim.std(ddof=1) / np.sqrt(per_claim.size)))
            effect[m].append(per_claim.mean())
    print("| measure | bias: fluency | share of effect | bias: opening | share of effect | content: mean z |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in MEASURES:
        e = np.mean(effect[m])
        fl, op = bias["fluency"][m].mean(), bias["opening"][m].mean()
        print(f"| {m} | {fl:+.4f} | {fl / e:+.0%} | {op:+.4f} | {op / e:+.0%} | {np.mean(z[m]):.2f} |")


if __name__ == "__main__":
    main()
