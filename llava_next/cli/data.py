"""``llava-next data``: batch results -> training files (train/captions.py has the formats and the rules).

    llava-next data captions results.jsonl --out train.jsonl --media-root .
    llava-next data pairs chosen.jsonl rejected.jsonl --out prefs.jsonl

``captions``: every ok line of one or more ``llava-next batch`` results files becomes a LLaVA conversation item
(the prompt as the human turn, the answer, corrected by hand or not, as the gpt turn) for ``llava-next train
--method sft``. ``pairs``: the two answers of each id in two results files become ``{"id", "video" | "image",
"prompt", "chosen", "rejected"}``; the first file's answer is chosen unless the second file's line of that id
says ``"chosen": true``. Media paths are written relative to ``--media-root`` (default: the --out file's folder,
which is also train's default). Run it in the folder batch ran in (its paths are relative to it). An existing
--out is kept (it may hold hand edits) unless ``--overwrite``.
Registered into the parser by ``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_data(sub, *, user_error) -> None:
    p = sub.add_parser("data", help="turn batch results into training data (SFT captions, preference pairs)",
                       description="Convert the results of llava-next batch into training files.")
    kinds = p.add_subparsers(dest="data_command", required=True, metavar="KIND")
    c = kinds.add_parser("captions", help="batch results -> LLaVA conversations for llava-next train --method sft",
                         description="Each ok line of RESULTS (llava-next batch --out files; error lines are skipped "
                                     "and counted) becomes one training item: the prompt, then its text as the "
                                     "answer. Correct a \"text\" by hand, or delete a line, before converting.")
    c.add_argument("results", nargs="+", metavar="RESULTS.jsonl")
    p_pairs = kinds.add_parser("pairs", help="two batch results files -> preference pairs (DPO)",
                               description="The ids answered in both files become {id, video | image, prompt, "
                                           "chosen, rejected}: the first file's answer is chosen, unless the second "
                                           "file's line says \"chosen\": true. Ids with the same answer twice are "
                                           "left out.")
    p_pairs.add_argument("first", metavar="CHOSEN.jsonl", help="results whose answers are chosen by default")
    p_pairs.add_argument("second", metavar="REJECTED.jsonl", help="results of the same items, answered again "
                                                                  "(another --seed or --temperature, another model)")
    for q in (c, p_pairs):
        q.add_argument("--out", required=True, metavar="OUT.jsonl")
        q.add_argument("--media-root", default=None, metavar="DIR",
                       help="write media paths relative to DIR (default: the --out file's folder, train's default)")
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=lambda args: _captions(args, user_error))
    p_pairs.set_defaults(func=lambda args: _pairs(args, user_error))


def _out(args: argparse.Namespace, user_error) -> tuple[Path, Path]:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise user_error(f"--out {out} exists (it may hold hand edits); give another path or --overwrite")
    return out, Path(args.media_root) if args.media_root is not None else out.parent


def _captions(args: argparse.Namespace, user_error) -> int:
    from ..train.captions import caption_items, read_results, write_jsonl

    out, root = _out(args, user_error)
    answers, errors = [], 0
    for path in args.results:
        ok, failed = read_results(path)
        answers += ok
        errors += failed
    if not answers:
        raise user_error(f"no ok lines in {', '.join(args.results)} ({errors} error lines): nothing to train on")
    write_jsonl(caption_items(answers, root), out)
    print(f"[llava-next data] {len(answers)} training item(s) -> {out} (media relative to {root}); {errors} error "
          f"line(s) skipped", file=sys.stderr)
    return 0


def _pairs(args: argparse.Namespace, user_error) -> int:
    from ..train.captions import preference_pairs, read_results, write_jsonl

    out, root = _out(args, user_error)
    pairs, report = preference_pairs(read_results(args.first)[0], read_results(args.second)[0], root)
    if not pairs:
        raise user_error(f"no pairs: {report.line()}")
    write_jsonl(pairs, out)
    print(f"[llava-next data] {report.line()} -> {out}", file=sys.stderr)
    return 0
