import sys

from specwhisper_export.cli import main

sys.exit(main())
