"""The Megatron-LM parallel-size flags of the tools that build a model at a layout (compare_logits,
convert_hf_to_mcore), and the ParallelLayout they give. Imports nothing heavy: the converter
parses them before it hides the GPUs."""


def add_layout_arguments(parser, context_parallel: bool = False) -> None:
    """--tp/--ep/--etp/--pp/--vpp (and --cp with `context_parallel`), each with its Megatron-LM spelling."""
    parser.add_argument("--tp", "--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", type=int, default=1)
    parser.add_argument(
        "--etp",
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="expert TP (default: --tp without EP, else 1)",
    )
    parser.add_argument("--pp", "--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument(
        "--vpp",
        "--virtual-pipeline-model-parallel-size",
        type=int,
        default=None,
        help="virtual pipeline chunks per PP rank",
    )
    if context_parallel:
        parser.add_argument(
            "--cp",
            "--context-parallel-size",
            type=int,
            default=1,
            help="context parallel size (the model then attends through flex)",
        )


def layout_from_args(args):
    """The ParallelLayout of flags added by `add_layout_arguments` (cp 1 where there is no --cp)."""
    from megadiff.platform.parallel_layout import ParallelLayout

    return ParallelLayout(tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp, vpp=args.vpp, cp=getattr(args, "cp", 1))
