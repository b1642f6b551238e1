"""``python -m aquila_npu.preflight``: a torchrun launch's inputs checked in one process, for the number of processes
the launch would start (``aquila_npu.cli.preflight``)."""

from __future__ import annotations



def run(args) -> int:
    a, world = args.command_args, args.world
    if args.command == "pretrain":
        from aquila_npu.lora import training as lora_training
        from aquila_npu.training.run import check

        check(a, world, lora_training.transform(a))  # (LoRA flags against the --lora-load adapter, its model)
    elif args.command in ("generate", "evaluate"):
        from aquila_npu.inference.options import model_options
        from aquila_npu.inference.session import check

        if args.command == "generate":
            from aquila_npu.inference.command import read_prompts

            read_prompts(a)
        else:
            from aquila_npu.evaluation.command import prepare

            prepare(a)
        check(model_options(a), world)
    print(f"preflight: {args.prog} with {world} process(es): flags{_checked(args.command)} are fine", flush=True)
    return 0


def _checked(command: str) -> str:
    return {"pretrain": ", data, tokenizer, checkpoint and layout", "generate": ", prompts, checkpoint and layout",
            "evaluate": ", tasks, data, checkpoint and layout"}.get(command, "")
