"""Text-only ScienceQA questions as JSONL for the lm-evaluation-harness tasks beside this file.

    python benchmarks/lm_eval/build_data.py ../shared/data/scienceqa/llava_test_CQM-A.json --n 200

writes `runs/lm_eval/scienceqa_text.jsonl` (the path `sqa_text_mc.yaml` and `sqa_text_gen.yaml` read). Each line:
`question` (with its context, if any), `choices`, `answer` (index), `answer_letter`, `options` ("A. ...\\nB. ...").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llama_adapter.errors import ScienceQAError
from llama_adapter.eval.scienceqa import LETTERS, parse_llava_record

DEFAULT_OUT = Path("runs/lm_eval/scienceqa_text.jsonl")


def text_only_records(llava_json: str | Path, n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` questions without an image that have an answer, in the harness's JSONL shape."""
    out = []
    for rec in json.loads(Path(llava_json).read_text()):
        if rec.get("image"):
            continue
        try:
            p = parse_llava_record(rec)
        except ScienceQAError:
            continue
        if p.answer is None:
            continue
        question = f"{p.hint}\n{p.question}".strip() if p.hint else p.question
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(p.choices))
        out.append(
            {
                "id": p.pid,
                "question": question,
                "choices": p.choices,
                "answer": p.answer,
                "answer_letter": LETTERS[p.answer],
                "options": options,
            }
        )
        if n is not None and len(out) >= n:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llava_json", help="LLaVA's ScienceQA test file (../shared/data/scienceqa/llava_test_CQM-A.json)")
    ap.add_argument("--n", type=int, default=200, help="questions to keep (default: 200)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output JSONL (default: {DEFAULT_OUT})")
    args = ap.parse_args()
    recs = text_only_records(args.llava_json, args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
