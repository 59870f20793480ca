"""``python -m pipeline.analysis.report``: same options as ``unioncam report``."""

import sys

from pipeline.analysis.report.command import main

sys.exit(main())
