import sys

from convert_weights.cli import main

sys.exit(main())
