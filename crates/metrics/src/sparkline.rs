//! Sparklines for `nonstop metrics`: one block character per value.

/// The eight levels, lowest first.
pub const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One character per value (e.g. from [`Store::recent`](crate::store::Store::recent)):
/// a space where there is no value (or it is not finite), otherwise a
/// bar scaled from zero (or the smallest value, if negative) to the
/// largest value, so a steady load draws full bars and an idle one the
/// lowest. All values equal to the baseline draw the lowest bar.
pub fn sparkline(values: &[Option<f64>]) -> String {
    let finite = || values.iter().filter_map(|v| v.filter(|v| v.is_finite()));
    let low = finite().fold(0.0f64, f64::min);
    let high = finite().fold(low, f64::max);
    let span = high - low;
    values
        .iter()
        .map(|v| match v.filter(|v| v.is_finite()) {
            None => ' ',
            Some(_) if span <= 0.0 || !span.is_finite() => BARS[0],
            Some(v) => {
                let level = ((v - low) / span * (BARS.len() - 1) as f64).round();
                BARS[(level.max(0.0) as usize).min(BARS.len() - 1)]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn some(v: &[f64]) -> Vec<Option<f64>> {
        v.iter().map(|&v| Some(v)).collect()
    }

    #[test]
    fn scales_from_zero_to_the_largest() {
        assert_eq!(sparkline(&some(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])), "▁▂▃▄▅▆▇█");
        assert_eq!(sparkline(&some(&[50.0, 50.0, 50.0])), "███", "steady: full bars");
        assert_eq!(sparkline(&some(&[0.0, 0.0])), "▁▁", "idle: lowest bars");
        assert_eq!(sparkline(&some(&[10.0, 5.0])), "█▅");
    }

    #[test]
    fn gaps_and_oddities() {
        assert_eq!(sparkline(&[Some(1.0), None, Some(f64::NAN), Some(f64::INFINITY), Some(0.0)]), "█   ▁");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[None, None]), "  ");
        // Negative values move the baseline down.
        assert_eq!(sparkline(&some(&[-7.0, 0.0])), "▁█");
        // Huge spans do not overflow.
        assert_eq!(sparkline(&some(&[-f64::MAX, f64::MAX])), "▁▁");
    }

    proptest! {
        #[test]
        fn one_char_per_value_and_the_largest_is_full(values in proptest::collection::vec(proptest::option::of(0.0f64..1e12), 0..100)) {
            let line = sparkline(&values);
            prop_assert_eq!(line.chars().count(), values.len());
            let max = values.iter().flatten().copied().fold(0.0, f64::max);
            for (c, v) in line.chars().zip(&values) {
                match v {
                    None => prop_assert_eq!(c, ' '),
                    Some(v) if *v == max && max > 0.0 => prop_assert_eq!(c, '█'),
                    Some(_) => prop_assert!(BARS.contains(&c)),
                }
            }
        }
    }
}
