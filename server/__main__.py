"""`python -m featurebank.server [flags]` is `featurebank serve [flags]`."""

import sys

from featurebank.server.main import main

sys.exit(main())
