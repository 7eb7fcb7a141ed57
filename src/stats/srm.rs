//! Sample ratio mismatch: chi-square goodness of fit of enrolled clients per branch.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Result of the sample ratio mismatch test.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Srm {
    /// Σ (observed - expected)² / expected.
    pub chi_square: f64,
    /// P(χ² >= chi_square) under the configured ratios; small means a mismatch.
    pub p_value: f64,
    /// Branches - 1.
    pub degrees_of_freedom: usize,
}

/// Chi-square test of `observed` clients per branch against `expected_ratios` (any positive
/// weights, normalized here). None when there are fewer than two branches, the lengths differ,
/// no client was observed, or a ratio is not a positive finite number.
pub fn sample_ratio_mismatch(observed: &[u64], expected_ratios: &[f64]) -> Option<Srm> {
    if observed.len() < 2 || observed.len() != expected_ratios.len() {
        return None;
    }
    if expected_ratios.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        return None;
    }
    let total: u64 = observed.iter().sum();
    if total == 0 {
        return None;
    }
    let ratio_sum: f64 = expected_ratios.iter().sum();
    let chi_square: f64 = observed
        .iter()
        .zip(expected_ratios)
        .map(|(&o, &r)| {
            let e = total as f64 * r / ratio_sum;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    let degrees_of_freedom = observed.len() - 1;
    let dist = ChiSquared::new(degrees_of_freedom as f64).ok()?;
    Some(Srm {
        chi_square,
        p_value: dist.sf(chi_square),
        degrees_of_freedom,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_and_mismatched() {
        let s = sample_ratio_mismatch(&[500, 500], &[0.5, 0.5]).unwrap();
        assert_eq!(s.chi_square, 0.0);
        assert_eq!(s.p_value, 1.0);
        assert_eq!(s.degrees_of_freedom, 1);
        // 520 vs 480 at 50/50: χ² = (20² + 20²) / 500 = 1.6; p = 0.2059 (R: pchisq(1.6, 1, lower=F)).
        let s = sample_ratio_mismatch(&[520, 480], &[1.0, 1.0]).unwrap();
        assert!((s.chi_square - 1.6).abs() < 1e-12);
        assert!((s.p_value - 0.205_903_1).abs() < 1e-6, "{}", s.p_value);
        // Three branches 1:1:2, observed 100, 100, 300: expected 125, 125, 250 → χ² = 5 + 5 + 10
        // = 20 with 2 degrees of freedom, where p = exp(-χ²/2) exactly.
        let s = sample_ratio_mismatch(&[100, 100, 300], &[1.0, 1.0, 2.0]).unwrap();
        assert!((s.chi_square - 20.0).abs() < 1e-12);
        assert_eq!(s.degrees_of_freedom, 2);
        assert!((s.p_value - (-10f64).exp()).abs() < 1e-15);
        assert_eq!(sample_ratio_mismatch(&[0, 0], &[1.0, 1.0]), None);
        assert_eq!(sample_ratio_mismatch(&[1], &[1.0]), None);
        assert_eq!(sample_ratio_mismatch(&[1, 2], &[1.0, 0.0]), None);
    }
}
