import sys

from ._cli import main

if __name__ == "__main__":  # not when a server process of ``serve`` imports it
    sys.exit(main())
