import sys

from policy_server.cli import main

sys.exit(main())
