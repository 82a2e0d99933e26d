"""IMDB reviews cut to the end that a left-truncated context of N tokens reads, under both tokenizers
of the family (small-a's BPE, small-c's unigram), so that the data travels to a GPU machine in a
few MiB and every prompt tuned or scored there sees the same tokens as here.

    python bench/gpu/trim_imdb.py ../shared/data/imdb /tmp/imdb-trim/imdb 160
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

source, target, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
models = source.parent.parent / "models"
tokenizers = [Tokenizer.from_file(str(models / name / "tokenizer.json")) for name in ("small-a", "small-c")]
target.mkdir(parents=True, exist_ok=True)
for split in ("train", "validation", "test"):
    rows = [json.loads(line) for line in (source / f"{split}.jsonl").open()]
    texts = [row["text"] for row in rows]
    starts = [len(text) for text in texts]
    for tokenizer in tokenizers:
        for i, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
            offsets = encoding.offsets
            starts[i] = min(starts[i], offsets[-keep][0] if len(offsets) > keep else 0)
    with (target / f"{split}.jsonl").open("w") as f:
        for row, start in zip(rows, starts, strict=True):
            start = max(row["text"].rfind(" ", 0, start), 0) if start else 0  # cut between words
            f.write(json.dumps({**row, "text": row["text"][start:]}) + "\n")
    print(split, len(rows), "reviews")
