import sys

if sys.platform == "win32":  # before anything imports fcntl
    print(
        "error: the pipeline needs a POSIX system such as Linux (file locks, fork); on Windows, run it inside "
        "WSL2, whose CUDA support reaches the GPU.",
        file=sys.stderr,
    )
    sys.exit(2)

from pipeline.cli import end_with_dvc, leave, main, stop_on_sigterm

stop_on_sigterm()
end_with_dvc()
leave(main())
