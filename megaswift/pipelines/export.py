"""``megaswift export``: convert between HF and megatron-core checkpoints (``--to_mcore`` / ``--to_hf``)."""
from __future__ import annotations

import warnings

from ..arguments.export import ExportArguments
from ..utils.paths import check_output_dir_writable


def export_main(args: ExportArguments | None = None, **kwargs) -> str:
    """Run one conversion; returns the output directory. ``export_main(model=..., to_mcore=True)`` works too."""
    if args is None:
        args = ExportArguments(**kwargs)
    # the output is written next to --output_dir and renamed into place: its parent must take new folders
    check_output_dir_writable(args.output_dir, '--output_dir', replaced_whole=True)
    # megatron-core warns at import that TE/Apex are missing; megaswift's CPU/local spec does not use them
    warnings.filterwarnings('ignore', message=r'.*(Transformer Engine|Apex) (and Apex )?(are|is) not installed')
    from ..export import hf_to_mcore, mcore_to_hf
    return hf_to_mcore(args) if args.to_mcore else mcore_to_hf(args)
