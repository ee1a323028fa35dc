"""`zeroserve models check DIR`: is a local model directory served exactly, before serving it?

Reads the directory's config, tokenizer and generation config (no weights; nothing binds or
connects) through workers/llm/support.py and prints what the engine will make of it:
architecture, dtype, context length, attention per layer (full or a sliding window), logit
softcaps, sinks, chat template, EOS ids, KV bytes per token, and every reason it would be
refused. Exit 0 when supported, 1 when refused, 2 when DIR is no model directory.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    from zeroserve.workers.llm.support import check

    ap = argparse.ArgumentParser(prog="zeroserve models", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("check", help="report whether the engine serves DIR exactly")
    one.add_argument("dir")
    one.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = check(args.dir)
    except FileNotFoundError as exc:
        print(f"zeroserve models check: {exc}")
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        windows = report.window_per_layer
        attention = ", ".join(f"window {w}" if w else "full" for w in windows) or "none"
        rows = [("architecture", f"{report.architecture} ({report.model_type})"),
                ("dtype", report.dtype), ("context length", report.context_length),
                ("layers", f"{report.layers}: {attention}"),
                ("attention softcap", report.attn_softcap),
                ("final logit softcap", report.final_softcap),
                ("attention sinks", report.sinks), ("chat template", report.chat_template),
                ("EOS ids", report.eos_token_ids),
                ("KV bytes per token", report.kv_bytes_per_token),
                ("supported", "yes" if report.ok else "no: " + "; ".join(report.refusals))]
        for name, value in rows:
            print(f"{name:>20}  {value}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
