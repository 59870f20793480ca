"""``unioncam report``: a Markdown faithfulness report with PNG figures.

Two sources:

* ``--images DIR`` — compute on the fly with :func:`pipeline.analysis.evaluate.compare_methods`:
  the paper's UnionCAM (``unioncam:paper``) and the default preset (``unioncam``) against
  Grad-CAM, Grad-CAM++, Score-CAM, Group-CAM, the denoised map L_den (``denoised``) and the
  fused map L_fused (``fused:denoised+scorecam``), on the same images, with RISE
  insertion/deletion curves. Names are :mod:`unioncam.names`' (as in ``unioncam run``).
  Results are checkpointed per batch (``.npz`` in a cache folder), so an interrupted or
  time-budgeted run resumes where it stopped; images are processed in a seeded random
  order, so a run cut short by ``--time-budget`` reports a random subset, not the
  alphabetically first classes.
* ``--store STORE`` — summarise what a pipeline run stored: the per-image
  ``metrics/<name>`` arrays (selected map, and every pool member with
  ``insertion@<member>``), which member was selected how often, per-class means, and a
  gallery of stored maps placed on the original photos (via the stored ``crop_box``).
  Read unit by unit: only the per-image scalars and the gallery's few maps are loaded.

Settings: one :class:`ReportConfig`, which ``unioncam report`` builds from its flags.

What the report contains: a table of mean insertion ↑, deletion ↓ and insertion − deletion
↑ per method with 95% bootstrap confidence intervals; a *paired* bootstrap of every
method's difference to UnionCAM (same resampled images for both, which is what tells
"better on these images" apart from noise) with how often UnionCAM wins per image; a
plain-language list of where UnionCAM does **not** win; mean insertion and deletion
curves; how often each pool member was selected; and a gallery.

Why bootstrap: per-image AUCs are far from normal (many near 0 or 1), and the methods are
compared on the same images, so a percentile bootstrap over images — paired for the
differences — is the simplest honest interval. Above 50,000 images a normal approximation
is used instead (the bootstrap would cost minutes and agrees there); the report says which.
"""

from pipeline.analysis.report.command import add_report_arguments, main, report_command
from pipeline.analysis.report.config import ReportConfig
from pipeline.analysis.report.render import build_report
from pipeline.analysis.report.sample import GalleryItem, ReportSample
from pipeline.analysis.report.stats import ReportError, bootstrap_ci, paired_bootstrap
from pipeline.analysis.report.stored import summarize_store

__all__ = [
    "GalleryItem",
    "ReportConfig",
    "ReportError",
    "ReportSample",
    "add_report_arguments",
    "bootstrap_ci",
    "build_report",
    "main",
    "paired_bootstrap",
    "report_command",
    "summarize_store",
]
