"""``selora convert SRC OUT --to selora|peft|merged --model M``: PEFT adapters in and out, and a
merged model (``selora.adapters.peft`` does the work; SRC is a selora or a PEFT adapter directory)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="adapter directory: selora format or PEFT (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="output directory (selora, peft) or .safetensors file (merged)")
    parser.add_argument("--to", required=True, choices=("selora", "peft", "merged"), help="what to write")
    parser.add_argument("--model", required=True, help="the base model the adapter is for (as for selora serve)")
    parser.add_argument("--weights", default=None, help="the base's weights (open_clip tag or local safetensors)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-active-blocks", type=int, default=None, metavar="K",
                        help="keep the K blocks with the largest ||dW||_F")
    budget.add_argument("--min-energy", type=float, default=None, metavar="F",
                        help="keep the fewest blocks holding at least this share of sum ||dW||^2")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from selora.adapters.format import AdapterError, save_adapter
    from selora.adapters.peft import merged_state_dict, prune, read_adapter, save_peft
    from selora.models import ModelError, load_backbone

    try:
        backbone = load_backbone(args.model, args.weights)
        adapter = read_adapter(args.src, backbone)
        total = len(adapter.blocks)
        adapter, share = prune(adapter, backbone, args.max_active_blocks, args.min_energy)
        if args.to == "selora":
            save_adapter(adapter, args.out)
        elif args.to == "peft":
            save_peft(adapter, backbone, args.out)
        else:
            if not args.out.endswith(".safetensors"):
                raise ValueError("--to merged writes a .safetensors file: OUT must end with .safetensors")
            save_file(merged_state_dict(adapter, backbone), args.out)
    except (AdapterError, ModelError, ValueError) as e:
        print(f"selora convert: {e}", file=sys.stderr)
        return 2
    print(f"{args.to}: {args.out}: {len(adapter.blocks)}/{total} blocks kept, "
          f"{100 * share:.2f}% of sum ||dW||^2, variant {adapter.variant}, r {adapter.r}")
    return 0
