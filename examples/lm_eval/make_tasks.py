#!/usr/bin/env python
"""Write the example lm-eval tasks' data from the held-out play of the default corpus (Hamlet, public domain).

    python examples/lm_eval/make_tasks.py        # after the main job fetched the corpus once

* ``hamlet_passages.jsonl`` (task ``hamlet_ppl``, rolling log-likelihood: word/byte perplexity, bits per
  byte): 30 speeches of 200-800 characters.
* ``hamlet_cloze.jsonl`` (task ``hamlet_cloze``, multiple choice): 40 verse lines; the last word against
  the last word of another line.
Hamlet is held out of training, so both measure generalisation. Deterministic (seed 0).
"""

import json
import random
import re
from pathlib import Path

from megatron_tfree.data.corpus import default_corpus_text_files

HERE = Path(__file__).resolve().parent


def main() -> None:
    path = next(Path(p) for p in default_corpus_text_files(split="valid") if Path(p).name == "hamlet_gut.txt")
    blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
    speeches = []
    for b in blocks:  # "Hor.\nBefore my God, ..." : the speaker line, then the speech
        head, _, speech = b.partition("\n")
        if re.fullmatch(r"[A-Z][a-z]+\.", head) and 200 <= len(speech) <= 800:
            speeches.append(speech)
    rng = random.Random(0)
    passages = rng.sample(speeches, 30)
    lines = [ln.strip() for s in speeches for ln in s.splitlines() if len(ln.split()) >= 6]
    lines = [ln for ln in lines if re.fullmatch(r"[A-Za-z']+[.,;:!?]?", ln.split()[-1])]
    chosen = rng.sample(lines, 80)
    cloze = []
    for line, other in zip(chosen[:40], chosen[40:]):
        context, last = line.rsplit(" ", 1)
        choices = [last.rstrip(".,;:!?"), other.rsplit(" ", 1)[1].rstrip(".,;:!?")]
        answer = rng.randint(0, 1)
        if answer:
            choices.reverse()
        cloze.append({"context": context, "choices": choices, "answer": answer})
    (HERE / "hamlet_passages.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    (HERE / "hamlet_cloze.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cloze))
    print(f"wrote {len(passages)} passages and {len(cloze)} cloze items to {HERE}")


if __name__ == "__main__":
    main()
