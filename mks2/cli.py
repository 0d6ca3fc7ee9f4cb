"""The ``mks2`` console script (also ``python -m mks2``): one command line for the tools.

    mks2 pretokenize --input data.jsonl --format llava --tokenizer TOK --output shards/
    mks2 convert runs/demo_stage2 hf/demo --merge-lora
    mks2 evaluate hf/demo --mc demo:eval_mc
    mks2 chat hf/demo
    mks2 plot runs/demo_stage1 -o curves.png
    mks2 demo                       # build the demo world and list its paths
    mks2 gpu-smoke                  # NCCL, llama parity, attention, MoME op, two short runs on this node
    mks2 COMMAND --help             # the command's own options

Each command runs the ``main`` of the script in ``tools/`` (installed with the package as ``mks2._tools``;
see setup.py), so ``mks2 convert ...`` and ``python tools/convert_to_hf.py ...`` are the same program.
Training stays with the launchers: ``deepspeed launch/pretrain_mvm.py`` and ``launch/finetune_mome.py``.
Nothing heavy is imported before a command is chosen: ``mks2 --help`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys

# command -> (module whose main(argv) runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretokenize": ("mks2._tools.pretokenize", "raw records -> pretokenized Arrow shards (tools/pretokenize.py)"),
    "convert": ("mks2._tools.convert_to_hf", "training checkpoint -> Hugging Face model (tools/convert_to_hf.py)"),
    "evaluate": ("mks2._tools.evaluate", "benchmarks on an exported or training model (tools/evaluate.py)"),
    "chat": ("mks2._tools.chat", "interactive chat with an exported model (tools/chat.py)"),
    "plot": ("mks2._tools.plot_metrics", "training curves of runs' metrics.jsonl -> PNG (tools/plot_metrics.py)"),
    "demo": ("mks2.demo.__main__", "build the embedded demo world and print its paths (python -m mks2.demo)"),
    "gpu-smoke": ("mks2._tools.gpu_smoke", "check one GPU node before a large job (tools/gpu_smoke.py)"),
}


def available() -> dict[str, tuple[str, str]]:
    """The commands whose module is installed (``chat`` needs tools/chat.py). Only the tools are probed:
    finding ``mks2.demo.__main__`` would import ``mks2.demo``, and with it torch."""
    return {
        name: (module, description)
        for name, (module, description) in COMMANDS.items()
        if not module.startswith("mks2._tools.") or importlib.util.find_spec(module) is not None
    }


def usage() -> str:
    commands = available()
    width = max(len(name) for name in commands) + 2
    lines = ["usage: mks2 COMMAND [options]   (mks2 COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}{description}" for name, (_, description) in commands.items()]
    lines += ["", "training: deepspeed launch/pretrain_mvm.py (stage 1), deepspeed launch/finetune_mome.py (stage 2)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    commands = available()
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}' (commands: {', '.join(commands)}){hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    sys.argv = [f"mks2 {name}", *rest]  # argparse names the program after argv[0]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
