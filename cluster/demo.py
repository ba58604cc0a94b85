"""The README's first command: start the embedded cluster, generate, print the status, stop."""


def main() -> None:
    print("moecluster demo: not yet (lands with the gRPC/CLI issue)")


if __name__ == "__main__":
    main()
