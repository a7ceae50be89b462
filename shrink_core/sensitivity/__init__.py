"""Per-layer sensitivity, per slice: exhaustive probes (prefix reused) and a fast Fisher estimate for all modules.

See docs/sensitivity.md. Public API: `run_scan`, `Record`, `Agreement`, `SETTINGS`, `SCAN_DEPTHS`, `spearman`,
`protect_plan_yaml`, `compare_slices`.
"""
from shrink_core.sensitivity.compare import SliceComparison, compare_slices, top_modules
from shrink_core.sensitivity.plans import protect_plan_yaml
from shrink_core.sensitivity.probe import SCAN_DEPTHS, ProbeCache, ScanDepth, probe
from shrink_core.sensitivity.scan import (
                   METHOD_LABELS,
                   METHODS,
                   METRICS,
                   Agreement,
                   Record,
                   ScanReport,
                   run_scan,
                   sample_modules,
                   spearman,
                   stored_agreement,
                   stored_agreement_pairs,
                   stored_records,
)
from shrink_core.sensitivity.settings import SETTINGS, Setting, get_setting
from shrink_core.sensitivity.units import sensitivity_job

__all__ = ["SCAN_DEPTHS", "SETTINGS", "METHODS", "METHOD_LABELS", "METRICS", "Agreement", "ProbeCache", "Record",
           "ScanDepth", "ScanReport", "Setting", "SliceComparison", "compare_slices", "get_setting", "probe",
           "protect_plan_yaml", "run_scan", "sample_modules", "sensitivity_job", "spearman", "stored_agreement",
           "stored_agreement_pairs", "stored_records", "top_modules"]
