"""`python -m featurebank.server [flags]` is `featurebank serve [flags]`."""

import sys

from featurebank.client.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
