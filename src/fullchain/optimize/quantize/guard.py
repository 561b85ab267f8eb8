"""The accuracy-drop guard: a quantised model that loses more than the allowed points is refused, loudly.

Quantisation can fail silently (a bad calibration set, an outlier channel): the model still runs, only
worse. The guard compares held-out accuracy before and after and raises `QuantizationRejected`, whose
message carries both figures; the caller keeps the unquantised artifact and exits non-zero.
"""

from __future__ import annotations

from fullchain.errors import UserError


class QuantizationRejected(UserError):
    """The quantised model lost more accuracy than `optimize.max_accuracy_drop` allows."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def drop_points(accuracy_fp32: float, accuracy_quantized: float) -> float:
    """Accuracy lost by quantising, in percentage points (negative when the quantised model scores higher)."""
    return 100.0 * (accuracy_fp32 - accuracy_quantized)


def check_accuracy_drop(report: dict, max_drop_points: float) -> None:
    """Raise `QuantizationRejected` if ``report``'s accuracy drop exceeds ``max_drop_points``."""
    drop = drop_points(report["accuracy_fp32"], report["accuracy_quantized"])
    if drop > max_drop_points:
        raise QuantizationRejected(
            f"quantisation rejected: {report['method']} int8 ({report['backend']}) scores "
            f"{100 * report['accuracy_quantized']:.2f}% on the held-out split against "
            f"{100 * report['accuracy_fp32']:.2f}% in fp32, a drop of {drop:.2f} points "
            f"> optimize.max_accuracy_drop {max_drop_points:g}; the unquantised artifact is kept",
            report,
        )
